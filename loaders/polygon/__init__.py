"""dlt source for Polygon (Massive) option-chain snapshots: whole chains as Arrow pages for options_chains."""

from __future__ import annotations

import collections
import itertools
import logging
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Executor
from datetime import date, datetime
from pathlib import Path
from typing import Any, Optional

import dlt
import pyarrow as pa
import pyarrow.csv as pa_csv
from dlt.common.configuration import configspec, resolve_configuration
from dlt.common.configuration.specs import BaseConfiguration
from dlt.common.libs.pyarrow import py_arrow_to_table_schema_columns
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.common.storages.load_package import CurrentLoadPackageStateNotAvailable
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
    "ChainClient", "ChainFetcher", "ChainResult", "ExpirationRange", "PolygonConfiguration", "ProviderError", "RateLimiter",
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

    def client(self, as_of: date | None = None, pool_size: int = 4, limiter: RateLimiter | None = None,
               parser: Executor | None = None) -> ChainClient:
        """A client for one snapshot day (None: the current chain, the live endpoint's only one);
        without a limiter, one of its own for the configured limit; pages parsed in `parser`'s
        processes if given (see ChainClient)."""
        if not self.polygon_api_key:
            raise ValueError("no Polygon API key (POLYGON_API_KEY)")
        if self.max_attempts < 1 or self.retry_budget < 0:
            raise ValueError("max_attempts must be >= 1 and retry_budget >= 0")
        policy = RetryPolicy(max_attempts=self.max_attempts, budget_per_symbol=self.retry_budget,
                             backoff_factor=self.backoff_factor, max_delay=self.max_retry_delay,
                             read_timeout=self.read_timeout)
        extra = {"date": as_of.isoformat()} if as_of else None
        return ChainClient(self.polygon_base_url, self.polygon_api_key, policy, extra_params=extra,
                           pool_size=pool_size, limiter=limiter or self.rate_limiter(), parser=parser)


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
    """ARROW_SCHEMA and the load id as dlt column hints. The resource writes the load files itself
    (see options_chains); their timestamps are UTC without an offset (`timezone: False`), which
    the pipeline's connections read in UTC (ingest._pipeline)."""
    columns = py_arrow_to_table_schema_columns(ARROW_SCHEMA)
    for column in columns.values():
        if column.get("data_type") == "timestamp":
            column["timezone"] = False
    columns[LOAD_ID_COLUMN] = {"name": LOAD_ID_COLUMN, "data_type": "text", "nullable": False}
    return columns


LOAD_ID_COLUMN = "_dlt_load_id"
# The csv's columns: ARROW_SCHEMA with naive timestamps (pyarrow formats zoned timestamps about
# 50 times slower), then the load id.
_CSV_SCHEMA = pa.schema(
    [pa.field(f.name, pa.timestamp("us"), f.nullable) if pa.types.is_timestamp(f.type) else f for f in ARROW_SCHEMA]
    + [pa.field(LOAD_ID_COLUMN, pa.string(), nullable=False)]
)


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
) -> Iterator[Any]:
    """Yields the successfully fetched chains (deduplicated) as csv load files of about ITEM_ROWS
    rows, several symbols each, written here and imported by dlt as they are (Arrow tables when
    the resource is iterated outside a pipeline).

    Arrow items would be written to parquet by dlt's extract and rewritten to csv by its normalize
    step; for rows already typed and validated that round trip was most of the loader's time
    outside fetching. The files carry the load id, as dlt's normalizer would add it.

    Args:
        chains: fetch results (helpers.iter_results, or a ChainFetcher's that runs ahead).
        on_chain: called with each result before its rows are yielded; without it failures are
            logged and a provider failure raises once the symbols already fetched are yielded.
    """
    # A MERGE may touch a row once: a contract goes in once per load and snapshot time.
    emitted: dict[datetime | None, set[str]] = collections.defaultdict(set)
    fatal: str | None = None
    pending: list[pa.Table] = []
    pending_rows = 0
    with tempfile.TemporaryDirectory(prefix="kapman-load-") as directory:
        files = (Path(directory) / f"{n}.csv" for n in itertools.count())
        for result in chains:
            if result.ok:
                result.tables, result.duplicates = dedupe_pages(result.tables, emitted[result.snapshot_time])
            if on_chain is not None:
                on_chain(result)
            elif not result.ok:
                log.error("%s: %s", result.symbol, result.error)
                fatal = fatal or (result.error if result.fatal and result.attempted else None)
            pending += result.tables
            pending_rows += sum(table.num_rows for table in result.tables)
            result.tables = []  # the rows live on in `pending`, then in the load file: never held twice
            if pending_rows >= settings.ITEM_ROWS:
                yield _load_file(pending, next(files))
                pending, pending_rows = [], 0
        if pending:
            yield _load_file(pending, next(files))
    if fatal:
        raise ProviderError(fatal)


def _load_file(pages: list[pa.Table], path: Path) -> Any:
    """Pages of several symbols as one csv load file at `path`, marked for import (dlt hard-links
    it into the load package before asking for the next item, so `path` may go). Iterated outside
    a pipeline, where there is no load package, the resource yields the pages as one Arrow table."""
    table = pa.concat_tables(pages)
    try:
        load_id = dlt.current.load_package_state()["load_id"]
    except CurrentLoadPackageStateNotAvailable:
        return table.combine_chunks()
    table = table.append_column(LOAD_ID_COLUMN, pa.repeat(load_id, table.num_rows).cast(pa.string()))
    pa_csv.write_csv(table.cast(_CSV_SCHEMA), path, pa_csv.WriteOptions(quoting_style="needed"))
    return dlt.mark.with_file_import(str(path), "csv", table.num_rows)
