"""dlt source for Polygon (Massive) option-chain snapshots: whole chains as Arrow pages for options_chains."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date, datetime
from typing import Optional

import dlt
import pyarrow as pa
from dlt.common.configuration import configspec, resolve_configuration
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.libs.pyarrow import py_arrow_to_table_schema_columns
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.common.typing import TSecretStrValue
from dlt.extract.resource import DltResource

from . import settings
from .helpers import (
    ARROW_SCHEMA,
    ChainClient,
    ChainFetcher,
    ChainResult,
    ExpirationRange,
    ProviderError,
    RateLimiter,
    RetryPolicy,
    SymbolFetchError,
    dedupe_pages,
    expiration_slices,
    iter_results,
    normalise_page,
    pin_next_url,
)

__all__ = [
    "ChainFetcher", "ChainResult", "ExpirationRange", "PolygonConfiguration", "ProviderError", "RateLimiter",
    "RetryPolicy", "SymbolFetchError", "expiration_slices", "normalise_page", "options_chains", "pin_next_url",
    "polygon_configuration", "polygon_source",
]

log = logging.getLogger(__name__)


@configspec
class PolygonConfiguration(BaseConfiguration):
    """The source's settings, resolved like its arguments: `[sources.polygon]` in .dlt/*.toml,
    SOURCES__POLYGON__* variables or, with no section, POLYGON_API_KEY and POLYGON_BASE_URL.
    The plan's request limit is `requests_per_minute` (SOURCES__POLYGON__REQUESTS_PER_MINUTE) or,
    named like the key, `polygon_requests_per_minute` (POLYGON_REQUESTS_PER_MINUTE)."""

    polygon_api_key: Optional[TSecretStrValue] = None  # noqa: UP045 (dlt reads the hint at runtime)
    polygon_base_url: str = settings.DEFAULT_BASE_URL
    max_attempts: int = settings.MAX_ATTEMPTS
    retry_budget: int = settings.RETRY_BUDGET_PER_SYMBOL
    backoff_factor: float = settings.BACKOFF_FACTOR
    max_retry_delay: float = settings.MAX_RETRY_DELAY
    read_timeout: float = settings.READ_TIMEOUT
    slice_contracts: int = settings.SLICE_CONTRACTS  # 0: never split a chain into slices
    requests_per_minute: Optional[float] = None  # noqa: UP045 (None: no client-side limit)
    polygon_requests_per_minute: Optional[float] = None  # noqa: UP045 (the same, as POLYGON_REQUESTS_PER_MINUTE)

    def rate_limiter(self) -> RateLimiter | None:
        """A new limiter for the configured request limit (None: unlimited). Share one per run:
        the plan's limit counts every request of the key."""
        limit = self.requests_per_minute
        if limit is None:
            limit = self.polygon_requests_per_minute
        return None if limit is None else RateLimiter(limit)

    def client(self, as_of: date | None = None, pool_size: int = 4,
               limiter: RateLimiter | None = None) -> ChainClient:
        """A client for one snapshot day (None: the current chain, the live endpoint's only one);
        without a limiter, one of its own for the configured limit."""
        if not self.polygon_api_key:
            raise ValueError("no Polygon API key (POLYGON_API_KEY)")
        if self.max_attempts < 1 or self.retry_budget < 0:
            raise ValueError("max_attempts must be >= 1 and retry_budget >= 0")
        policy = RetryPolicy(max_attempts=self.max_attempts, budget_per_symbol=self.retry_budget,
                             backoff_factor=self.backoff_factor, max_delay=self.max_retry_delay,
                             read_timeout=self.read_timeout)
        extra = {"date": as_of.isoformat()} if as_of else None
        return ChainClient(self.polygon_base_url, self.polygon_api_key, policy, extra_params=extra,
                           pool_size=pool_size, limiter=limiter or self.rate_limiter())


def polygon_configuration() -> PolygonConfiguration:
    """Resolve the settings exactly as `polygon_source` resolves its arguments."""
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
    requests_per_minute: float | None = None,
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
        requests_per_minute: the plan's request limit, kept by all fetch threads together (None: none).

    Returns:
        The `options_chains` resource.
    """
    if snapshot_time.tzinfo is None:
        raise ValueError("snapshot_time must be timezone-aware")
    if not 1 <= concurrency <= 32:
        raise ValueError(f"concurrency must be between 1 and 32, not {concurrency}")
    config = PolygonConfiguration(
        polygon_api_key=polygon_api_key, polygon_base_url=polygon_base_url, max_attempts=max_attempts,
        retry_budget=retry_budget, backoff_factor=backoff_factor, max_retry_delay=max_retry_delay,
        read_timeout=read_timeout, requests_per_minute=requests_per_minute,
    )
    client = config.client(as_of, pool_size=concurrency)
    return options_chains(iter_results(client, symbols, snapshot_time, concurrency), on_chain)


def _column_hints() -> TTableSchemaColumns:
    """ARROW_SCHEMA as dlt column hints. The timestamps go into the load files as UTC without an
    offset (`timezone: False`): pyarrow's csv writer formats zoned timestamps about 50 times slower
    than naive ones, and that was most of the normalize step. The columns stay timestamptz and
    the pipeline's connections read the files in UTC (ingest._pipeline)."""
    columns = py_arrow_to_table_schema_columns(ARROW_SCHEMA)
    for column in columns.values():
        if column.get("data_type") == "timestamp":
            column["timezone"] = False
    return columns


@dlt.resource(
    name=settings.TABLE_NAME,
    primary_key=list(settings.PRIMARY_KEY),
    # Upsert on the contract ticker (never expiration/strike/type: SPX and SPXW share those).
    # Unchanged rows are skipped, so the rows a load stamps with its _dlt_load_id are exactly
    # the rows it inserted or changed.
    write_disposition={"disposition": "merge", "strategy": "upsert", "skip_unchanged_rows": True},
    columns=_column_hints(),
    file_format="csv",
)
def options_chains(
    chains: Iterable[ChainResult],
    on_chain: Callable[[ChainResult], None] | None = None,
) -> Iterator[pa.Table]:
    """Yields the successfully fetched chains (deduplicated) as Arrow tables of about ITEM_ROWS
    rows, several symbols each.

    Args:
        chains: fetch results (helpers.iter_results, or a ChainFetcher's that runs ahead).
        on_chain: called with each result before its rows are yielded; without it failures are
            logged and a provider failure raises once the symbols already fetched are yielded.
    """
    emitted: set[str] = set()  # a MERGE may touch a row once: a contract goes in once per load
    fatal: str | None = None
    pending: list[pa.Table] = []
    pending_rows = 0
    for result in chains:
        if result.ok:
            result.tables, result.duplicates = dedupe_pages(result.tables, emitted)
        if on_chain is not None:
            on_chain(result)
        elif not result.ok:
            log.error("%s: %s", result.symbol, result.error)
            fatal = fatal or (result.error if result.fatal and result.attempted else None)
        pending += result.tables
        pending_rows += sum(table.num_rows for table in result.tables)
        result.tables = []  # the rows live on in `pending`, then in dlt's files: never held twice
        if pending_rows >= settings.ITEM_ROWS:
            yield _item(pending)
            pending, pending_rows = [], 0
    if pending:
        yield _item(pending)
    if fatal:
        raise ProviderError(fatal)


def _item(pages: list[pa.Table]) -> pa.Table:
    """Pages of several symbols as one item with contiguous columns. dlt computes and validates
    the table schema once per item (tens of milliseconds), and writes 250-row chunks far slower
    than whole columns."""
    return pa.concat_tables(pages).combine_chunks()
