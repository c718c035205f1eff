"""Ingestion throughput: `kapman ingest` against the simulator over HTTP, and the plain loader
(bench/plain_loader.py) on the same chains, the same concurrency and the same database server."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import re
import time
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

from harness import SIM_KEY, PgServer, add_watchlist, count_rows, kapman, simulator

from loaders import db as dbmod
from loaders.simulator import Market, full_market_universe
from loaders.simulator.process import SimulatorProcess
from loaders.trading_calendar import latest_trading_date, snapshot_time

log = logging.getLogger("bench.ingest")
SEED = 42


@dataclass
class Run:
    """One loader's run over one set of chains."""

    loader: str
    symbols: int
    rows: int
    pages: int
    wall_s: float
    peak_rss_mb: float
    server_cpu_s: float
    cpu_s: float = 0.0  # the loader process
    db_cpu_s: float | None = None  # PostgreSQL, all processes (embedded server only)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.wall_s if self.wall_s else 0.0


def pick_symbols(target: int, day: date, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Symbols of the full-market universe in a fixed pseudo-random order (the size tiers mixed),
    until their chains on `day` hold at least `target` contracts; symbol -> contracts."""
    order = sorted((s for s in full_market_universe(500) if s not in exclude),
                   key=lambda s: hashlib.blake2b(s.encode(), digest_size=8).digest())
    market = Market(SEED)
    picked: dict[str, int] = {}
    for symbol in order:
        if sum(picked.values()) >= target:
            break
        picked[symbol] = len(market.chain(symbol, day))
    return picked


def run_project(sim: SimulatorProcess, pg: PgServer, symbols: list[str], concurrency: int, workdir: Path,
                label: str, env: dict[str, str] | None = None, database: dbmod.Database | None = None,
                extra: tuple[str, ...] = ()) -> Run:
    """`kapman ingest` in a child process, on a fresh database unless one is given (the day the
    simulator serves as its current one: the live endpoint's path, no `date=`)."""
    if database is None:
        database = pg.fresh(label)
        add_watchlist(database, symbols)
    summary = workdir / f"{label}-summary.json"
    sim.cpu_seconds()
    db_cpu = pg.cpu_seconds()
    run = kapman(["ingest", "--concurrency", str(concurrency), "--quiet", "--heartbeat", "0",
                  "--summary-json", str(summary), *extra], database, workdir / label, f"{label}.log",
                 env={"POLYGON_API_KEY": SIM_KEY, "POLYGON_BASE_URL": sim.base_url} | (env or {}))
    server_cpu = sim.cpu_seconds()
    db_cpu = _since(pg.cpu_seconds(), db_cpu)
    result = json.loads(summary.read_text())
    if result["symbols_failed"]:
        raise RuntimeError(f"{label}: {result['symbols_failed']} symbols failed; see {run.log_path}")
    rows = sum(s["contracts"] for s in result["symbols"])  # this run's rows (a database may hold others)
    pages = sum(s["pages"] for s in result["symbols"])
    # The loader's CPU: its process's rusage, which includes its page-parsing processes (forked
    # children it waits for; the summary says how much of it they took).
    return Run("kapman ingest", len(symbols), rows, pages, run.wall_s, run.peak_rss_mb, server_cpu,
               run.cpu_s, db_cpu,
               extra={"in_run_s": result["duration_s"], "rows_written": result["rows_written"],
                      "parse_process_cpu_s": result.get("parse_process_cpu_s", 0.0)})


def run_plain(sim: SimulatorProcess, pg: PgServer, symbols: list[str], concurrency: int, day: date,
              label: str) -> Run:
    """The plain loader in a child process (its own GIL and its own peak RSS)."""
    import plain_loader

    database = pg.fresh(label)
    ticker_ids = add_watchlist(database, symbols)
    with database.connect() as conn:
        dbmod.ensure_partitions(conn, [snapshot_time(day)])
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    sim.cpu_seconds()
    db_cpu = pg.cpu_seconds()
    process = ctx.Process(target=plain_loader.run_in_child, args=(
        child, sim.base_url, SIM_KEY, database.dsn(), concurrency,
        {s: ticker_ids[s] for s in symbols}, day, snapshot_time(day)))
    started = time.perf_counter()  # the whole process, start-up included, as for `kapman ingest`
    process.start()
    figures = parent.recv()
    process.join()
    wall = time.perf_counter() - started
    server_cpu = sim.cpu_seconds()
    db_cpu = _since(pg.cpu_seconds(), db_cpu)
    rows = count_rows(database)
    if rows != figures["rows"]:
        raise RuntimeError(f"plain loader: {figures['rows']} rows fetched, {rows} in the table")
    return Run("plain loader", len(symbols), rows, int(figures["pages"]), wall,
               figures["peak_rss_mb"], server_cpu, figures["cpu_s"], db_cpu, extra={"in_run_s": figures["seconds"]})


def _since(now: float | None, before: float | None) -> float | None:
    return None if now is None or before is None else now - before


def throughput(pg: PgServer, workdir: Path, contracts: int, concurrency: int, latency_s: float,
               plain: bool = True, repeat: int = 1) -> list[Run]:
    """The project and (if `plain`) the plain loader on the same chains, served by one warm
    simulator, taking turns `repeat` times (each on a fresh database); for each loader the run of
    median wall time (a shared machine moves single runs by 15% or more; the figures of every
    run are logged)."""
    day = latest_trading_date()
    picked = pick_symbols(contracts, day)
    symbols = sorted(picked)
    log.info("ingest: %d symbols, %s contracts on %s, concurrency %d, %.0f ms a page, %d run(s) each",
             len(symbols), f"{sum(picked.values()):,}", day, concurrency, latency_s * 1000, repeat)
    project: list[Run] = []
    plains: list[Run] = []
    with simulator(SEED, day, latency_s, warm=symbols) as sim:
        for n in range(repeat):
            project.append(run_project(sim, pg, symbols, concurrency, workdir, f"project_{contracts}_{n}"))
            _log_run(project[-1])
            if plain:
                plains.append(run_plain(sim, pg, symbols, concurrency, day, f"plain_{contracts}_{n}"))
                _log_run(plains[-1])
    return [_median(project), *([_median(plains)] if plain else [])]


def _median(runs: list[Run]) -> Run:
    ordered = sorted(runs, key=lambda r: r.wall_s)
    median = ordered[(len(ordered) - 1) // 2]
    if len(runs) > 1:
        median.note = f"{median.symbols} symbols, median of {len(runs)} runs ({', '.join(f'{r.wall_s:.1f}' for r in runs)} s)"
    return median


def full_market(pg: PgServer, workdir: Path, concurrency: int, latency_s: float) -> Run:
    """A full-market day: every symbol of full_market_universe(500), about 1.5 million contracts."""
    day = latest_trading_date()
    symbols = full_market_universe(500)
    log.info("full market: %d symbols on %s, concurrency %d (warming the simulator)", len(symbols),
             day, concurrency)
    with simulator(SEED, day, latency_s, warm=symbols) as sim:
        run = run_project(sim, pg, symbols, concurrency, workdir, "project_full_market")
    run.note = "full-market day"
    _log_run(run)
    return run


def one_large_chain(pg: PgServer, workdir: Path, concurrency: int, latencies: tuple[float, ...],
                    symbol: str = "I:SPX") -> list[tuple[Run, Run]]:
    """A very large chain with and without expiration-range slices: `symbol` alone at each
    latency, and with as many contracts again in other symbols at the first. Each pair runs on one
    database that already holds the chain (stored under the day before by a first run), the
    unsplit run first (`slice_contracts` 0), then the split one, each under a snapshot of its own."""
    day = latest_trading_date()
    size = len(Market(SEED).chain(symbol, day))
    others = sorted(pick_symbols(size, day, exclude=(symbol,)))
    stamps = [(snapshot_time(day) - timedelta(days=n)).isoformat() for n in (2, 1, 0)]
    scenarios = [(latency, f"{symbol} alone", [symbol]) for latency in latencies]
    scenarios.append((latencies[0], f"{symbol} + {len(others)} symbols", [symbol, *others]))
    pairs = []
    for latency in latencies:
        with simulator(SEED, day, latency, warm=[symbol, *others]) as sim:
            for _, label, symbols in [s for s in scenarios if s[0] == latency]:
                safe = re.sub(r"\W+", "_", f"{label}_{latency * 1000:.0f}ms")
                database = pg.fresh(safe[:30].lower())
                add_watchlist(database, symbols)
                run_project(sim, pg, symbols, concurrency, workdir, f"{safe}_history", database=database,
                            extra=("--snapshot-time", stamps[0]))
                pair = []
                for split, stamp in ((False, stamps[1]), (True, stamps[2])):
                    run = run_project(sim, pg, symbols, concurrency, workdir, f"{safe}_{'split' if split else 'serial'}",
                                      env={} if split else {"SOURCES__POLYGON__SLICE_CONTRACTS": "0"},
                                      database=database, extra=("--snapshot-time", stamp))
                    run.note = f"{label}, {latency * 1000:.0f} ms, {'slices' if split else 'one pagination'}"
                    _log_run(run)
                    pair.append(run)
                pairs.append((pair[0], pair[1]))
    return pairs


def _log_run(run: Run) -> None:
    db_cpu = "-" if run.db_cpu_s is None else f"{run.db_cpu_s:.1f}"
    log.info("  %-14s %-28s %9s rows %5d pages %6.1f s %9s rows/s  peak RSS %4.0f MB  CPU s: loader %.1f, "
             "PostgreSQL %s, simulator %.1f", run.loader, run.note, f"{run.rows:,}", run.pages, run.wall_s,
             f"{run.rows_per_s:,.0f}", run.peak_rss_mb, run.cpu_s, db_cpu, run.server_cpu_s)
