"""dlt source for Polygon (Massive) option-chain snapshots: whole chains as Arrow pages for options_chains."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import date, datetime

import dlt
import pyarrow as pa
from dlt.common.configuration import configspec, resolve_configuration
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.libs.pyarrow import py_arrow_to_table_schema_columns
from dlt.common.typing import TSecretStrValue
from dlt.extract.resource import DltResource

from . import settings
from .helpers import (
    ARROW_SCHEMA,
    ChainClient,
    ChainResult,
    ProviderError,
    RetryPolicy,
    SymbolFetchError,
    dedupe_pages,
    iter_results,
    normalise_page,
    pin_next_url,
)

__all__ = [
    "ChainResult", "PolygonConfiguration", "ProviderError", "RetryPolicy", "SymbolFetchError",
    "normalise_page", "options_chains", "pin_next_url", "polygon_configuration", "polygon_source",
]

log = logging.getLogger(__name__)


@configspec
class PolygonConfiguration(BaseConfiguration):
    """Where the source looks for its settings: `[sources.polygon]` in .dlt/*.toml or, with no
    section, the documented variables POLYGON_API_KEY and POLYGON_BASE_URL."""

    polygon_api_key: TSecretStrValue = None
    polygon_base_url: str = settings.DEFAULT_BASE_URL


def polygon_configuration() -> PolygonConfiguration:
    """Resolve the key and base URL exactly as `polygon_source` does (raises ConfigFieldMissingException)."""
    return resolve_configuration(PolygonConfiguration(), sections=("sources", "polygon"))


@dlt.source(name="polygon")
def polygon_source(
    symbols: Mapping[str, str],
    snapshot_time: datetime,
    as_of: date | None = None,
    concurrency: int = 4,
    on_chain: Callable[[ChainResult], None] | None = None,
    polygon_api_key: TSecretStrValue = dlt.secrets.value,
    polygon_base_url: str = settings.DEFAULT_BASE_URL,
    max_attempts: int = settings.MAX_ATTEMPTS,
    retry_budget: int = settings.RETRY_BUDGET_PER_SYMBOL,
    backoff_factor: float = settings.BACKOFF_FACTOR,
    max_retry_delay: float = settings.MAX_RETRY_DELAY,
    read_timeout: float = settings.READ_TIMEOUT,
) -> DltResource:
    """Full option chains of some underlyings, one snapshot.

    Args:
        symbols: underlying symbol -> its `tickers.id` (e.g. {"AAPL": "4b5e..."}).
        snapshot_time: the snapshot identity stored in `time` (timezone-aware).
        as_of: the day to ask for (`date=` query parameter). None asks for the current chain, the
            only thing the live snapshot endpoint serves; the simulator serves any day.
        concurrency: symbols fetched in parallel.
        on_chain: called (in the extracting thread) with each symbol's result before its rows
            are yielded. Without it, failures are logged and a provider failure raises.
        polygon_api_key: the key (POLYGON_API_KEY); only ever sent to polygon_base_url's origin.
        polygon_base_url: the API origin (POLYGON_BASE_URL).
        max_attempts: attempts per request on 429, 5xx, timeouts and connection errors.
        retry_budget: retries per symbol, all of its requests together.
        backoff_factor: first backoff in seconds, doubling per attempt (Retry-After wins).
        max_retry_delay: cap of one backoff, Retry-After included.
        read_timeout: seconds to wait for a response.

    Returns:
        The `options_chains` resource.
    """
    if snapshot_time.tzinfo is None:
        raise ValueError("snapshot_time must be timezone-aware")
    if not 1 <= concurrency <= 32:
        raise ValueError(f"concurrency must be between 1 and 32, not {concurrency}")
    if max_attempts < 1 or retry_budget < 0:
        raise ValueError("max_attempts must be >= 1 and retry_budget >= 0")
    policy = RetryPolicy(max_attempts=max_attempts, budget_per_symbol=retry_budget, backoff_factor=backoff_factor,
                         max_delay=max_retry_delay, read_timeout=read_timeout)
    extra = {"date": as_of.isoformat()} if as_of else None
    client = ChainClient(polygon_base_url, polygon_api_key, policy, extra_params=extra, pool_size=concurrency)
    return options_chains(client, symbols, snapshot_time, concurrency, on_chain)


@dlt.resource(
    name=settings.TABLE_NAME,
    primary_key=list(settings.PRIMARY_KEY),
    # Upsert on the contract ticker (never expiration/strike/type: SPX and SPXW share those).
    # Unchanged rows are skipped, so the rows a load stamps with its _dlt_load_id are exactly
    # the rows it inserted or changed.
    write_disposition={"disposition": "merge", "strategy": "upsert", "skip_unchanged_rows": True},
    columns=py_arrow_to_table_schema_columns(ARROW_SCHEMA),
    file_format="csv",
)
def options_chains(
    client: ChainClient,
    symbols: Mapping[str, str],
    snapshot_time: datetime,
    concurrency: int,
    on_chain: Callable[[ChainResult], None] | None,
) -> Iterator[pa.Table]:
    """Yields each successfully fetched symbol's pages (deduplicated) as Arrow tables."""
    emitted: set[str] = set()  # a MERGE may touch a row once: a contract goes in once per load
    fatal: str | None = None
    for result in iter_results(client, symbols, snapshot_time, concurrency):
        if result.ok:
            result.tables, result.duplicates = dedupe_pages(result.tables, emitted)
        if on_chain is not None:
            on_chain(result)
        elif not result.ok:
            log.error("%s: %s", result.symbol, result.error)
            fatal = fatal or (result.error if result.fatal else None)
        yield from result.tables
    if fatal:
        raise ProviderError(fatal)
