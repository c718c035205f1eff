"""dlt: the pipeline into PostgreSQL, one load of fetched chains, and the one patch of dlt kept."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import psycopg2.extensions

from .. import db as dbmod
from ..polygon import ChainResult, polygon_source

log = logging.getLogger("kapman.ingest")

PIPELINE_NAME = "options_chains"
COPY_CHUNK_BYTES = 1 << 20  # see large_copy_chunks


class CopyCursor(psycopg2.extensions.cursor):
    """A cursor whose COPY FROM reads its file in COPY_CHUNK_BYTES chunks, whatever size is asked."""

    def copy_expert(self, sql: Any, file: Any, size: int = COPY_CHUNK_BYTES) -> None:
        super().copy_expert(sql, file, max(size, COPY_CHUNK_BYTES))


def large_copy_chunks() -> None:
    """Make dlt's postgres connections use CopyCursor. dlt's csv COPY asks psycopg2 for 8 kB chunks
    and offers no setting for it; every chunk waits for the GIL, which the fetch threads hold much
    of the time (README, Performance: what it buys). The only patch of a library kept: it wraps
    `Psycopg2SqlClient.open_connection`, process-wide and idempotently;
    tests/test_ingest.py::test_the_copy_chunk_patch_is_active fails if dlt changes underneath it."""
    from dlt.destinations.impl.postgres.sql_client import Psycopg2SqlClient

    original = Psycopg2SqlClient.open_connection
    if getattr(original, "large_copy_chunks", False):
        return

    def open_connection(self: Any) -> Any:
        conn = original(self)
        conn.cursor_factory = CopyCursor
        return conn

    open_connection.large_copy_chunks = True  # type: ignore[attr-defined]
    Psycopg2SqlClient.open_connection = open_connection  # type: ignore[method-assign]


def make_pipeline(database: dbmod.Database, quiet: bool) -> Any:
    """The options_chains pipeline into `database`, working directory .kapman/dlt of the working
    directory; packages an interrupted run left are discarded (the ledger retries their symbols)."""
    import dlt
    from dlt.common.runtime.collector import LogCollector, NullCollector
    from dlt.destinations.impl.postgres.configuration import PostgresCredentials

    large_copy_chunks()
    progress = (LogCollector(log_period=2.0, logger=sys.stderr, dump_system_stats=False)
                if sys.stderr.isatty() and not quiet else NullCollector())
    credentials = PostgresCredentials(database.url())
    # The load files carry UTC timestamps without an offset (see polygon._column_hints): COPY
    # reads them in the session's time zone, pinned to UTC on every connection dlt opens.
    credentials.session_timezone = "UTC"
    pipeline = dlt.pipeline(
        pipeline_name=PIPELINE_NAME, pipelines_dir=str(Path.cwd() / dbmod.EMBEDDED_DIR / "dlt"),
        dataset_name="public", destination=dlt.destinations.postgres(credentials=credentials), progress=progress,
    )
    if pipeline.has_pending_data:
        log.warning("discarding load packages left by an interrupted run (the ledger retries their symbols)")
        pipeline.abort_packages()
    return pipeline


def load(pipeline: Any, chains: Iterable[ChainResult]) -> tuple[list[str], str | None]:
    """One pipeline run of the polygon source over `chains`: the load ids, or the load's error
    (its package discarded)."""
    from dlt.pipeline.exceptions import PipelineStepFailed

    started = time.monotonic()
    try:
        load_ids = list(pipeline.run(polygon_source(chains)).loads_ids)
    except PipelineStepFailed as exc:
        pipeline.abort_packages()
        return [], (f"load failed at step {exc.step}: {type(exc.exception).__name__}: "
                    + " ".join(str(exc.exception).split())[:300])
    steps = " ".join(f"{step.step} {(step.finished_at - step.started_at).total_seconds():.2f}s"
                     for step in pipeline.last_trace.steps if step.finished_at)
    log.debug("load: %.2fs (%s)", time.monotonic() - started, steps)
    return load_ids, None
