"""`kapman ingest`: option-chain snapshots of the watchlist symbols into options_chains, day by day.

The run (this module): which days and symbols, the lock, the dry run, the exit code and the
summary. The rest, one job per module: `providers` (where chains come from), `flow` (fetch,
buffer, load), `pipeline` (dlt), `ledger` (the ledger and the contract lifecycle, their only
writer), `outcomes` (per-symbol results and the summary). HTTP, paging and rows: loaders/polygon.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import multiprocessing
import os
import re
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime

import psycopg2
import psycopg2.extensions

from .. import db as dbmod
from ..logs import SUMMARY
from ..polygon import ProviderError, polygon_configuration
from ..trading_calendar import is_trading_day, latest_trading_date, snapshot_time, trading_days
from . import flow, history, pipeline
from .ledger import Ledger, completed_symbols, snapshot_symbols
from .outcomes import DayOutcome, IngestError, report, summary
from .providers import PROVIDERS, open_provider

__all__ = ["IngestError", "ensure_tickers", "resolve_days", "run", "select_symbols"]

log = logging.getLogger("kapman.ingest")

PARSE_PROCESSES = 2  # processes that parse pages (0: in the fetch threads); see _parser_pool
# Plausible tickers: AAPL, BRK.B, I:SPX. Anything else never reaches a URL.
SYMBOL_RE = re.compile(r"^(?:I:)?[A-Z][A-Z0-9]{0,9}(?:\.[A-Z0-9]{1,4})?$")
EXIT_OK, EXIT_FAILED = 0, 1


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


def _skips_completed(args: argparse.Namespace) -> bool:
    """Whether the ledger's completed pairs are skipped: in a range (story A1.1), unless --force.
    A single-day run fetches every symbol again and updates what changed (story A1)."""
    return bool(args.start_date) and not args.force


def _dry_run(args: argparse.Namespace, database: dbmod.Database, days: list[date], symbols: list[str]) -> None:
    current = latest_trading_date()
    provider = PROVIDERS[args.provider]
    rebuilt: dict[date, list[str]] = {}  # the (day, symbols) a reconstruction would fetch
    with database.connect() as conn:
        for day in days:
            snapshot = args.snapshot_time or snapshot_time(day)
            refusal = provider.refusal(day, current)
            if refusal:
                log.log(SUMMARY, "dry run: %s would be refused: %s", day, refusal)
                continue
            done = completed_symbols(conn, symbols, snapshot) if _skips_completed(args) else {}
            if provider.reconstructs(day, current):  # never over a snapshot's rows
                done |= dict.fromkeys(snapshot_symbols(conn, [s for s in symbols if s not in done], snapshot))
                rebuilt[day] = [s for s in symbols if s not in done]
            log.log(SUMMARY, "dry run: %s snapshot %s: %d symbols to fetch%s, %d already completed or kept",
                    day, snapshot.isoformat(), len(symbols) - len(done),
                    " (reconstructed)" if provider.reconstructs(day, current) else "", len(done))
    if any(rebuilt.values()):
        _estimate(rebuilt)
    log.log(SUMMARY, "dry run: symbols %s; nothing written%s", ", ".join(symbols) or "(none)",
            "" if any(rebuilt.values()) else " or fetched")


def _estimate(rebuilt: dict[date, list[str]]) -> None:
    """The requests and time a reconstruction needs (it fetches the reference pages to count)."""
    config = polygon_configuration()
    if not config.polygon_api_key:
        log.warning("dry run: counting a reconstruction's requests fetches the reference pages: set POLYGON_API_KEY")
        return
    try:
        history.estimate(config, rebuilt)
    except ProviderError as exc:
        raise IngestError(str(exc)) from None


def run(args: argparse.Namespace) -> int:
    """`kapman ingest` / `dlt pipeline run`; returns the exit code."""
    started_at, started = datetime.now(UTC), time.monotonic()
    days_out: list[DayOutcome] = []
    cpu = [0.0]  # CPU seconds of the page-parsing processes (see _parser_pool)
    try:
        # Before any database connection or thread exists (see _parser_pool).
        with _parser_pool(0 if args.dry_run else PARSE_PROCESSES) as parser:
            ran = _run(args, parser, days_out, cpu)
        if ran is None:  # a dry run
            return EXIT_OK
        exit_code, error = ran
    except IngestError as exc:
        error, exit_code = str(exc), EXIT_FAILED
        log.error("%s", exc)
    except dbmod.DatabaseError as exc:
        _finish(args, days_out, started_at, started, EXIT_FAILED, str(exc), cpu[0])
        raise
    _finish(args, days_out, started_at, started, exit_code, error, cpu[0])
    return exit_code


def _run(args: argparse.Namespace, parser: ProcessPoolExecutor | None, days_out: list[DayOutcome],
         cpu: list[float]) -> tuple[int, str | None] | None:
    """The run after its start: (exit code, error), None for a dry run."""
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
        _dry_run(args, database, days, symbols)
        return None
    if not symbols and args.symbols:
        raise IngestError("none of the requested --symbols is on an active watchlist")
    if not symbols:
        log.warning("no active watchlist symbols: nothing to ingest (load some with `kapman watchlists load`)")
    exit_code = _run_days(args, parser, database, days, symbols, days_out, cpu) if days and symbols else EXIT_OK
    if not exit_code:
        return exit_code, None
    failed = [d for d in days_out if d.outcome == "failed"]
    error = "every day failed" if len(failed) > 1 else f"{failed[0].day} failed: {failed[0].error}"
    log.error("%s", error)
    return exit_code, error


def _finish(args: argparse.Namespace, days: list[DayOutcome], started_at: datetime, started: float,
            exit_code: int, error: str | None, parse_cpu_s: float) -> None:
    report(args, summary(args, days, started_at, time.monotonic() - started, exit_code, error, parse_cpu_s))


@contextlib.contextmanager
def _parser_pool(processes: int) -> Iterator[ProcessPoolExecutor | None]:
    """Processes that parse and normalise the pages (JSON to Arrow, about 10 µs a contract): in the
    fetch threads that work held the GIL most of the time, starving the loads' Python side.

    Forked, all at once, while this process has no other thread and no connection (a fork then
    inherits no lock another thread holds, and no socket that would outlive a killed run, such as
    the connection holding the ingest lock): a forked worker has every module already, where a
    forkserver first imports the source's code and dlt (about 1 s of CPU, which the run's first
    pages waited for). Called with other threads running (a test's), a forkserver is the safe way."""
    if processes < 1:
        yield None
        return
    if threading.active_count() == 1:
        pool = ProcessPoolExecutor(processes, multiprocessing.get_context("fork"), _end_with_parent, (os.getpid(),))
        pool.submit(int).result()  # forks every worker now (fork: all of them on the first task)
    else:
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["loaders.polygon.rows"])
        pool = ProcessPoolExecutor(processes, context, _end_with_parent, (0,))  # its parent: the forkserver
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _end_with_parent(parent: int) -> None:
    """A parser process ends when the process that started it does, killed or not: an orphan
    would wait for pages forever (Linux; elsewhere it stays until the machine restarts).
    `parent`: the pid that forked it, if known (0: a forkserver did)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _run_days(args: argparse.Namespace, parser: ProcessPoolExecutor | None, database: dbmod.Database,
              days: list[date], symbols: list[str], days_out: list[DayOutcome], cpu: list[float]) -> int:
    from ..polygon import ChainFetcher

    with database.connect(autocommit=True) as lock_conn, dbmod.advisory_lock(lock_conn, "ingest") as got:
        if not got:
            raise dbmod.LockHeld(f"another ingestion holds the 'ingest' lock ({_lock_holder(lock_conn)}): "
                                 "nothing written; try again when it has finished")
        try:
            with (open_provider(args.provider, latest_trading_date(), args.concurrency, parser) as provider,
                  database.connect() as work, database.connect() as ledger_conn, Ledger(ledger_conn) as ledger,
                  ChainFetcher(args.concurrency) as fetcher):
                run_ = flow.Run(args, database, work, provider, ensure_tickers(work, symbols),
                                pipeline.make_pipeline(database, args.quiet), fetcher, ledger, symbols)
                work.commit()
                plans = [flow.plan_day(run_, day, args.snapshot_time or snapshot_time(day), _skips_completed(args))
                         for day in days]
                days_out.extend(plan.outcome for plan in plans)  # filled in as the run goes
                provider.plan({plan.outcome.day: plan.todo for plan in plans if plan.todo})
                run_.work.commit()
                try:
                    flow.ingest_days(run_, plans)
                finally:
                    cpu[0] = run_.parse_cpu_s
                if run_.fatal:
                    raise IngestError(f"run stopped: {run_.fatal}")
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
