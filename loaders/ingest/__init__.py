"""`kapman ingest`: option-chain snapshots of the watchlist symbols into options_chains, day by day.

Orchestration only: which days and symbols, the lock, the ledger, the provider, the flow from the
fetch pool to dlt pipeline runs (each load takes the chains fetched by then), then the contract
lifecycle and the run summary. HTTP, paging and normalisation live in the dlt source (loaders/polygon).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import multiprocessing
import os
import queue
import re
import secrets
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions

from . import db as dbmod
from .logs import SUMMARY, Heartbeat, register_secret
from .trading_calendar import is_trading_day, latest_trading_date, snapshot_time, trading_days

log = logging.getLogger("kapman.ingest")

PIPELINE_NAME = "options_chains"
# A load (one dlt pipeline run) takes the symbols fetched by the time it starts, at most these:
LOAD_BATCH_SYMBOLS = 50
LOAD_ROWS = 250_000
# ... and waits for fetches until it has this many rows: the first load's few (the database
# starts early), then twice the previous load's up to the last (a load costs about 0.5 s whatever
# its size, so loads of what happened to be fetched were many and small).
LOAD_MIN_ROWS = (10_000, 80_000)
# Fetched rows waiting for a load, at most: no new fetch starts beyond it (memory stays flat).
BUFFER_ROWS = 150_000
COPY_CHUNK_BYTES = 1 << 20  # see _large_copy_chunks
PARSE_PROCESSES = 2  # processes that parse pages (0: in the fetch threads); see _parser_pool
# Plausible tickers: AAPL, BRK.B, I:SPX. Anything else never reaches a URL.
SYMBOL_RE = re.compile(r"^(?:I:)?[A-Z][A-Z0-9]{0,9}(?:\.[A-Z0-9]{1,4})?$")
EXIT_OK, EXIT_FAILED = 0, 1


class IngestError(RuntimeError):
    """The run cannot go on (no key, provider unauthorised or unreachable): exit 1, one line."""


# --- what to ingest -----------------------------------------------------------------------------

def resolve_days(args: argparse.Namespace, today: date | None = None) -> list[date]:
    """The trading days to ingest, oldest first: --as-of, the --start-date..--end-date range
    (weekends and NYSE holidays skipped), or the current trading date."""
    if args.start_date:
        days = trading_days(args.start_date, args.end_date)
        calendar_days = (args.end_date - args.start_date).days + 1
        log.info("range %s..%s: %d trading days resolved (%d weekend/holiday days skipped)",
                 args.start_date, args.end_date, len(days), calendar_days - len(days))
        return days
    if args.as_of:
        if not is_trading_day(args.as_of):
            raise IngestError(f"{args.as_of} is not an NYSE trading day (weekend or holiday)")
        return [args.as_of]
    return [today or latest_trading_date()]


def select_symbols(conn: psycopg2.extensions.connection, requested: Sequence[str] | None) -> list[str]:
    """Every symbol of every active watchlist, trimmed, upper-cased, deduplicated and sorted;
    --symbols narrows to a subset. Implausible symbols are logged and skipped."""
    with conn.cursor() as cur:
        cur.execute("select distinct upper(btrim(symbol)) from watchlists where active")
        listed = {row[0] for row in cur.fetchall() if row[0]}
    if requested is not None:
        wanted = {s.strip().upper() for s in requested if s.strip()}
        missing = sorted(wanted - listed)
        if missing:
            log.warning("not on any active watchlist, skipped: %s", ", ".join(missing))
        listed &= wanted
    symbols = []
    for symbol in sorted(listed):
        if SYMBOL_RE.fullmatch(symbol):  # not match: `$` also matches before a trailing line break
            symbols.append(symbol)
        else:
            log.warning("skipping %r: not a plausible ticker symbol", symbol)
    return symbols


def ensure_tickers(conn: psycopg2.extensions.connection, symbols: Sequence[str]) -> dict[str, str]:
    """Create the missing tickers rows; symbol -> tickers.id."""
    with conn.cursor() as cur:
        cur.execute("insert into tickers (symbol) select unnest(%s::text[]) on conflict (symbol) do nothing",
                    (list(symbols),))
        cur.execute("select symbol, id::text from tickers where symbol = any(%s)", (list(symbols),))
        return dict(cur.fetchall())


# --- providers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Provider:
    """Where chains come from. `historical` providers serve any date (sent as `date=`); the live
    snapshot endpoint only ever serves the current chain."""

    name: str
    config: Any  # polygon.PolygonConfiguration: origin, key, retry settings
    historical: bool
    limiter: Any = None  # polygon.RateLimiter: the plan's request limit, shared by every fetch of the run

    def refusal(self, day: date, current: date) -> str | None:
        """Why this provider cannot give day's chain (None: it can)."""
        if self.historical or day == current:
            return None
        return (f"the live Polygon snapshot only serves the current chain (trading date {current}), "
                f"not {day}: nothing stored for {day}")


