"""The ingestion ledger and the contract lifecycle: the only code that writes them, from one thread."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import date, datetime
from typing import Any

import psycopg2
import psycopg2.extensions

from .outcomes import SymbolOutcome

log = logging.getLogger("kapman.ingest")


def completed_symbols(conn: psycopg2.extensions.connection, symbols: Sequence[str],
                      snapshot: datetime) -> dict[str, datetime]:
    """Symbols whose (symbol, snapshot time) the ledger says completed, with when."""
    with conn.cursor() as cur:
        cur.execute("select symbol, finished_at from ingestion_ledger"
                    " where snapshot_time = %s and status = 'completed' and symbol = any(%s)",
                    (snapshot, list(symbols)))
        return dict(cur.fetchall())


def snapshot_symbols(conn: psycopg2.extensions.connection, symbols: Sequence[str], snapshot: datetime) -> set[str]:
    """Symbols with rows a live snapshot stored under `snapshot` (a reconstruction leaves them be)."""
    with conn.cursor() as cur:
        cur.execute("select k.symbol from tickers k where k.symbol = any(%s) and exists (select 1 from options_chains c"
                    " where c.ticker_id = k.id and c.time = %s and c.source = 'snapshot')", (list(symbols), snapshot))
        return {row[0] for row in cur.fetchall()}


class Ledger:
    """Writes the ledger and the lifecycle on its own connection, in one thread, in the order the
    writes are handed over, while the run goes on fetching and loading. An error (a lost
    database) raises in whoever hands over the next write, or waits."""

    def __init__(self, conn: psycopg2.extensions.connection) -> None:
        self._conn = conn  # this object's alone
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="ledger")
        self._pending: list[Future[None]] = []

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._thread.shutdown(wait=True)

    def _submit(self, work: Callable[..., None], *args: Any) -> None:
        done = [f for f in self._pending if f.done()]
        self._pending = [f for f in self._pending if not f.done()]
        for future in done:
            future.result()
        self._pending.append(self._thread.submit(work, *args))

    def wait(self) -> None:
        """Wait for every write handed over; the first error raises here."""
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()

    def running(self, symbols: Sequence[str], snapshot: datetime) -> None:
        """The symbols' fetches for `snapshot` start: `running` until their outcome is known."""
        self._submit(self._running, list(symbols), snapshot)

    def finished(self, outcomes: list[tuple[SymbolOutcome, str, datetime]], load_ids: list[str],
                 then: Callable[[], None]) -> None:
        """After a load: (outcome, ticker_id, snapshot) of its symbols get their rows written (the
        rows the load stamped), then ledger and lifecycle in one transaction (they agree); then
        `then()` runs, in the ledger's thread."""
        self._submit(self._finished, outcomes, load_ids, then)

    def not_fetched(self, symbols: Sequence[str], snapshot: datetime, reason: str) -> None:
        """Symbols marked running that the run never fetched (it stopped)."""
        self._submit(self._not_fetched, list(symbols), snapshot, reason)

    def _running(self, symbols: list[str], snapshot: datetime) -> None:
        with self._conn.cursor() as cur:
            cur.execute(
                "insert into ingestion_ledger (symbol, snapshot_time, status) select s, %s, 'running'"
                " from unnest(%s::text[]) as s on conflict (symbol, snapshot_time) do update set status = 'running',"
                " pages = null, contracts = null, rows_written = null, rejected = null, error = null,"
                " started_at = now(), finished_at = null",
                (snapshot, symbols),
            )
        self._conn.commit()

    def _finished(self, outcomes: list[tuple[SymbolOutcome, str, datetime]], load_ids: list[str],
                  then: Callable[[], None]) -> None:
        by_snapshot: dict[datetime, list[tuple[SymbolOutcome, str]]] = {}
        for outcome, ticker_id, snapshot in outcomes:
            by_snapshot.setdefault(snapshot, []).append((outcome, ticker_id))
        with self._conn.cursor() as cur:
            for snapshot, group in sorted(by_snapshot.items()):
                written = _rows_written(cur, [t for _, t in group], snapshot, load_ids) if load_ids else {}
                for outcome, ticker_id in group:
                    if outcome.outcome == "ok":
                        outcome.rows_written = written.get(ticker_id, 0)
            update_lifecycle(cur, [(t, snapshot) for outcome, t, snapshot in outcomes if outcome.outcome == "ok"])
            for snapshot, group in sorted(by_snapshot.items()):
                for outcome, _ in group:
                    cur.execute(
                        "update ingestion_ledger set status = %s, pages = %s, contracts = %s, rows_written = %s,"
                        " rejected = %s, error = %s, finished_at = now() where symbol = %s and snapshot_time = %s",
                        ("completed" if outcome.outcome == "ok" else "failed", outcome.pages, outcome.contracts,
                         outcome.rows_written, outcome.rejected, outcome.error, outcome.symbol, snapshot),
                    )
        self._conn.commit()
        then()

    def _not_fetched(self, symbols: list[str], snapshot: datetime, reason: str) -> None:
        with self._conn.cursor() as cur:
            cur.execute("update ingestion_ledger set status = 'failed', error = %s, finished_at = now()"
                        " where snapshot_time = %s and symbol = any(%s) and status = 'running'",
                        (f"not fetched: {reason}", snapshot, symbols))
        self._conn.commit()


