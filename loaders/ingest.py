"""`kapman ingest`: option-chain snapshots of the watchlist symbols into options_chains, day by day.

Orchestration only: which days and symbols, the lock, the ledger, the provider, one dlt pipeline
run per batch of symbols, then the contract lifecycle and the run summary. HTTP, paging and
normalisation live in the dlt source (loaders/polygon).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
LOAD_BATCH_SYMBOLS = 50  # symbols fetched per dlt pipeline run (a load) within a day, at most
FIRST_BATCH_SYMBOLS = 8  # the first load's: see load_batches
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


def update_lifecycle(cur: psycopg2.extensions.cursor, seen: Mapping[str, Sequence[str]],
                     snapshot: datetime) -> None:
    """After successful fetches at `snapshot` (tickers.id -> the contract tickers its chain had):
    contracts seen are active (reactivated if they had gone), the symbols' other contracts last
    seen before `snapshot` are deactivated. A snapshot older than what a contract already records
    (a later sighting or deactivation) changes only its first/last seen times. Nothing is deleted.
    The same state whatever order the snapshots are stored in. Three statements for any number of
    symbols (a batch's): per-symbol statements cost more."""
    if not seen:
        return
    contracts = [ticker for tickers in seen.values() for ticker in tickers]
    cur.execute(
        "insert into option_contracts as oc (contract_ticker, ticker_id, expiration_date, strike_price,"
        " option_type, first_seen_at, last_seen_at, active)"
        " select c.contract_ticker, c.ticker_id, c.expiration_date, c.strike_price, c.option_type,"
        " c.time, c.time, true from options_chains c where c.time = %(t)s and c.contract_ticker = any(%(seen)s)"
        " on conflict (contract_ticker) do update set"
        " first_seen_at = least(oc.first_seen_at, excluded.first_seen_at),"
        " last_seen_at = greatest(oc.last_seen_at, excluded.last_seen_at),"
        " active = oc.active or %(t)s >= coalesce(oc.deactivated_at, oc.last_seen_at),"
        " deactivated_at = case when %(t)s >= coalesce(oc.deactivated_at, oc.last_seen_at) then null"
        " else oc.deactivated_at end"
        " where not oc.active or %(t)s > oc.last_seen_at or %(t)s < oc.first_seen_at",
        {"t": snapshot, "seen": contracts},
    )
    # A day stored late (retried after a failure, or a backfill) gives the state the days would have
    # given in order: it is the earlier snapshot that saw a contract gone (deactivated_at moves back
    # to it), and a contract it saw last is gone from the symbol's next snapshot already stored.
    cur.execute(
        "update option_contracts set active = false, deactivated_at = %(t)s"
        " where ticker_id = any(%(tids)s::uuid[]) and last_seen_at < %(t)s"
        " and (active or deactivated_at > %(t)s)",
        {"t": snapshot, "tids": list(seen)},
    )
    cur.execute(
        "update option_contracts oc set active = false, deactivated_at = later.time"
        " from unnest(%(tids)s::uuid[]) as b (ticker_id) cross join lateral (select c.time from options_chains c"
        " where c.ticker_id = b.ticker_id and c.time > %(t)s order by c.time limit 1) as later"
        " where oc.ticker_id = b.ticker_id and oc.last_seen_at = %(t)s and oc.contract_ticker = any(%(seen)s)",
        {"t": snapshot, "tids": list(seen), "seen": contracts},
    )


def load_batches(symbols: Sequence[str]) -> list[list[str]]:
    """The day's symbols in load batches of FIRST_BATCH_SYMBOLS, twice that, and so on up to
    LOAD_BATCH_SYMBOLS. Nothing is loaded until a batch is fetched, and each load overlaps the
    fetching of the next batch: a small first batch starts the database's work early."""
    batches: list[list[str]] = []
    size = min(FIRST_BATCH_SYMBOLS, LOAD_BATCH_SYMBOLS)
    start = 0
    while start < len(symbols):
        batches.append(list(symbols[start:start + size]))
        start += size
        size = min(2 * size, LOAD_BATCH_SYMBOLS)
    return batches


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
class _DayPlan:
    refusal: str | None
    done: dict[str, datetime]  # symbol -> when the ledger says it completed
    batches: list[list[str]]


@dataclass
class _Run:
    """One run's state. Fetches go through one pool, a batch ahead of the loads: while a batch
    loads, the next one (of the same day, or the next day's first) is already being fetched, and
    the previous one's follow-up (ledger, lifecycle) runs in the finisher thread."""

    args: argparse.Namespace
    database: dbmod.Database
    work: psycopg2.extensions.connection
    provider: Provider
    ticker_ids: dict[str, str]
    pipeline: Any
    fetcher: Any  # polygon.ChainFetcher
    days: list[date]
    symbols: list[str]
    current: date
    finishing: psycopg2.extensions.connection  # the finisher's own connection
    finisher: ThreadPoolExecutor  # one thread: each batch's follow-up, in order
    plans: dict[date, _DayPlan] = field(default_factory=dict)
    submitted: dict[tuple[date, tuple[str, ...]], list[Any]] = field(default_factory=dict)
    clients: dict[date | None, Any] = field(default_factory=dict)
    finished: Future[None] | None = None  # the latest batch's follow-up

    def finish_later(self, work: Callable[..., None], *args: Any) -> None:
        """Run a batch's follow-up after the previous batch's (one at a time, in order), while
        the caller goes on loading."""
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

    def plan(self, day: date) -> _DayPlan:
        """What the day needs: refused by the provider, or the symbols the ledger has not seen done."""
        if day not in self.plans:
            refusal = self.provider.refusal(day, self.current)
            done = {} if refusal or self.args.force else completed_symbols(self.work, self.symbols, self.snapshot(day))
            todo = [s for s in self.symbols if s not in done] if not refusal else []
            batches = load_batches(todo)
            self.plans[day] = _DayPlan(refusal, done, batches)
        return self.plans[day]

    def submit(self, day: date, batch: Sequence[str]) -> list[Any]:
        """The futures of one batch's fetches: started ahead by prefetch_after, or now."""
        return self.submitted.pop((day, tuple(batch)), None) or self._start(day, batch)

    def prefetch_after(self, day: date, index: int) -> None:
        """Start the batch after this one: the day's next, else the next day's first."""
        if self.fatal:
            return
        batches = self.plan(day).batches
        if index + 1 < len(batches):
            day_after, batch = day, batches[index + 1]
        else:
            later = [d for d in self.days if d > day][:1]
            if not later or not self.plan(later[0]).batches:
                return
            day_after, batch = later[0], self.plan(later[0]).batches[0]
        if (day_after, tuple(batch)) not in self.submitted:
            self.submitted[(day_after, tuple(batch))] = self._start(day_after, batch)

    def _start(self, day: date, batch: Sequence[str]) -> list[Any]:
        snapshot = self.snapshot(day)
        with self.work.cursor() as cur:
            _ledger_running(cur, batch, snapshot)  # until its outcome is known
        self.work.commit()
        as_of = day if self.provider.historical else None
        if as_of not in self.clients:
            self.clients[as_of] = self.provider.config.client(as_of, pool_size=self.args.concurrency,
                                                              limiter=self.provider.limiter)
        tickers = {s: self.ticker_ids[s] for s in batch}
        return self.fetcher.submit(self.clients[as_of], tickers, snapshot,
                                   slices=self._slices(tickers, snapshot))

    def _slices(self, tickers: dict[str, str], snapshot: datetime) -> dict[str, list[Any]]:
        """Expiration-range slices for the symbols whose latest stored chain is large: fetched as
        parallel request chains instead of one long pagination (see polygon.expiration_slices)."""
        from .polygon import expiration_slices

        size = self.provider.config.slice_contracts
        if size <= 0:
            return {}
        counts = earlier_expirations(self.work, list(tickers.values()), snapshot, min_contracts=2 * size)
        self.work.commit()
        slices = {s: expiration_slices(counts[t], size) for s, t in tickers.items() if t in counts}
        for symbol, ranges in slices.items():
            if ranges:
                log.debug("%s: fetched as %d parallel expiration-range slices", symbol, len(ranges))
        return {s: r for s, r in slices.items() if r}


def _pipeline(database: dbmod.Database, args: argparse.Namespace) -> Any:
    import dlt
    from dlt.common.runtime.collector import LogCollector, NullCollector

    # dlt stamps the rows a load inserts or changes (unchanged ones are skipped by the upsert).
    dlt.config[f"{PIPELINE_NAME}.normalize.parquet_normalizer.add_dlt_load_id"] = True
    # Plain csv for COPY: gzip costs more CPU than it saves on a local load (normalize: 2 s -> 1 s per 75k rows).
    dlt.config[f"{PIPELINE_NAME}.normalize.data_writer.disable_compression"] = True
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


def _load_batch(run: _Run, day: date, snapshot: datetime, batch: Sequence[str], futures: list[Any],
                heartbeat: Heartbeat) -> list[SymbolOutcome]:
    """Load one batch of fetched (or being fetched) symbols in one dlt pipeline run, then hand
    the rest (rows written, ledger, lifecycle, log lines) to the finisher: the next batch loads
    meanwhile. The outcomes' rows_written are set once run.wait_finished() returns."""
    from dlt.pipeline.exceptions import PipelineStepFailed

    from .polygon import ChainResult, options_chains

    results: dict[str, ChainResult] = {}
    counts = {"ok": 0, "failed": 0}

    def on_chain(result: ChainResult) -> None:
        results[result.symbol] = result
        counts["ok" if result.ok else "failed"] += 1
        heartbeat.tick(day=day.isoformat(), ok=counts["ok"], failed=counts["failed"])

    load_ids: list[str] = []
    load_error = None
    try:
        load_ids = list(run.pipeline.run(options_chains(run.fetcher.completed(futures), on_chain)).loads_ids)
    except PipelineStepFailed as exc:
        load_error = f"load failed at step {exc.step}: {type(exc.exception).__name__}: " + \
            " ".join(str(exc.exception).split())[:300]
        run.pipeline.abort_packages()
        _check_database(run.database)

    outcomes: list[tuple[SymbolOutcome, ChainResult]] = []
    for symbol in batch:
        result = results.get(symbol) or ChainResult(symbol, run.ticker_ids[symbol], error="not fetched")
        error = result.error or load_error
        outcomes.append((SymbolOutcome(
            day, symbol, "ok" if error is None else "failed", result.pages, result.contracts, 0,
            result.rejected, error, round(result.elapsed, 3),
        ), result))
    run.finish_later(_finish_batch, run.finishing, snapshot, outcomes, load_ids)
    return [outcome for outcome, _ in outcomes]


def _finish_batch(conn: psycopg2.extensions.connection, snapshot: datetime,
                  outcomes: list[tuple[SymbolOutcome, Any]], load_ids: list[str]) -> None:
    """After a batch's load, on the finisher's connection: rows written per symbol, then ledger
    and lifecycle in one transaction (they agree), then the symbols' log lines."""
    written: dict[str, int] = {}
    with conn.cursor() as cur:
        if load_ids:  # the batch's rows only (ticker_id, time index), not the whole day's so far
            cur.execute("select ticker_id::text, count(*) from options_chains where ticker_id = any(%s::uuid[])"
                        " and time = %s and _dlt_load_id = any(%s) group by 1",
                        ([r.ticker_id for _, r in outcomes], snapshot, load_ids))
            written = dict(cur.fetchall())
        for outcome, result in outcomes:
            if outcome.outcome == "ok":
                outcome.rows_written = written.get(result.ticker_id, 0)
        update_lifecycle(cur, {r.ticker_id: r.contract_tickers for o, r in outcomes if o.outcome == "ok"},
                         snapshot)
        for outcome, _ in outcomes:
            _ledger_finish(cur, outcome, snapshot)
    conn.commit()
    for outcome, result in outcomes:
        _symbol_line(outcome, dict(result.reject_reasons))


def _check_database(database: dbmod.Database) -> None:
    """A failed load is the database's fault if it cannot be reached: then the run stops."""
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select 1")


def ingest_day(run: _Run, day: date, snapshot: datetime, symbols: Sequence[str]) -> DayOutcome:
    """The single-day path: every symbol's chain for `day`, stored under `snapshot`."""
    result = DayOutcome(day, snapshot)
    plan = run.plan(day)
    if plan.refusal:
        log.error("%s refused: %s", day, plan.refusal)
        result.outcome, result.error = "failed", plan.refusal
        return result
    for symbol, finished in sorted(plan.done.items()):
        log.debug("%s %s skipped: the ledger says (%s, %s) completed at %s (--force re-fetches)",
                  day, symbol, symbol, snapshot.isoformat(), finished)
        result.symbols.append(SymbolOutcome(day, symbol, "skipped"))
    if not plan.batches:
        log.info("%s: all %d symbols already completed, skipped", day, len(symbols))
        return result
    dbmod.ensure_partitions(run.work, [snapshot])
    run.work.commit()
    heartbeat = Heartbeat(log, run.args.heartbeat, sum(map(len, plan.batches)), "symbols")
    for index, batch in enumerate(plan.batches):
        if run.fatal:
            break
        futures = run.submit(day, batch)
        run.prefetch_after(day, index)
        result.symbols.extend(_load_batch(run, day, snapshot, batch, futures, heartbeat))
    run.wait_finished()  # the day's rows_written, ledger and lifecycle are complete
    attempted = [s for s in result.symbols if s.outcome != "skipped"]
    if run.fatal:
        result.outcome, result.error = "failed", run.fatal
    elif attempted:
        result.outcome = "succeeded" if any(s.outcome == "ok" for s in attempted) else "failed"
        if result.outcome == "failed":
            result.error = "every symbol failed"
    return result


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
        exit_code = _run_days(args, database, days, symbols, days_out) if days and symbols else EXIT_OK
        if exit_code:
            failed = [d for d in days_out if d.outcome == "failed"]
            error = "every day failed" if len(failed) > 1 else f"{failed[0].day} failed: {failed[0].error}"
            log.error("%s", error)
    except IngestError as exc:
        error, exit_code = str(exc), EXIT_FAILED
        log.error("%s", exc)
    except dbmod.DatabaseError as exc:
        error, exit_code = str(exc), EXIT_FAILED
        _finish(args, provider_name, days_out, started_at, started, exit_code, error)
        raise
    except dbmod.LockHeld:
        raise
    _finish(args, provider_name, days_out, started_at, started, exit_code, error)
    return exit_code


def _run_days(args: argparse.Namespace, database: dbmod.Database, days: list[date], symbols: list[str],
              days_out: list[DayOutcome]) -> int:
    from .polygon import ChainFetcher

    with database.connect(autocommit=True) as lock_conn, dbmod.advisory_lock(lock_conn, "ingest") as got:
        if not got:
            raise dbmod.LockHeld(f"another ingestion holds the 'ingest' lock ({_lock_holder(lock_conn)}): "
                                 "nothing written; try again when it has finished")
        try:
            with (open_provider(args.provider) as provider, database.connect() as work,
                  database.connect() as finishing, ChainFetcher(args.concurrency) as fetcher,
                  ThreadPoolExecutor(1, thread_name_prefix="finisher") as finisher):
                run = _Run(args, database, work, provider, ensure_tickers(work, symbols),
                           _pipeline(database, args), fetcher, days, symbols, latest_trading_date(),
                           finishing, finisher)
                work.commit()
                for day in days:
                    snapshot = run.snapshot(day)
                    log.info("day %s START snapshot_time=%s", day, snapshot.isoformat())
                    outcome = ingest_day(run, day, snapshot, symbols)
                    days_out.append(outcome)
                    log.info("day %s END %s: ok=%d failed=%d skipped=%d rows_written=%d", day, outcome.outcome,
                             outcome.count("ok"), outcome.count("failed"), outcome.count("skipped"),
                             sum(s.rows_written for s in outcome.symbols))
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
            started: float, exit_code: int, error: str | None) -> None:
    duration = time.monotonic() - started
    summary = _summary(args, provider, days, started_at, duration, exit_code, error)
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