@contextlib.contextmanager
def open_provider(name: str) -> Iterator[Provider]:
    """The polygon provider (key, base URL and retry settings resolved by dlt: POLYGON_API_KEY,
    POLYGON_BASE_URL, [sources.polygon]), or the simulator started in-process on a free loopback
    port with a one-off key, reached over HTTP like the real API."""
    from .polygon import polygon_configuration

    config = polygon_configuration()
    if name == "simulator":
        from .simulator import Market, SimulatorServer

        seed = int(os.environ.get("KAPMAN_SIMULATOR_SEED", "42"))
        config.polygon_api_key = secrets.token_urlsafe(18)
        register_secret(config.polygon_api_key)
        with SimulatorServer(Market(seed), api_key=config.polygon_api_key) as server:
            config.polygon_base_url = server.base_url
            log.info("simulator (seed %d) serving SIMULATED chains on %s", seed, server.base_url)
            yield Provider("simulator", config, historical=True, limiter=_rate_limiter(config))
        return
    if not config.polygon_api_key:
        raise IngestError("POLYGON_API_KEY is not set: the polygon provider refuses to start without it "
                          "(or use --provider simulator)")
    register_secret(config.polygon_api_key)
    yield Provider("polygon", config, historical=False, limiter=_rate_limiter(config))


def _rate_limiter(config: Any) -> Any:
    """One limiter for the whole run (every worker, every day), or None without a limit."""
    try:
        limiter = config.rate_limiter()
    except ValueError as exc:
        raise IngestError(f"invalid request limit: {exc}") from None
    if limiter is not None:
        log.info("client-side rate limit: %g requests/minute, shared by all workers", limiter.requests_per_minute)
    return limiter


# --- outcomes -----------------------------------------------------------------------------------

@dataclass
class SymbolOutcome:
    day: date
    symbol: str
    outcome: str  # ok | failed | skipped
    pages: int = 0
    contracts: int = 0
    rows_written: int = 0
    rejected: int = 0
    error: str | None = None
    elapsed_s: float = 0.0


@dataclass
class DayOutcome:
    day: date
    snapshot_time: datetime
    outcome: str = "skipped"  # succeeded | failed | skipped
    error: str | None = None
    symbols: list[SymbolOutcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for s in self.symbols if s.outcome == outcome)


# --- the ledger and the lifecycle ---------------------------------------------------------------

def completed_symbols(conn: psycopg2.extensions.connection, symbols: Sequence[str],
                      snapshot: datetime) -> dict[str, datetime]:
    """Symbols whose (symbol, snapshot time) the ledger says completed, with when."""
    with conn.cursor() as cur:
        cur.execute("select symbol, finished_at from ingestion_ledger"
                    " where snapshot_time = %s and status = 'completed' and symbol = any(%s)",
                    (snapshot, list(symbols)))
        return dict(cur.fetchall())


def _ledger_running(cur: psycopg2.extensions.cursor, symbols: Sequence[str], snapshot: datetime) -> None:
    cur.execute(
        "insert into ingestion_ledger (symbol, snapshot_time, status) select s, %s, 'running'"
        " from unnest(%s::text[]) as s on conflict (symbol, snapshot_time) do update set status = 'running',"
        " pages = null, contracts = null, rows_written = null, rejected = null, error = null,"
        " started_at = now(), finished_at = null",
        (snapshot, list(symbols)),
    )


def _ledger_finish(cur: psycopg2.extensions.cursor, outcome: SymbolOutcome, snapshot: datetime) -> None:
    cur.execute(
        "update ingestion_ledger set status = %s, pages = %s, contracts = %s, rows_written = %s,"
        " rejected = %s, error = %s, finished_at = now() where symbol = %s and snapshot_time = %s",
        ("completed" if outcome.outcome == "ok" else "failed", outcome.pages, outcome.contracts,
         outcome.rows_written, outcome.rejected, outcome.error, outcome.symbol, snapshot),
    )


