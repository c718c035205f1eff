"""History (#14): a year of one simulated symbol reconstructed by `kapman ingest --provider polygon`
from the simulator's historical endpoints, beside the same year ingested from its snapshots by
`--provider simulator`, each into a fresh database; the inversion rate alone; then `kapman metrics`
on both databases and the last days' iv_rank_30d, atm_iv_30d and iv_skew compared. Figures are
printed and written to the `history` section of bench/results.md; nothing is asserted.

    .venv/bin/python bench/history_bench.py                  # AAPL, 252 trading days
    .venv/bin/python bench/history_bench.py --quick --results /tmp/results.md   # smoke size

The database is DATABASE_URL's server if set, else an embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import UTC, date
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import iv_inversion  # noqa: E402
import run as bench_run  # noqa: E402  (the results file, machine line and verdicts of `make bench`)

from loaders import db as dbmod  # noqa: E402
from loaders.simulator import Market  # noqa: E402
from loaders.trading_calendar import snapshot_time, trading_days  # noqa: E402

log = logging.getLogger("bench.history")
SEED = 42
TODAY = date(2025, 12, 19)  # the current trading date of the runs: the year reconstructed ends the day before
RATIO_LIMIT = 3.0  # issue 14: reconstruction costs at most 3x the snapshots' ingestion ...
ABSOLUTE_LIMIT_S = 60.0  # ... and under a minute here
RANK_LIMIT = 5.0  # iv_rank_30d within 5 points of the rank over snapshot history
LEVEL_LIMIT = 0.01  # atm_iv_30d and iv_skew within 0.01
# (metric, decimals shown, issue 14's limit or None where it sets none)
COMPARED = (("iv_rank_30d", 2, RANK_LIMIT), ("atm_iv_30d", 4, LEVEL_LIMIT), ("iv_skew", 4, LEVEL_LIMIT),
            ("iv_rank", 2, None), ("average_iv", 4, None), ("atm_iv_90d", 4, None), ("iv_term_structure", 4, None))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--symbol", default="AAPL", help="simulated symbol (default AAPL, about 2,000 contracts)")
    parser.add_argument("--days", type=int, help="trading days reconstructed (default 252; --quick 5)")
    parser.add_argument("--compare", type=int, help="last days whose metrics are compared (default 20; --quick 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="ingestion concurrency (default 4)")
    parser.add_argument("--quick", action="store_true", help="smoke size: a few trading days")
    parser.add_argument("--results", type=Path, default=bench_run.RESULTS, help="results file (default bench/results.md)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, summaries)")
    args = parser.parse_args(argv)
    args.days = args.days or (5 if args.quick else 252)
    args.compare = min(args.compare or (2 if args.quick else 20), args.days)
    return args


# --- one ingestion -------------------------------------------------------------------------------

@dataclass
class Ingest:
    """One `kapman ingest` over the year."""

    provider: str
    wall_s: float
    in_run_s: float
    cpu_s: float
    peak_rss_mb: float
    symbol_days: int
    contracts: int
    rows_in_table: int
    with_iv: int | None = None
    not_inverted: int | None = None


def ingest(provider: str, database: dbmod.Database, days: list[date], args: argparse.Namespace, work: Path,
           env: dict[str, str]) -> Ingest:
    summary = work / f"{provider}-summary.json"
    child = harness.kapman(["ingest", "--provider", provider, "--start-date", days[0].isoformat(),
                            "--end-date", days[-1].isoformat(), "--concurrency", str(args.concurrency),
                            "--quiet", "--heartbeat", "0", "--summary-json", str(summary)],
                           database, work / provider, f"{provider}.log", env=env)
    result = json.loads(summary.read_text())
    if result["symbols_failed"]:
        raise RuntimeError(f"{provider}: {result['symbols_failed']} (symbol, day)s failed; see {child.log_path}")
    symbols = result["symbols"]
    reconstructed = [s for s in symbols if s.get("with_iv") is not None]
    run = Ingest(provider, child.wall_s, result["duration_s"], child.cpu_s,  # its parser processes included
                 child.peak_rss_mb, len(symbols), sum(s["contracts"] for s in symbols), harness.count_rows(database))
    if reconstructed:
        run.with_iv = sum(s["with_iv"] for s in reconstructed)
        run.not_inverted = sum(sum((s.get("not_inverted") or {}).values()) for s in reconstructed)
    log.info("%-13s %d (symbol, day)s, %s contracts in %.1f s (%.1f s in the run), peak RSS %.0f MB",
             provider, run.symbol_days, f"{run.contracts:,}", run.wall_s, run.in_run_s, run.peak_rss_mb)
    return run


# --- metrics on both databases -------------------------------------------------------------------

def metrics(database: dbmod.Database, days: list[date], work: Path, label: str, env: dict[str, str]) -> float:
    """`kapman metrics` over the whole range (every date's rank needs the earlier dates): wall s."""
    child = harness.kapman(["metrics", "--start-date", days[0].isoformat(), "--end-date", days[-1].isoformat(),
                            "--quiet"], database, work / f"metrics-{label}", f"metrics-{label}.log", env=env)
    return child.wall_s


def published(database: dbmod.Database, days: list[date]) -> dict[date, dict[str, Any]]:
    """The published documents of `days` (one symbol), by date."""
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select time, volatility_metrics_json from daily_snapshots"
                    " where time = any(%s) and volatility_metrics_json is not null",
                    ([snapshot_time(d) for d in days],))
        return {doc_time.astimezone(UTC).date(): doc for doc_time, doc in cur.fetchall()}


