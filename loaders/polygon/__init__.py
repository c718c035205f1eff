"""dlt source for Polygon (Massive) option-chain snapshots: fetched chains as csv load files for options_chains.

The modules: `configuration` (the settings, resolved by dlt), `helpers` (HTTP, paging, retries,
rate limit), `pool` (the fetch pool), `rows` (parsing and normalisation into Arrow rows, the dedupe),
`slicing` (large chains as parallel expiration-range slices), `settings` (constants).
"""

from __future__ import annotations

import collections
import itertools
import logging
import tempfile
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import dlt
import pyarrow as pa
import pyarrow.csv as pa_csv
from dlt.common.libs.pyarrow import py_arrow_to_table_schema_columns
from dlt.common.schema.typing import TTableSchemaColumns
from dlt.common.storages.load_package import CurrentLoadPackageStateNotAvailable
from dlt.extract.resource import DltResource

from . import settings
from .configuration import PolygonConfiguration, polygon_configuration
from .helpers import (
    ChainClient,
    ProviderError,
    RateLimiter,
    one_line,
    pin_next_url,
)
from .pool import ChainFetcher, ChainSource
from .rows import ARROW_SCHEMA, ChainResult, SymbolFetchError, dedupe_pages, normalise_page
from .slicing import ExpirationRange, SlicePlanner, expiration_slices

__all__ = [
    "ARROW_SCHEMA", "ChainClient", "ChainFetcher", "ChainResult", "ChainSource", "ExpirationRange",
    "PolygonConfiguration", "ProviderError", "RateLimiter", "SlicePlanner", "SymbolFetchError", "dedupe_pages",
    "expiration_slices", "normalise_page", "one_line", "options_chains", "pin_next_url", "polygon_configuration",
    "polygon_source",
]

log = logging.getLogger(__name__)


@dlt.source(name="polygon")
def polygon_source(chains: Iterable[ChainResult]) -> DltResource:
    """Option chains fetched from Polygon (or a provider of the same shape) for options_chains.

    Args:
        chains: fetch results, as a ChainFetcher hands them over (ingestion's fetch pool runs
            ahead of the loads, several days and symbols at a time).

    Returns:
        The `options_chains` resource.
    """
    return options_chains(chains)


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
def options_chains(chains: Iterable[ChainResult]) -> Iterator[Any]:
    """Yields the successfully fetched chains (deduplicated) as csv load files of about ITEM_ROWS
    rows, several symbols each, written here and imported by dlt as they are (Arrow tables when
    the resource is iterated outside a pipeline).

    Arrow items would be written to parquet by dlt's extract and rewritten to csv by its normalize
    step; for rows already typed and validated that round trip was most of the loader's time
    outside fetching. The files carry the load id, as dlt's normalizer would add it.

    Args:
        chains: fetch results (a ChainFetcher's, which runs ahead); failed ones add no rows
            (whoever hands them over accounts for them). Each one's `contracts` becomes the
            number of its rows stored.
    """
    # A MERGE may touch a row once: a contract goes in once per load and snapshot time.
    emitted: dict[datetime | None, set[str]] = collections.defaultdict(set)
    pending: list[pa.Table] = []
    pending_rows = 0
    with tempfile.TemporaryDirectory(prefix="kapman-load-") as directory:
        files = (Path(directory) / f"{n}.csv" for n in itertools.count())
        for result in chains:
            if result.ok:  # the symbol's one dedupe: within its chain and against the load's
                result.tables, _ = dedupe_pages(result.tables, emitted[result.snapshot_time])
                result.count()
            pending += result.tables
            pending_rows += sum(table.num_rows for table in result.tables)
            result.tables = []  # the rows live on in `pending`, then in the load file: never held twice
            if pending_rows >= settings.ITEM_ROWS:
                yield _load_file(pending, next(files))
                pending, pending_rows = [], 0
        if pending:
            yield _load_file(pending, next(files))


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