def update_lifecycle(cur: psycopg2.extensions.cursor, ticker_ids: Sequence[str], snapshot: datetime) -> None:
    """After successful fetches at `snapshot` of these tickers' chains: the contracts stored under
    the snapshot are active (reactivated if they had gone), the tickers' other contracts last
    seen before `snapshot` are deactivated. A snapshot older than what a contract already records
    (a later sighting or deactivation) changes only its first/last seen times. Nothing is deleted.
    The same state whatever order the snapshots are stored in. Three statements for any number of
    tickers (a load's), reading the stored rows by index: per-symbol statements, or the contract
    tickers sent along, cost more."""
    if not ticker_ids:
        return
    params = {"t": snapshot, "tids": list(ticker_ids)}
    cur.execute(
        "insert into option_contracts as oc (contract_ticker, ticker_id, expiration_date, strike_price,"
        " option_type, first_seen_at, last_seen_at, active)"
        " select c.contract_ticker, c.ticker_id, c.expiration_date, c.strike_price, c.option_type,"
        " c.time, c.time, true from options_chains c where c.ticker_id = any(%(tids)s::uuid[]) and c.time = %(t)s"
        " on conflict (contract_ticker) do update set"
        " first_seen_at = least(oc.first_seen_at, excluded.first_seen_at),"
        " last_seen_at = greatest(oc.last_seen_at, excluded.last_seen_at),"
        " active = oc.active or %(t)s >= coalesce(oc.deactivated_at, oc.last_seen_at),"
        " deactivated_at = case when %(t)s >= coalesce(oc.deactivated_at, oc.last_seen_at) then null"
        " else oc.deactivated_at end"
        " where not oc.active or %(t)s > oc.last_seen_at or %(t)s < oc.first_seen_at",
        params,
    )
    # A day stored late (retried after a failure, or a backfill) gives the state the days would have
    # given in order: it is the earlier snapshot that saw a contract gone (deactivated_at moves back
    # to it), and a contract it saw last is gone from the symbol's next snapshot already stored.
    cur.execute(
        "update option_contracts set active = false, deactivated_at = %(t)s"
        " where ticker_id = any(%(tids)s::uuid[]) and last_seen_at < %(t)s"
        " and (active or deactivated_at > %(t)s)",
        params,
    )
    # The next stored snapshot of each ticker first (one index probe each, usually none): joined
    # lateral to option_contracts instead, the planner could run it once per contract (a demo
    # load stalled for minutes on that plan).
    cur.execute(
        "with later as materialized (select b.ticker_id, n.time from unnest(%(tids)s::uuid[]) as b (ticker_id)"
        " cross join lateral (select c.time from options_chains c where c.ticker_id = b.ticker_id"
        " and c.time > %(t)s order by c.time limit 1) as n)"
        " update option_contracts oc set active = false, deactivated_at = later.time from later"
        " where oc.ticker_id = later.ticker_id and oc.last_seen_at = %(t)s",
        params,
    )


def earlier_expirations(conn: psycopg2.extensions.connection, ticker_ids: Sequence[str],
                        snapshot: datetime, min_contracts: int) -> dict[str, list[tuple[date, int]]]:
    """(expiration, contracts) of each ticker's latest stored chain at or before `snapshot`, for
    the tickers whose chain held at least `min_contracts` (one index lookup per ticker)."""
    with conn.cursor() as cur:
        cur.execute(
            "select t.ticker_id::text, c.expiration_date, count(*)"
            " from unnest(%(tids)s::uuid[]) as t (ticker_id)"
            " cross join lateral (select max(time) as time from options_chains o"
            "  where o.ticker_id = t.ticker_id and o.time <= %(t)s) as latest"
            # `offset 0` fences the lateral: flattened into a join, the planner hash-joins a scan
            # of every partition (whole seconds at a few million rows) instead of an index lookup.
            " cross join lateral (select c.expiration_date from options_chains c"
            "  where c.ticker_id = t.ticker_id and c.time = latest.time offset 0) as c"
            " group by 1, 2 order by 1, 2",
            {"tids": list(ticker_ids), "t": snapshot},
        )
        counts: dict[str, list[tuple[date, int]]] = {}
        for ticker_id, expiration, n in cur.fetchall():
            counts.setdefault(ticker_id, []).append((expiration, n))
    return {t: c for t, c in counts.items() if sum(n for _, n in c) >= min_contracts}


# --- one run ------------------------------------------------------------------------------------

@dataclass
class _Day:
    """One day of the run: its outcome so far and the symbols still to be finished."""

    outcome: DayOutcome
    todo: list[str]
    left: int = 0  # symbols not yet finished (ledger and lifecycle written)
    submitted: int = 0  # todo[:submitted] went to the fetch pool