def compare(snap: dict[date, dict[str, Any]], recon: dict[date, dict[str, Any]]) -> dict[str, dict[str, float | int]]:
    """Per compared metric: the days with both values, and the median and worst |difference|."""
    out: dict[str, dict[str, float | int]] = {}
    for key, _, _ in COMPARED:
        diffs = [abs(recon[d]["metrics"][key] - snap[d]["metrics"][key]) for d in snap
                 if d in recon and snap[d]["metrics"].get(key) is not None
                 and recon[d]["metrics"].get(key) is not None]
        out[key] = {"days": len(diffs), "median": statistics.median(diffs) if diffs else float("nan"),
                    "max": max(diffs) if diffs else float("nan")}
        log.info("%-12s over %d days: median |reconstructed - snapshot| %.4f, worst %.4f",
                 key, len(diffs), out[key]["median"], out[key]["max"])
    return out


# --- the run ---------------------------------------------------------------------------------------

def chain_build_s(symbol: str, days: list[date], sample: int = 8) -> float:
    """Seconds the simulator takes to build `symbol`'s chains of `days` (from a sample): the share
    of both runs that is the simulator's, not the loader's."""
    market, picked = Market(SEED), days[:: max(1, len(days) // sample)][:sample]
    started = time.perf_counter()
    for day in picked:
        market.chain_json(symbol, day)
    return (time.perf_counter() - started) / len(picked) * len(days)


def measure(args: argparse.Namespace, pg: harness.PgServer, work: Path) -> dict[str, Any]:
    """Both ingestions, the inversion rate and the metrics comparison."""
    days = trading_days(date(TODAY.year - 2, 1, 1), TODAY)[-args.days - 1:-1]
    env = {"KAPMAN_TODAY": TODAY.isoformat(), "KAPMAN_SIMULATOR_SEED": str(SEED)}
    snap_db, recon_db = pg.fresh("snapshots"), pg.fresh("reconstructed")
    for database in (snap_db, recon_db):
        harness.add_watchlist(database, [args.symbol])
    log.info("history: %s, %d trading days %s..%s, current trading date %s, concurrency %d",
             args.symbol, len(days), days[0], days[-1], TODAY, args.concurrency)
    snap = ingest("simulator", snap_db, days, args, work, env)
    with harness.simulator(SEED, TODAY, 0.0) as simulator:  # zero latency
        recon = ingest("polygon", recon_db, days, args, work,
                       env | {"POLYGON_API_KEY": harness.SIM_KEY, "POLYGON_BASE_URL": simulator.base_url})
        requests, server_cpu = simulator.requests_by_family(), simulator.cpu_seconds()
    log.info("reconstruction: %s requests (%s); the simulator's CPU %.1f s",
             f"{sum(requests.values()):,}", ", ".join(f"{k} {v:,}" for k, v in sorted(requests.items())), server_cpu)
    ratio = recon.wall_s / snap.wall_s
    log.info("reconstructed / snapshots = %.2fx (target <= %.1fx), %.1f s (target < %.0f s)",
             ratio, RATIO_LIMIT, recon.wall_s, ABSOLUTE_LIMIT_S)
    cases = iv_inversion.synthetic_cases(2_000 if args.quick else 20_000)
    inversion = iv_inversion.measure("py_lets_be_rational", iv_inversion._lbr, cases)
    end_to_end = iv_inversion.end_to_end(args.symbol, days[-1])
    metrics_s = {"snapshots": metrics(snap_db, days, work, "snapshots", env),
                 "reconstructed": metrics(recon_db, days, work, "reconstructed", env)}
    last = days[-args.compare:]
    differences = compare(published(snap_db, last), published(recon_db, last))
    return {"days": days, "snap": snap, "recon": recon, "ratio": ratio, "requests": requests,
            "server_cpu_s": server_cpu, "inversions_per_s": inversion["per_s"], "end_to_end": end_to_end,
            "metrics_s": metrics_s, "last": last, "differences": differences,
            "build_s": chain_build_s(args.symbol, days)}


def _accuracy_row(key: str, found: dict[str, float | int], digits: int, limit: float | None) -> str:
    if not found["days"]:  # a rank needs 20 days of history: none at smoke size
        return f"| {key} | 0 | - | - | not measured: no date with a value on both sides |"
    points = "points" if key.startswith("iv_rank") else ""
    target = "-" if limit is None else bench_run.verdict(found["max"] <= limit, f"within {limit:g} {points}".rstrip())
    return f"| {key} | {found['days']} | {found['median']:.{digits}f} | {found['max']:.{digits}f} | {target} |"


def _row(run: Ingest, what: str) -> str:
    iv = "-" if run.with_iv is None else f"{run.with_iv:,} / {run.not_inverted:,}"
    return (f"| {what} | {run.symbol_days} | {run.contracts:,} | {run.wall_s:.1f} | {run.in_run_s:.1f} | "
            f"{run.contracts / run.wall_s:,.0f} | {run.cpu_s:.1f} | {run.peak_rss_mb:.0f} | {iv} |")


def section(args: argparse.Namespace, found: dict[str, Any], info: dict[str, str], load_end: str) -> str:
    """The `history` section of the results file."""
    snap, recon, days, diff = found["snap"], found["recon"], found["days"], found["differences"]
    requests = found["requests"]
    ratio, verdict = found["ratio"], bench_run.verdict
    return "\n".join([
        "## History: a year reconstructed vs the same year from snapshots", "",
        bench_run._header(info, f"{args.symbol}, {len(days)} trading days {days[0]}..{days[-1]} (current "
                                f"trading date {TODAY}), concurrency {args.concurrency}, simulator at zero latency; "
                                f"each `kapman ingest` a child process on a fresh database; {load_end}."),
        "| run | (symbol, day)s | contracts | wall s | in the run s | contracts/s | CPU s | peak RSS MB "
        "| with IV / without |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        _row(snap, "`--provider simulator` (snapshots)"),
        _row(recon, "`--provider polygon` (reconstruction)"), "",
        f"- reconstruction / snapshots: **{ratio:.2f}x** — " + verdict(ratio <= RATIO_LIMIT, f"limit {RATIO_LIMIT:.0f}x"),
        f"- reconstruction in **{recon.wall_s:.1f} s** — " + verdict(recon.wall_s < ABSOLUTE_LIMIT_S,
                                                                    f"limit {ABSOLUTE_LIMIT_S:.0f} s"),
        f"- requests of the reconstruction: **{sum(requests.values()):,}** ("
        + ", ".join(f"{k} {v:,}" for k, v in sorted(requests.items())) + f"); the simulator's CPU "
        f"{found['server_cpu_s']:.1f} s in its own process",
        f"- the simulator builds {args.symbol}'s {len(days)} chains in about {found['build_s']:.1f} s: inside "
        "the `--provider simulator` process for the snapshots, in the simulator's process for the reconstruction",
        f"- inversion alone (py_lets_be_rational, Black-76, one core): **{found['inversions_per_s']:,.0f} "
        f"contracts/s**; `reconstruct_day` end to end on {args.symbol}: {found['end_to_end']:,.0f} contracts/s",
        f"- `kapman metrics` over the {len(days)} days: {found['metrics_s']['snapshots']:.1f} s on the snapshots, "
        f"{found['metrics_s']['reconstructed']:.1f} s on the reconstruction", "",
        f"Accuracy of the metrics over the last {len(found['last'])} days ({found['last'][0]}..{found['last'][-1]}), "
        "reconstructed history against snapshot history:", "",
        "| metric | days compared | median abs diff | worst abs diff | target |", "|---|---:|---:|---:|---|",
        *(_accuracy_row(key, diff[key], digits, limit) for key, digits, limit in COMPARED),
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.log_to_stdout()
    started = time.perf_counter()
    with harness.scratch(keep=args.keep) as work:
        pg = harness.PgServer(work)
        try:
            info = bench_run.machine(pg)
            log.info("bench: %s\n       %s\n       %s", info["machine"], info["versions"], info["load"])
            found = measure(args, pg, work)
        finally:
            pg.close()
        if args.keep:
            log.info("scratch directory kept: %s", work)
    load_end = "load average at the end {:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg())
    log.info("bench: %s", load_end)
    bench_run.write_results(args.results, {"history": section(args, found, info, load_end)})
    log.info("bench: done in %.0f s; results in %s", time.perf_counter() - started, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