def _rows_written(cur: psycopg2.extensions.cursor, ticker_ids: list[str], snapshot: datetime,
                  load_ids: list[str]) -> dict[str, int]:
    """Rows the loads inserted or changed per ticker: those they stamped (ticker_id, time index)."""
    cur.execute("select ticker_id::text, count(*) from options_chains where ticker_id = any(%s::uuid[])"
                " and time = %s and _dlt_load_id = any(%s) group by 1", (ticker_ids, snapshot, load_ids))
    return dict(cur.fetchall())


def update_lifecycle(cur: psycopg2.extensions.cursor, stored: Sequence[tuple[str, datetime]]) -> None:
    """After successful fetches of (ticker_id, snapshot) chains, one load's: a contract's first
    and last seen times are the earliest and latest stored snapshots that list it; it is active
    unless its ticker has a stored snapshot after the last one that listed it, the first of which
    is its deactivated_at. Nothing is deleted; failed symbols are untouched. The same state
    whatever order the snapshots are stored in.

    Three statements for the whole load, whatever its days and tickers: each contract is written
    once however many of the load's days list it (per day, a range rewrote every contract once a
    day, and deactivated it when a later day of the same load was finished first)."""
    if not stored:
        return
    params = {"tids": [t for t, _ in stored], "times": [s for _, s in stored]}
    cur.execute(
        "insert into option_contracts as oc (contract_ticker, ticker_id, expiration_date, strike_price,"
        " option_type, first_seen_at, last_seen_at, active)"
        " select c.contract_ticker, min(c.ticker_id::text)::uuid, min(c.expiration_date), min(c.strike_price),"
        " min(c.option_type), min(c.time), max(c.time), true"
        " from unnest(%(tids)s::uuid[], %(times)s::timestamptz[]) as b (ticker_id, time)"
        " join options_chains c on c.ticker_id = b.ticker_id and c.time = b.time"
        # in key order, new contracts go into the primary key's index page after page
        " group by c.contract_ticker order by c.contract_ticker"
        " on conflict (contract_ticker) do update set"
        " first_seen_at = least(oc.first_seen_at, excluded.first_seen_at),"
        " last_seen_at = greatest(oc.last_seen_at, excluded.last_seen_at),"
        " active = oc.active or excluded.last_seen_at >= coalesce(oc.deactivated_at, oc.last_seen_at),"
        " deactivated_at = case when excluded.last_seen_at >= coalesce(oc.deactivated_at, oc.last_seen_at)"
        " then null else oc.deactivated_at end"
        " where not oc.active or excluded.last_seen_at > oc.last_seen_at"
        " or excluded.first_seen_at < oc.first_seen_at",
        params,
    )
    # Gone from a stored snapshot: the load's first snapshot of the ticker after the contract's
    # last sighting, unless an earlier one already says so.
    cur.execute(
        "with gone as (select oc.contract_ticker, min(b.time) as time"
        " from unnest(%(tids)s::uuid[], %(times)s::timestamptz[]) as b (ticker_id, time)"
        " join option_contracts oc on oc.ticker_id = b.ticker_id and oc.last_seen_at < b.time"
        " and (oc.active or oc.deactivated_at > b.time) group by oc.contract_ticker)"
        " update option_contracts oc set active = false, deactivated_at = gone.time from gone"
        " where oc.contract_ticker = gone.contract_ticker and (oc.active or oc.deactivated_at > gone.time)",
        params,
    )
    # A day stored late (retried after a failure, or a backfill): its last sightings are gone
    # from the ticker's next snapshot already stored. That snapshot first, one index probe per
    # (ticker, day) (joined lateral to option_contracts instead, the planner could run it once per
    # contract: a demo load stalled for minutes on that plan).
    cur.execute(
        "with later as materialized (select b.ticker_id, b.time, n.time as next"
        " from unnest(%(tids)s::uuid[], %(times)s::timestamptz[]) as b (ticker_id, time)"
        " cross join lateral (select c.time from options_chains c where c.ticker_id = b.ticker_id"
        " and c.time > b.time order by c.time limit 1) as n)"
        " update option_contracts oc set active = false, deactivated_at = later.next from later"
        " where oc.ticker_id = later.ticker_id and oc.last_seen_at = later.time"
        " and (oc.active or oc.deactivated_at <> later.next)",
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