class _Feed:
    """Keeps the fetch pool busy from a thread of its own, whatever the loads are doing.

    The days' symbols go to the pool in order, at most `concurrency` at a time and none while
    BUFFER_ROWS fetched rows wait for a load (memory stays flat however large the day or the
    range). Finished fetches queue up; each load takes what has been fetched by then (see `take`),
    so a load runs while the next symbols are fetched, and a slow load makes the next one larger.
    """

    def __init__(self, run: _Run, days: list[_Day]) -> None:
        self.run, self.days = run, days
        self._ready: queue.SimpleQueue[tuple[_Day, Any]] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._in_flight = self._buffered = self._submitted = self._taken = 0
        self._feeding = True
        self._stop = False
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._feed, name="feeder", daemon=True)
        self._thread.start()

    def _feed(self) -> None:
        run = self.run
        try:
            with run.database.connect() as conn:
                for day in self.days:
                    if not day.todo or self._stopping():
                        continue
                    snapshot = day.outcome.snapshot_time
                    with conn.cursor() as cur:
                        _ledger_running(cur, day.todo, snapshot)  # until each outcome is known
                    conn.commit()
                    log.info("day %s START snapshot_time=%s symbols=%d", day.outcome.day, snapshot.isoformat(),
                             len(day.todo))
                    client = run.client(day.outcome.day)
                    slices = run.slices(conn, day.todo, snapshot)
                    for symbol in day.todo:
                        with self._cond:
                            self._cond.wait_for(lambda: self._stopping() or (
                                self._in_flight < run.args.concurrency and self._buffered < BUFFER_ROWS))
                            if self._stopping():
                                break
                            self._in_flight += 1
                            self._submitted += 1
                            day.submitted += 1
                        future, = run.fetcher.submit(client, {symbol: run.ticker_ids[symbol]}, snapshot,
                                                     slices={symbol: slices[symbol]} if symbol in slices else None)
                        future.add_done_callback(functools.partial(self._fetched, day, symbol))
        except BaseException as exc:  # noqa: BLE001 (a lost database: raised in the main thread by take)
            self.error = exc
        finally:
            with self._cond:
                self._feeding = False
                self._cond.notify_all()
            self._ready.put((None, None))  # wakes a take() waiting for a result that will not come

    def _stopping(self) -> bool:
        return self._stop or self.run.fatal is not None

    def _fetched(self, day: _Day, symbol: str, future: Any) -> None:
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 (a bug merging slices: this symbol fails, the run goes on)
            from .polygon import ChainResult

            result = ChainResult(symbol, self.run.ticker_ids[symbol], error=f"{type(exc).__name__}: {exc}")
        rows = result.contracts
        if result.ok:
            self.run.remember_expirations(result)
        with self._cond:
            self._in_flight -= 1
            self._buffered += rows
            self._cond.notify_all()
        self._ready.put((day, result))

    def _next(self, block: bool) -> tuple[_Day, Any] | None:
        while True:
            with self._cond:
                if self._taken == self._submitted and not self._feeding:
                    if self.error is not None:
                        raise self.error
                    return None
            try:
                day, result = self._ready.get(block=block)
            except queue.Empty:
                return None
            if day is None:
                continue  # the feeder's wake-up call: look again
            with self._cond:
                self._taken += 1
                self._buffered -= result.contracts
                self._cond.notify_all()
            return day, result

    def first(self) -> tuple[_Day, Any] | None:
        """The next fetched symbol, waiting for it; None when every symbol has been taken."""
        return self._next(block=True)

    def take(self, first: tuple[_Day, Any], on_chain: Callable[[_Day, Any], None], min_rows: int) -> Iterator[Any]:
        """One load's results: `first`, then the next ones as they are fetched until `min_rows`
        rows (or nothing more will come), then those fetched by then, up to LOAD_ROWS rows and
        LOAD_BATCH_SYMBOLS symbols."""
        rows = symbols = 0
        item: tuple[_Day, Any] | None = first
        while item is not None:
            day, result = item
            on_chain(day, result)
            rows += result.contracts
            symbols += 1
            yield result
            if rows >= LOAD_ROWS or symbols >= LOAD_BATCH_SYMBOLS:
                return
            item = self._next(block=rows < min_rows)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join()


@dataclass
class _Run:
    """One run's state: the database connections, the provider, the dlt pipeline, the fetch pool
    and the finisher thread, which writes each load's ledger and lifecycle while the next loads."""

    args: argparse.Namespace
    database: dbmod.Database
    work: psycopg2.extensions.connection
    provider: Provider
    ticker_ids: dict[str, str]
    pipeline: Any
    fetcher: Any  # polygon.ChainFetcher
    symbols: list[str]  # sorted
    current: date
    finishing: psycopg2.extensions.connection  # the finisher's own connection
    finisher: ThreadPoolExecutor  # one thread: each load's follow-up, in order
    clients: dict[date | None, Any] = field(default_factory=dict)
    # symbol -> (expiration, contracts) of its latest fetched chain: slices the next day's fetch
    expirations: dict[str, list[tuple[date, int]]] = field(default_factory=dict)
    finished: Future[None] | None = None  # the latest load's follow-up
    parser: Any = None  # processes that parse the pages (see _parser_pool)
    parse_cpu_s: float = 0.0  # CPU time the parser's processes spent on this run's pages
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def finish_later(self, work: Callable[..., None], *args: Any) -> None:
        """Run a load's follow-up after the previous one's (one at a time, in order), while the
        caller goes on loading."""
        self.wait_finished()
        self.finished = self.finisher.submit(work, *args)

    def wait_finished(self) -> None:
        """Wait for the follow-ups handed over so far; their exception (a lost database) raises here."""
        if self.finished is not None:
            finished, self.finished = self.finished, None
            finished.result()

    @property
    def fatal(self) -> str | None:
        return self.fetcher.fatal

    def snapshot(self, day: date) -> datetime:
        return self.args.snapshot_time or snapshot_time(day)

    def client(self, day: date) -> Any:
        """The provider's client for `day` (historical providers are asked for the day by date)."""
        as_of = day if self.provider.historical else None
        with self._lock:
            if as_of not in self.clients:
                self.clients[as_of] = self.provider.config.client(
                    as_of, pool_size=self.args.concurrency, limiter=self.provider.limiter, parser=self.parser)
            return self.clients[as_of]

    def remember_expirations(self, result: Any) -> None:
        """Keep the (expiration, contracts) of a large fetched chain for slicing its next fetch."""
        if result.contracts < 2 * self.provider.config.slice_contracts or not result.tables:
            return
        import pyarrow as pa
        import pyarrow.compute as pc

        counts = pc.value_counts(pa.chunked_array([t.column("expiration_date") for t in result.tables]))
        pairs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
        with self._lock:
            self.expirations[result.symbol] = pairs

    def slices(self, conn: psycopg2.extensions.connection, symbols: Sequence[str],
               snapshot: datetime) -> dict[str, list[Any]]:
        """Expiration-range slices for the symbols whose latest chain is large (fetched earlier
        in this run, else stored): fetched as parallel request chains instead of one long
        pagination (see polygon.expiration_slices)."""
        from .polygon import expiration_slices

        size = self.provider.config.slice_contracts
        if size <= 0:
            return {}
        with self._lock:
            counts = {s: self.expirations[s] for s in symbols if s in self.expirations}
        unknown = {self.ticker_ids[s]: s for s in symbols if s not in counts}
        if unknown:
            stored = earlier_expirations(conn, list(unknown), snapshot, min_contracts=2 * size)
            conn.commit()
            counts |= {unknown[t]: c for t, c in stored.items()}
        slices = {s: expiration_slices(c, size) for s, c in counts.items()}
        for symbol, ranges in slices.items():
            if ranges:
                log.debug("%s: fetched as %d parallel expiration-range slices", symbol, len(ranges))
        return {s: r for s, r in slices.items() if r}


