"""The flow of a run: the feeder keeps the fetch pool busy, fetched chains wait in a bounded buffer,
each load (one dlt pipeline run) takes what has been fetched by then, and the ledger's thread
finishes each load (rows written, ledger, lifecycle) while the next one runs."""

from __future__ import annotations

import argparse
import functools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import psycopg2.extensions

from .. import db as dbmod
from ..logs import Heartbeat
from ..polygon import ChainFetcher, ChainResult, SlicePlanner
from ..polygon.slicing import ExpirationCounts
from . import pipeline
from .ledger import Ledger, completed_symbols, earlier_expirations, snapshot_symbols
from .outcomes import DayOutcome, SymbolOutcome, symbol_line
from .providers import Provider

log = logging.getLogger("kapman.ingest")

# A load (one dlt pipeline run) takes the symbols fetched by the time it starts, at most these:
LOAD_BATCH_SYMBOLS = 50
LOAD_ROWS = 250_000
# ... and waits for fetches until it has this many rows: the first load's few (the database
# starts early), then LOAD_GROWTH times the previous load's up to the last. A load costs about
# 0.5 s of dlt's Python whatever its size (most of it resolving its configuration again), so
# loads of what happened to be fetched were many and small; 200,000 contracts take four. Larger
# loads still would leave a longer load after the last fetch (measured: no faster).
LOAD_MIN_ROWS = (10_000, 120_000)
LOAD_GROWTH = 3
# Fetched rows waiting for a load, at most: no new fetch starts beyond it (memory stays flat).
BUFFER_ROWS = 150_000


@dataclass
class DayPlan:
    """One day of the run: its outcome so far and the symbols still to be finished."""

    outcome: DayOutcome
    todo: list[str]
    left: int = 0  # symbols not yet finished (ledger and lifecycle written)
    submitted: int = 0  # todo[:submitted] went to the fetch pool


@dataclass
class Run:
    """One run's state: its settings, provider, fetch pool, pipeline and ledger."""

    args: argparse.Namespace
    database: dbmod.Database
    work: psycopg2.extensions.connection  # the main thread's
    provider: Provider
    ticker_ids: dict[str, str]
    pipeline: Any
    fetcher: ChainFetcher
    ledger: Ledger
    symbols: list[str]  # sorted
    planner: SlicePlanner = field(init=False)
    parse_cpu_s: float = 0.0  # CPU time the parser's processes spent on this run's pages

    def __post_init__(self) -> None:
        self.planner = SlicePlanner(self.provider.slice_contracts)

    @property
    def fatal(self) -> str | None:
        return self.fetcher.fatal

    def stored_expirations(self, conn: psycopg2.extensions.connection, snapshot: datetime,
                           symbols: Sequence[str]) -> dict[str, ExpirationCounts]:
        """The expirations of the symbols' latest stored chains large enough to slice."""
        ids = {self.ticker_ids[s]: s for s in symbols}
        stored = earlier_expirations(conn, list(ids), snapshot, 2 * self.planner.slice_contracts)
        conn.commit()
        return {ids[t]: counts for t, counts in stored.items()}


class Feed:
    """Keeps the fetch pool busy from a thread of its own, whatever the loads are doing.

    The days' symbols go to the pool in order, at most `concurrency` at a time and none while
    BUFFER_ROWS fetched rows wait for a load (memory stays flat however large the day or the
    range). Finished fetches queue up; each load takes what has been fetched by then (see `take`),
    so a load runs while the next symbols are fetched, and a slow load makes the next one larger.
    """

    def __init__(self, run: Run, days: list[DayPlan]) -> None:
        self.run, self.days = run, days
        self._ready: queue.SimpleQueue[tuple[DayPlan, ChainResult]] = queue.SimpleQueue()
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
                    run.ledger.running(day.todo, snapshot)  # until each outcome is known
                    log.info("day %s START snapshot_time=%s symbols=%d", day.outcome.day, snapshot.isoformat(),
                             len(day.todo))
                    client = run.provider.chains(day.outcome.day)
                    slices = (run.planner.plan(day.todo, functools.partial(run.stored_expirations, conn, snapshot))
                              if run.provider.slices(day.outcome.day) else {})
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

    def _fetched(self, day: DayPlan, symbol: str, future: Any) -> None:
        try:
            result = future.result()
        except Exception as exc:  # noqa: BLE001 (a bug merging slices: this symbol fails, the run goes on)
            result = ChainResult(symbol, self.run.ticker_ids[symbol], error=f"{type(exc).__name__}: {exc}")
        rows = result.contracts
        if result.ok:
            self.run.planner.remember(result)
        with self._cond:
            self._in_flight -= 1
            self._buffered += rows
            self._cond.notify_all()
        self._ready.put((day, result))

    def _next(self, block: bool) -> tuple[DayPlan, ChainResult] | None:
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

    def first(self) -> tuple[DayPlan, ChainResult] | None:
        """The next fetched symbol, waiting for it; None when every symbol has been taken."""
        return self._next(block=True)

    def take(self, first: tuple[DayPlan, ChainResult], on_chain: Callable[[DayPlan, Any], None], min_rows: int) -> Iterator[Any]:
        """One load's results: `first`, then the next ones as they are fetched until `min_rows`
        rows (or nothing more will come), then those fetched by then, up to LOAD_ROWS rows and
        LOAD_BATCH_SYMBOLS symbols."""
        rows = symbols = 0
        item: tuple[DayPlan, ChainResult] | None = first
        while item is not None:
            day, result = item
            on_chain(day, result)
            rows += result.contracts  # as fetched: the load's dedupe changes it once yielded
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


