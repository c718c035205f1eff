"""Metrics cost growth: `kapman metrics` for one new date with N trading days of history already
loaded and computed, for several N on the same symbols; a full rebuild's throughput; and the
EXPLAIN (ANALYZE, BUFFERS) of the heaviest model query of the one-date run."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import psycopg2
from harness import PgServer, add_watchlist, count_rows, kapman
from plain_loader import COPY_STAGE, STAGE, UPSERT, flatten

from loaders import db as dbmod
from loaders.simulator import Market
from loaders.trading_calendar import snapshot_time, trading_days

log = logging.getLogger("bench.metrics")
SEED = 42
SYMBOLS = ("AAPL", "JPM", "KO")  # modest chains: about 2,000, 1,000 and 500 contracts a day
LAST_DAY = date(2025, 11, 21)


@dataclass
class MetricsRun:
    """One `kapman metrics` run and dbt's own timings of it."""

    label: str
    dates: int
    history_days: int
    contracts: int  # options_chains rows of the computed dates
    wall_s: float
    dbt_s: float  # dbt's elapsed time for the build (no interpreter start-up, no parse)
    models: dict[str, float] = field(default_factory=dict)  # table model -> execution seconds
    compiled: dict[str, str] = field(default_factory=dict)  # model -> compiled SQL

    @property
    def heaviest(self) -> tuple[str, float]:
        name = max(self.models, key=self.models.__getitem__)
        return name, self.models[name]


def load_days(database: dbmod.Database, ticker_ids: dict[str, str], days: list[date],
              market: Market) -> int:
    """Simulated chains of `days` straight into options_chains (COPY + upsert); rows loaded."""
    rows = 0
    with database.connect() as conn, conn.cursor() as cur:
        dbmod.ensure_partitions(conn, [snapshot_time(d) for d in days])
        cur.execute(STAGE)
        for day in days:
            buffer = io.StringIO()
            stamp = snapshot_time(day).isoformat()
            for symbol, ticker_id in ticker_ids.items():
                rows += flatten(market.chain(symbol, day), stamp, ticker_id, buffer)
            buffer.seek(0)
            cur.execute("truncate stage")
            cur.copy_expert(COPY_STAGE, buffer)
            cur.execute(UPSERT)
        cur.execute("analyze options_chains")
    return rows


def _contracts(database: dbmod.Database, first: date, last: date) -> int:
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select count(*) from options_chains where time between %s and %s",
                    (snapshot_time(first), snapshot_time(last)))
        return int(cur.fetchone()[0])


def run_metrics(database: dbmod.Database, workdir: Path, label: str, first: date, last: date,
                history_days: int) -> MetricsRun:
    """`kapman metrics` for first..last in a child process, dbt's target in a scratch directory."""
    target = workdir / f"target_{label}"
    args = ["metrics", "--quiet", "--heartbeat", "0"]
    args += ["--date", first.isoformat()] if first == last else \
        ["--start-date", first.isoformat(), "--end-date", last.isoformat()]
    run = kapman(args, database, workdir, f"metrics_{label}.log",
                 env={"DBT_TARGET_PATH": str(target), "DBT_LOG_PATH": str(workdir / "dbt_logs")})
    results = json.loads((target / "run_results.json").read_text())
    nodes = json.loads((target / "manifest.json").read_text())["nodes"]
    # Views cost nothing to create: their time is in the tables that read them.
    built = [r for r in results["results"] if r["unique_id"].startswith("model.")
             and nodes[r["unique_id"]]["config"]["materialized"] != "view"]
    models = {r["unique_id"].split(".")[-1]: r["execution_time"] for r in built}
    compiled = {r["unique_id"].split(".")[-1]: r.get("compiled_code") or "" for r in built}
    return MetricsRun(label, len(trading_days(first, last)), history_days,
                      _contracts(database, first, last), run.wall_s, results["elapsed_time"],
                      models, compiled)


def explain(database: dbmod.Database, run: MetricsRun) -> tuple[str, str]:
    """EXPLAIN (ANALYZE, BUFFERS) of the heaviest model's compiled query, as dbt ran it."""
    name, _ = run.heaviest
    query = run.compiled[name]
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("set search_path to analytics, public")
        try:
            cur.execute("explain (analyze, buffers, costs off, timing on) " + query)
            plan = "\n".join(row[0] for row in cur.fetchall())
        except psycopg2.Error as exc:
            plan = f"(EXPLAIN failed: {str(exc).strip().splitlines()[0]})"
        conn.rollback()
    return name, plan


def growth(pg: PgServer, workdir: Path, history: tuple[int, ...], quick: bool = False) -> dict[str, Any]:
    """For each N in `history` (ascending): load up to N days, compute them, then time the next
    date alone. One database grows through the sizes; the symbols' chains keep their sizes. Then
    a rebuild of every date from nothing. `quick` (smoke size) skips the separate history runs
    (the timed run computes the missing history itself) and takes that run as the rebuild."""
    total = max(history) + 1
    days = [d for d in trading_days(date(LAST_DAY.year - 2, 1, 1), LAST_DAY)][-total:]
    database = pg.fresh("metrics")
    ticker_ids = add_watchlist(database, SYMBOLS)
    market = Market(SEED)
    log.info("metrics: %s, %d trading days %s..%s, history sizes %s", ", ".join(SYMBOLS), total,
             days[0], days[-1], ", ".join(map(str, history)))
    runs: list[MetricsRun] = []
    loaded = computed = 0
    load_s = 0.0
    for n in history:
        started = time.perf_counter()
        load_days(database, ticker_ids, days[loaded:n + 1], market)
        load_s += time.perf_counter() - started
        loaded = n + 1
        if computed <= n - 1 and not quick:
            run_metrics(database, workdir, f"history_{n}", days[computed], days[n - 1], 0)
        run = run_metrics(database, workdir, f"one_day_after_{n}", days[n], days[n], n)
        computed = n + 1
        runs.append(run)
        name, seconds = run.heaviest
        log.info("  history %3d days: one new date in %5.2f s wall, dbt build %5.2f s "
                 "(heaviest: %s %.2f s; %s contracts)", n, run.wall_s, run.dbt_s, name, seconds,
                 f"{run.contracts:,}")
    heaviest, plan = explain(database, runs[-1])
    rows = count_rows(database)
    if quick:
        full = dataclasses.replace(runs[-1], label="full_refresh", dates=len(days),
                                   contracts=_contracts(database, days[0], days[-1]))
    else:
        with database.connect() as conn, conn.cursor() as cur:  # a rebuild from nothing
            cur.execute("drop schema if exists analytics cascade")
            cur.execute("delete from daily_snapshots")
        full = run_metrics(database, workdir, "full_refresh", days[0], days[loaded - 1], 0)
    log.info("  full rebuild: %d dates, %s contracts in %.1f s wall (dbt build %.1f s): %s contracts/s",
             full.dates, f"{full.contracts:,}", full.wall_s, full.dbt_s,
             f"{full.contracts / full.dbt_s:,.0f}")
    return {"runs": runs, "full": full, "explain": (heaviest, plan), "rows": rows,
            "load_rows_per_s": rows / load_s if load_s else 0.0}