class _CopyCursor(psycopg2.extensions.cursor):
    """A cursor whose COPY FROM reads its file in COPY_CHUNK_BYTES chunks, whatever size is asked."""

    def copy_expert(self, sql: Any, file: Any, size: int = COPY_CHUNK_BYTES) -> None:
        super().copy_expert(sql, file, max(size, COPY_CHUNK_BYTES))


def _large_copy_chunks() -> None:
    """Make dlt's postgres connections use _CopyCursor. dlt's csv COPY asks for 8 kB chunks, and
    every chunk waits for the GIL, which the fetch threads hold most of the time: the COPY of a
    load took 1.6 s instead of 0.4 s (measured at 80,000 rows with 8 fetch threads). Process-wide
    and idempotent; nothing else about dlt's connections changes."""
    from dlt.destinations.impl.postgres.sql_client import Psycopg2SqlClient

    original = Psycopg2SqlClient.open_connection
    if getattr(original, "large_copy_chunks", False):
        return

    def open_connection(self: Any) -> Any:
        conn = original(self)
        conn.cursor_factory = _CopyCursor
        return conn

    open_connection.large_copy_chunks = True  # type: ignore[attr-defined]
    Psycopg2SqlClient.open_connection = open_connection  # type: ignore[method-assign]


def _pipeline(database: dbmod.Database, args: argparse.Namespace) -> Any:
    import dlt
    from dlt.common.runtime.collector import LogCollector, NullCollector

    _large_copy_chunks()
    pipelines_dir = getattr(args, "pipelines_dir", None) or Path.cwd() / dbmod.EMBEDDED_DIR / "dlt"
    progress = (LogCollector(log_period=2.0, logger=sys.stderr, dump_system_stats=False)
                if sys.stderr.isatty() and not args.quiet else NullCollector())
    from dlt.destinations.impl.postgres.configuration import PostgresCredentials

    credentials = PostgresCredentials(database.url())
    # The load files carry UTC timestamps without an offset (see polygon._column_hints): COPY
    # reads them in the session's time zone, pinned to UTC on every connection dlt opens.
    credentials.session_timezone = "UTC"
    pipeline = dlt.pipeline(
        pipeline_name=PIPELINE_NAME, pipelines_dir=str(pipelines_dir), dataset_name="public",
        destination=dlt.destinations.postgres(credentials=credentials), progress=progress,
    )
    if pipeline.has_pending_data:
        log.warning("discarding load packages left by an interrupted run (the ledger retries their symbols)")
        pipeline.abort_packages()
    return pipeline


def _symbol_line(outcome: SymbolOutcome, reasons: dict[str, int] | None = None) -> None:
    detail = ""
    if reasons:
        detail = " (" + ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) + ")"
    text = (f"{outcome.day} {outcome.symbol} {outcome.outcome.upper()} pages={outcome.pages} "
            f"contracts={outcome.contracts} rows_written={outcome.rows_written} "
            f"rejected={outcome.rejected}{detail} elapsed={outcome.elapsed_s:.2f}s")
    if outcome.error:
        log.error("%s error=%s", text, outcome.error)
    else:
        log.info("%s", text)