def plan_day(run: Run, day: date, snapshot: datetime, skip_completed: bool) -> DayPlan:
    """What a day needs: refused by the provider, or its symbols (those the ledger has seen
    completed left out when `skip_completed`)."""
    result = DayOutcome(day, snapshot)
    refusal = run.provider.refusal(day, run.provider.current)
    if refusal:
        log.error("%s refused: %s", day, refusal)
        result.outcome, result.error = "failed", refusal
        return DayPlan(result, [])
    done = completed_symbols(run.work, run.symbols, snapshot) if skip_completed else {}
    for symbol, finished in sorted(done.items()):
        log.debug("%s %s skipped: the ledger says (%s, %s) completed at %s (--force re-fetches)",
                  day, symbol, symbol, snapshot.isoformat(), finished)
        result.symbols.append(SymbolOutcome(day, symbol, "skipped"))
    if run.provider.reconstructs(day, run.provider.current):
        for symbol in sorted(snapshot_symbols(run.work, [s for s in run.symbols if s not in done], snapshot)):
            why = f"a live snapshot stored {symbol}'s chain of {day}: a reconstruction never overwrites it (--force too)"
            log.warning("%s %s skipped: %s", day, symbol, why)
            result.symbols.append(SymbolOutcome(day, symbol, "skipped", error=why))
            done[symbol] = snapshot
    todo = [s for s in run.symbols if s not in done]
    if not todo:
        log.info("%s: all %d symbols already completed, skipped", day, len(done))
    return DayPlan(result, todo, len(todo))


def ingest_days(run: Run, plans: list[DayPlan]) -> None:
    """Every planned symbol's chain, stored under its day's snapshot time: the days' fetches run
    back to back through one pool, and each load takes whatever has been fetched."""
    dbmod.ensure_partitions(run.work, [p.outcome.snapshot_time for p in plans if p.todo])
    run.work.commit()
    heartbeat = Heartbeat(log, run.args.heartbeat, sum(len(p.todo) for p in plans), "symbols")
    feed = Feed(run, plans)
    try:
        min_rows = LOAD_MIN_ROWS[0]
        while (first := feed.first()) is not None:
            _load(run, feed, first, min_rows, heartbeat)
            min_rows = min(LOAD_GROWTH * min_rows, LOAD_MIN_ROWS[1])
        run.ledger.wait()  # every load's rows_written, ledger and lifecycle are written
    finally:
        feed.close()
    for plan in plans:
        plan.outcome.symbols.sort(key=lambda s: s.symbol)
        if run.fatal and plan.left:  # the run stopped before this day was done
            plan.outcome.outcome, plan.outcome.error = "failed", run.fatal
            run.ledger.not_fetched(plan.todo[plan.submitted:], plan.outcome.snapshot_time, run.fatal)
    run.ledger.wait()


def _load(run: Run, feed: Feed, first: tuple[DayPlan, ChainResult], min_rows: int, heartbeat: Heartbeat) -> None:
    """One dlt pipeline run over the symbols fetched by now (whatever their days); the rest (rows
    written, ledger, lifecycle, log lines) goes to the ledger's thread: the next load runs meanwhile."""
    taken: list[tuple[DayPlan, ChainResult]] = []
    counts = {"ok": 0, "failed": 0}

    def on_chain(day: DayPlan, result: ChainResult) -> None:
        taken.append((day, result))
        counts["ok" if result.ok else "failed"] += 1
        heartbeat.tick(day=day.outcome.day.isoformat(), ok=counts["ok"], failed=counts["failed"])

    load_ids, load_error = pipeline.load(run.pipeline, feed.take(first, on_chain, min_rows))
    if load_error:
        _check_reachable(run.database)  # a failed load is the database's fault if it is gone: the run stops
    log.debug("load of %d symbols, %d contracts", len(taken), sum(r.contracts for _, r in taken))
    if run.provider.parser is not None:  # in the fetch threads, it is this process's own CPU time
        run.parse_cpu_s += sum(result.parse_cpu_s for _, result in taken)
    outcomes: list[tuple[DayPlan, SymbolOutcome, ChainResult]] = []
    for day, result in taken:
        error = result.error or load_error
        outcome = SymbolOutcome(day.outcome.day, result.symbol, "ok" if error is None else "failed", result.pages,
                                result.contracts, 0, result.rejected, error, round(result.elapsed, 3))
        if result.with_iv is not None:  # a reconstructed chain: how many contracts got an IV
            outcome.with_iv, outcome.not_inverted = result.with_iv, dict(result.not_inverted)
        day.outcome.symbols.append(outcome)
        outcomes.append((day, outcome, result))
    run.ledger.finished([(o, r.ticker_id, d.outcome.snapshot_time) for d, o, r in outcomes], load_ids,
                        functools.partial(_finished, outcomes))


def _finished(outcomes: list[tuple[DayPlan, SymbolOutcome, ChainResult]]) -> None:
    """A load's symbols are finished: their lines, and the END line of each day now complete."""
    for day, outcome, result in outcomes:
        symbol_line(outcome, dict(result.reject_reasons))
        day.left -= 1
        if day.left == 0:
            day.outcome.close()


def _check_reachable(database: dbmod.Database) -> None:
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select 1")