def _load(run: _Run, feed: _Feed, first: tuple[_Day, Any], min_rows: int, heartbeat: Heartbeat) -> None:
    """One dlt pipeline run over the symbols fetched by now (whatever their days), then hand the
    rest (rows written, ledger, lifecycle, log lines) to the finisher: the next load runs meanwhile."""
    from dlt.pipeline.exceptions import PipelineStepFailed

    from .polygon import options_chains

    taken: list[tuple[_Day, Any]] = []
    counts = {"ok": 0, "failed": 0}

    def on_chain(day: _Day, result: Any) -> None:
        taken.append((day, result))
        counts["ok" if result.ok else "failed"] += 1
        heartbeat.tick(day=day.outcome.day.isoformat(), ok=counts["ok"], failed=counts["failed"])

    load_ids: list[str] = []
    load_error = None
    try:
        # take() accounts for every result; the resource only writes the rows (it would log and
        # raise on failures without an on_chain of its own).
        resource = options_chains(feed.take(first, on_chain, min_rows), on_chain=lambda result: None)
        started = time.monotonic()
        load_ids = list(run.pipeline.run(resource).loads_ids)
        steps = " ".join(f"{step.step} {(step.finished_at - step.started_at).total_seconds():.2f}s"
                         for step in run.pipeline.last_trace.steps if step.finished_at)
        log.debug("load of %d symbols, %d contracts: %.2fs (%s)", len(taken), sum(r.contracts for _, r in taken),
                  time.monotonic() - started, steps)
    except PipelineStepFailed as exc:
        load_error = f"load failed at step {exc.step}: {type(exc.exception).__name__}: " + \
            " ".join(str(exc.exception).split())[:300]
        run.pipeline.abort_packages()
        _check_database(run.database)

    if run.parser is not None:
        run.parse_cpu_s += sum(result.parse_cpu_s for _, result in taken)
    outcomes: list[tuple[_Day, SymbolOutcome, Any]] = []
    for day, result in taken:
        error = result.error or load_error
        outcome = SymbolOutcome(day.outcome.day, result.symbol, "ok" if error is None else "failed", result.pages,
                                result.contracts, 0, result.rejected, error, round(result.elapsed, 3))
        day.outcome.symbols.append(outcome)
        outcomes.append((day, outcome, result))
    run.finish_later(_finish_load, run.finishing, outcomes, load_ids)


def _finish_load(conn: psycopg2.extensions.connection, outcomes: list[tuple[_Day, SymbolOutcome, Any]],
                 load_ids: list[str]) -> None:
    """After a load, on the finisher's connection: rows written per symbol, then ledger and
    lifecycle in one transaction (they agree), then the symbols' log lines and the END line of
    each day now complete."""
    by_snapshot: dict[datetime, list[tuple[SymbolOutcome, Any]]] = {}
    for day, outcome, result in outcomes:
        by_snapshot.setdefault(day.outcome.snapshot_time, []).append((outcome, result))
    with conn.cursor() as cur:
        for snapshot, group in sorted(by_snapshot.items()):
            written: dict[str, int] = {}
            if load_ids:  # the load's rows only (ticker_id, time index), not the whole day's so far
                cur.execute("select ticker_id::text, count(*) from options_chains where ticker_id = any(%s::uuid[])"
                            " and time = %s and _dlt_load_id = any(%s) group by 1",
                            ([r.ticker_id for _, r in group], snapshot, load_ids))
                written = dict(cur.fetchall())
            for outcome, result in group:
                if outcome.outcome == "ok":
                    outcome.rows_written = written.get(result.ticker_id, 0)
            update_lifecycle(cur, [r.ticker_id for o, r in group if o.outcome == "ok"], snapshot)
            for outcome, _ in group:
                _ledger_finish(cur, outcome, snapshot)
    conn.commit()
    for day, outcome, result in outcomes:
        _symbol_line(outcome, dict(result.reject_reasons))
        day.left -= 1
        if day.left == 0:
            _day_done(day)


def _check_database(database: dbmod.Database) -> None:
    """A failed load is the database's fault if it cannot be reached: then the run stops."""
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select 1")


def _day_done(day: _Day) -> None:
    """A day whose every symbol is finished: its outcome, and its END line."""
    result = day.outcome
    attempted = [s for s in result.symbols if s.outcome != "skipped"]
    result.outcome = "succeeded" if any(s.outcome == "ok" for s in attempted) else "failed"
    if result.outcome == "failed":
        result.error = "every symbol failed"
    log.info("day %s END %s: ok=%d failed=%d skipped=%d rows_written=%d", result.day, result.outcome,
             result.count("ok"), result.count("failed"), result.count("skipped"),
             sum(s.rows_written for s in result.symbols))


def plan_day(run: _Run, day: date, snapshot: datetime, symbols: Sequence[str]) -> _Day:
    """What a day needs: refused by the provider, or the symbols the ledger has not seen done."""
    result = DayOutcome(day, snapshot)
    refusal = run.provider.refusal(day, run.current)
    if refusal:
        log.error("%s refused: %s", day, refusal)
        result.outcome, result.error = "failed", refusal
        return _Day(result, [])
    done = {} if run.args.force else completed_symbols(run.work, symbols, snapshot)
    for symbol, finished in sorted(done.items()):
        log.debug("%s %s skipped: the ledger says (%s, %s) completed at %s (--force re-fetches)",
                  day, symbol, symbol, snapshot.isoformat(), finished)
        result.symbols.append(SymbolOutcome(day, symbol, "skipped"))
    todo = [s for s in symbols if s not in done]
    if not todo:
        log.info("%s: all %d symbols already completed, skipped", day, len(done))
    return _Day(result, todo, len(todo))


def ingest_days(run: _Run, days: Sequence[date], out: list[DayOutcome]) -> None:
    """Every symbol's chain for each day, stored under the day's snapshot time: the days' fetches
    run back to back through one pool, and each load takes whatever has been fetched. The days'
    outcomes go to `out` at once and fill in as the run goes (a lost database keeps what was done)."""
    plans = [plan_day(run, day, run.snapshot(day), run.symbols) for day in days]
    out.extend(plan.outcome for plan in plans)
    run.work.commit()
    dbmod.ensure_partitions(run.work, [p.outcome.snapshot_time for p in plans if p.todo])
    run.work.commit()
    heartbeat = Heartbeat(log, run.args.heartbeat, sum(len(p.todo) for p in plans), "symbols")
    feed = _Feed(run, plans)
    try:
        min_rows = LOAD_MIN_ROWS[0]
        while (first := feed.first()) is not None:
            _load(run, feed, first, min_rows, heartbeat)
            min_rows = min(2 * min_rows, LOAD_MIN_ROWS[1])
        run.wait_finished()  # every load's rows_written, ledger and lifecycle are written
    finally:
        feed.close()
    for plan in plans:
        plan.outcome.symbols.sort(key=lambda s: s.symbol)
        if run.fatal and plan.left:  # the run stopped before this day was done
            plan.outcome.outcome, plan.outcome.error = "failed", run.fatal
            with run.work.cursor() as cur:  # symbols marked running but never fetched
                cur.execute("update ingestion_ledger set status = 'failed', error = %s, finished_at = now()"
                            " where snapshot_time = %s and symbol = any(%s) and status = 'running'",
                            (f"not fetched: {run.fatal}", plan.outcome.snapshot_time, plan.todo[plan.submitted:]))
            run.work.commit()


# --- the command --------------------------------------------------------------------------------

def _summary(args: argparse.Namespace, provider: str, days: list[DayOutcome], started: datetime,
             duration: float, exit_code: int, error: str | None) -> dict[str, Any]:
    symbols = [s for d in days for s in d.symbols]
    return {
        "command": "ingest",
        "provider": provider,
        "mode": ("range" if args.start_date else "single-day") + (" ad-hoc" if args.symbols else ""),
        "started_at": started.isoformat(),
        "duration_s": round(duration, 3),
        "exit_code": exit_code,
        "error": error,
        "days_attempted": sum(1 for d in days if d.outcome != "skipped"),
        "days_succeeded": sum(1 for d in days if d.outcome == "succeeded"),
        "days_failed": sum(1 for d in days if d.outcome == "failed"),
        "days_skipped": sum(1 for d in days if d.outcome == "skipped"),
        "symbols_ok": sum(1 for s in symbols if s.outcome == "ok"),
        "symbols_failed": sum(1 for s in symbols if s.outcome == "failed"),
        "symbols_skipped": sum(1 for s in symbols if s.outcome == "skipped"),
        "rows_written": sum(s.rows_written for s in symbols),
        "rejected": sum(s.rejected for s in symbols),
        "days": [
            {"date": d.day.isoformat(), "snapshot_time": d.snapshot_time.isoformat(), "outcome": d.outcome,
             "error": d.error, "symbols_ok": d.count("ok"), "symbols_failed": d.count("failed"),
             "symbols_skipped": d.count("skipped"), "rows_written": sum(s.rows_written for s in d.symbols)}
            for d in days
        ],
        "symbols": [asdict(s) | {"day": s.day.isoformat()} for s in symbols],
    }


def _plan(args: argparse.Namespace, database: dbmod.Database, days: list[date], symbols: list[str]) -> None:
    current = latest_trading_date()
    with database.connect() as conn:
        for day in days:
            snapshot = args.snapshot_time or snapshot_time(day)
            if args.provider == "polygon" and day != current:
                log.log(SUMMARY, "dry run: %s would be refused (the live snapshot has no history)", day)
                continue
            done = {} if args.force else completed_symbols(conn, symbols, snapshot)
            log.log(SUMMARY, "dry run: %s snapshot %s: %d symbols to fetch, %d already completed",
                    day, snapshot.isoformat(), len(symbols) - len(done), len(done))
    log.log(SUMMARY, "dry run: symbols %s; nothing fetched or written", ", ".join(symbols) or "(none)")


def run(args: argparse.Namespace) -> int:
    """`kapman ingest` / `dlt pipeline run`; returns the exit code."""
    started_at, started = datetime.now(UTC), time.monotonic()
    days_out: list[DayOutcome] = []
    provider_name = args.provider
    error: str | None = None
    cpu: dict[str, float] = {}  # CPU seconds spent outside this process: "parse" (see _parser_pool)
    try:
        database = dbmod.resolve(args.db_url)
        dbmod.upgrade(database)
        days = resolve_days(args)
        with database.connect() as conn:
            symbols = select_symbols(conn, args.symbols)
        mode = "range" if args.start_date else "single day"
        span = f"{days[0]}..{days[-1]}" if len(days) > 1 else (str(days[0]) if days else "(no trading days)")
        log.log(SUMMARY, "ingest START mode=%s%s as_of=%s days=%d symbols=%d provider=%s concurrency=%d",
                mode, " (ad-hoc --symbols)" if args.symbols else "", span, len(days), len(symbols),
                args.provider, args.concurrency)
        if args.dry_run:
            _plan(args, database, days, symbols)
            return EXIT_OK
        if not symbols and args.symbols:
            raise IngestError("none of the requested --symbols is on an active watchlist")
        if not symbols:
            log.warning("no active watchlist symbols: nothing to ingest (load some with `kapman watchlists load`)")
        exit_code = _run_days(args, database, days, symbols, days_out, cpu) if days and symbols else EXIT_OK
        if exit_code:
            failed = [d for d in days_out if d.outcome == "failed"]
            error = "every day failed" if len(failed) > 1 else f"{failed[0].day} failed: {failed[0].error}"
            log.error("%s", error)
    except IngestError as exc:
        error, exit_code = str(exc), EXIT_FAILED
        log.error("%s", exc)
    except dbmod.DatabaseError as exc:
        error, exit_code = str(exc), EXIT_FAILED
        _finish(args, provider_name, days_out, started_at, started, exit_code, error, cpu)
        raise
    except dbmod.LockHeld:
        raise
    _finish(args, provider_name, days_out, started_at, started, exit_code, error, cpu)
    return exit_code


@contextlib.contextmanager
def _parser_pool() -> Iterator[ProcessPoolExecutor | None]:
    """Processes that parse and normalise the pages (JSON to Arrow, about 10 µs a contract): in the
    fetch threads that work held the GIL most of the time, starving the loads' Python side. Forked
    from a forkserver that has imported the source's code, so a worker starts in milliseconds."""
    if PARSE_PROCESSES < 1:
        yield None
        return
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["loaders.polygon.helpers"])
    pool = ProcessPoolExecutor(PARSE_PROCESSES, mp_context=context)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _run_days(args: argparse.Namespace, database: dbmod.Database, days: list[date], symbols: list[str],
              days_out: list[DayOutcome], cpu: dict[str, float]) -> int:
    from .polygon import ChainFetcher

    with database.connect(autocommit=True) as lock_conn, dbmod.advisory_lock(lock_conn, "ingest") as got:
        if not got:
            raise dbmod.LockHeld(f"another ingestion holds the 'ingest' lock ({_lock_holder(lock_conn)}): "
                                 "nothing written; try again when it has finished")
        try:
            with (_parser_pool() as parser, open_provider(args.provider) as provider, database.connect() as work,
                  database.connect() as finishing, ChainFetcher(args.concurrency) as fetcher,
                  ThreadPoolExecutor(1, thread_name_prefix="finisher") as finisher):
                run = _Run(args, database, work, provider, ensure_tickers(work, symbols),
                           _pipeline(database, args), fetcher, symbols, latest_trading_date(), finishing, finisher,
                           parser=parser)
                work.commit()
                try:
                    ingest_days(run, days, days_out)
                finally:
                    cpu["parse"] = run.parse_cpu_s
                if run.fatal:
                    raise IngestError(f"run stopped: {run.fatal}")
        except (psycopg2.OperationalError, psycopg2.InterfaceError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise dbmod.DatabaseError(f"lost {database.display}: {first}") from None
    attempted = [d for d in days_out if d.outcome != "skipped"]
    if attempted and all(d.outcome == "failed" for d in attempted):
        return EXIT_FAILED
    return EXIT_OK


def _lock_holder(conn: psycopg2.extensions.connection) -> str:
    key = dbmod.LOCK_IDS["ingest"]
    with conn.cursor() as cur:
        cur.execute(
            "select a.pid, a.backend_start, a.client_addr from pg_locks l join pg_stat_activity a using (pid)"
            " where l.locktype = 'advisory' and l.granted and l.classid = %s and l.objid = %s limit 1",
            (key >> 32, key & 0xFFFFFFFF),
        )
        row = cur.fetchone()
    lock = f"PostgreSQL advisory lock {key}"
    return f"{lock}, held by backend pid {row[0]} since {row[1]:%Y-%m-%d %H:%M:%S}" if row else lock


def _finish(args: argparse.Namespace, provider: str, days: list[DayOutcome], started_at: datetime,
            started: float, exit_code: int, error: str | None, cpu: dict[str, float]) -> None:
    duration = time.monotonic() - started
    summary = _summary(args, provider, days, started_at, duration, exit_code, error)
    # the parser processes' CPU, which this process's own CPU time does not include
    summary["parse_process_cpu_s"] = round(cpu.get("parse", 0.0), 3)
    log.log(
        SUMMARY,
        "ingest END %s: days attempted=%d succeeded=%d failed=%d skipped=%d; symbols ok=%d failed=%d "
        "skipped=%d; rows_written=%d rejected=%d; %.1fs",
        "failed" if exit_code else "finished", summary["days_attempted"], summary["days_succeeded"],
        summary["days_failed"], summary["days_skipped"], summary["symbols_ok"], summary["symbols_failed"],
        summary["symbols_skipped"], summary["rows_written"], summary["rejected"], duration,
    )
    if args.summary_json:
        path = Path(args.summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
