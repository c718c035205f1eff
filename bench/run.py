"""`make bench`: ingestion throughput, metrics cost growth and the simulator, each against its
baseline in the same run; figures printed and written to bench/results.md.

    .venv/bin/python bench/run.py                      # everything (about 10 minutes on 2 cores)
    .venv/bin/python bench/run.py --only ingest --contracts 200000
    .venv/bin/python bench/run.py --quick --results /tmp/results.md   # smoke size, seconds

The database is DATABASE_URL's server if set (fresh databases are created and dropped on it),
else an embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import ingest_bench  # noqa: E402
import metrics_bench  # noqa: E402

log = logging.getLogger("bench")
RESULTS = Path(__file__).resolve().parent / "results.md"
BENCHMARKS = ("ingest", "metrics", "simulator")
# Targets of issue 8.
RSS_LIMIT_MB = 500
FULL_MARKET_LIMIT_S = 90
METRICS_GROWTH_LIMIT = 1.3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=BENCHMARKS,
                        help="run only this benchmark (repeatable; default: all)")
    parser.add_argument("--contracts", type=int, help="contracts of the ingestion comparison "
                        "(default 200,000; --quick 5,000)")
    parser.add_argument("--concurrency", type=int, default=8, help="ingestion concurrency (default 8)")
    parser.add_argument("--latency-ms", type=float, default=20.0, help="simulated latency of a page (default 20)")
    parser.add_argument("--history", help="metrics history sizes in trading days, comma-separated "
                        "(default 10,60,250; --quick 1)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each loader in the comparison, "
                        "taking turns; the median is reported (default 3; --quick 1)")
    parser.add_argument("--no-full-market", action="store_true", help="skip the full-market day (1.5M contracts)")
    parser.add_argument("--quick", action="store_true", help="smoke sizes: a few seconds per benchmark")
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (logs, dbt targets)")
    args = parser.parse_args(argv)
    args.only = tuple(args.only or BENCHMARKS)
    args.contracts = args.contracts or (5_000 if args.quick else 200_000)
    args.history = tuple(sorted(int(n) for n in (args.history or ("1" if args.quick else "10,60,250")).split(",")))
    return args


# --- machine and versions ----------------------------------------------------------------------------

def machine(pg: harness.PgServer) -> dict[str, str]:
    cpu = "unknown CPU"
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = match[1].strip() if match else platform.processor() or cpu
    except OSError:
        pass
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())[1])
        memory = f"{mem_kb / 1024 / 1024:.0f} GB"
    except (OSError, TypeError):
        memory = "?"
    versions = {name: _version(name) for name in ("dlt", "dbt-core", "dbt-postgres", "pyarrow",
                                                  "psycopg2-binary", "requests", "orjson")}
    commit = subprocess.run(["git", "-C", str(harness.PROJECT_DIR), "describe", "--always", "--dirty"],
                            capture_output=True, text=True).stdout.strip() or "?"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{cpu}, {os.cpu_count()} vCPUs, {memory} RAM, {platform.system()} {platform.release()}",
        "load": "load average at start {:.1f}, {:.1f}, {:.1f}".format(*os.getloadavg()),
        "versions": f"Python {platform.python_version()}, PostgreSQL {pg.version()}"
                    + "".join(f", {k} {v}" for k, v in versions.items()),
        "commit": commit,
    }


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


def _header(info: dict[str, str], extra: str = "") -> str:
    return (f"_{info['date']}, commit `{info['commit']}`; {info['machine']}; {info['load']}."
            f"{(' ' + extra) if extra else ''}_\n\n_{info['versions']}._\n")


def verdict(ok: bool, text: str) -> str:
    return f"**{'met' if ok else 'missed'}**: {text}"


# --- ingestion ---------------------------------------------------------------------------------------

def bench_ingest(args: argparse.Namespace, pg: harness.PgServer, work: Path, info: dict[str, str]) -> str:
    latency = args.latency_ms / 1000
    runs = ingest_bench.throughput(pg, work, args.contracts, args.concurrency, latency,
                                   repeat=1 if args.quick else args.repeat)
    project, plain = runs
    ratio = project.rows_per_s / plain.rows_per_s
    log.info("ingest: project / plain = %.2f (target >= 1.00)", ratio)
    full = None
    if not args.quick and not args.no_full_market:
        full = ingest_bench.full_market(pg, work, args.concurrency, latency)
    pairs = [] if args.quick else ingest_bench.one_large_chain(pg, work, args.concurrency, (latency, 0.1))
    large = [run for pair in pairs for run in pair]

    rows = [_run_row(r) for r in runs + ([full] if full else []) + large]
    lines = [
        "## Ingestion throughput", "",
        _header(info, f"Simulator in its own process, chains generated before timing, "
                      f"{args.latency_ms:.0f} ms a page, limit 250, concurrency {args.concurrency}; "
                      "`kapman ingest` and the plain loader each as a child process, start-up included, "
                      "on a fresh database; the loader's CPU includes its page-parsing processes."),
        "| loader | run | rows | pages | wall s | rows/s | peak RSS MB | CPU s: loader | PostgreSQL | simulator |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|", *rows, "",
        "Targets:", "",
        f"- project / plain loader at {project.rows:,} rows: **{ratio:.2f}x** — "
        + verdict(ratio >= 1.0, "at least as fast" if ratio >= 1.0 else
                  f"the project is {1 / ratio:.2f}x slower than the plain loader"),
        f"- the same without process start-up (from the start of the run to its end): project "
        f"{project.extra['in_run_s']:.1f} s, plain loader {plain.extra['in_run_s']:.1f} s "
        f"({plain.extra['in_run_s'] / project.extra['in_run_s']:.2f}x)",
    ]
    peak = max(r.peak_rss_mb for r in [project, *([full] if full else []), *large])
    lines.append(f"- peak RSS of `kapman ingest`: {peak:.0f} MB — "
                 + verdict(peak < RSS_LIMIT_MB, f"limit {RSS_LIMIT_MB} MB"))
    if full:
        lines.append(f"- RSS as the run grows: {project.peak_rss_mb:.0f} MB at {project.rows:,} rows, "
                     f"{full.peak_rss_mb:.0f} MB at {full.rows:,} rows "
                     f"({full.peak_rss_mb / project.peak_rss_mb:.2f}x for {full.rows / project.rows:.1f}x the rows)")
        lines.append(f"- full-market day: {full.rows:,} contracts in {full.wall_s:.1f} s — "
                     + verdict(full.wall_s < FULL_MARKET_LIMIT_S,
                               f"limit {FULL_MARKET_LIMIT_S} s" + ("" if full.wall_s < FULL_MARKET_LIMIT_S else
                                                                  f", {full.wall_s / FULL_MARKET_LIMIT_S:.2f}x over")))
    for serial, split in pairs:
        lines.append(f"- {serial.note.rsplit(',', 1)[0]}: {serial.wall_s:.1f} s as one pagination, "
                     f"{split.wall_s:.1f} s in expiration-range slices ({serial.wall_s / split.wall_s:.2f}x)")
    return "\n".join(lines) + "\n"


def _run_row(run: ingest_bench.Run) -> str:
    db_cpu = "-" if run.db_cpu_s is None else f"{run.db_cpu_s:.1f}"
    return (f"| {run.loader} | {run.note or f'{run.symbols} symbols'} | {run.rows:,} | {run.pages:,} | "
            f"{run.wall_s:.1f} | {run.rows_per_s:,.0f} | {run.peak_rss_mb:.0f} | {run.cpu_s:.1f} | {db_cpu} | "
            f"{run.server_cpu_s:.1f} |")


# --- metrics -----------------------------------------------------------------------------------------

def bench_metrics(args: argparse.Namespace, pg: harness.PgServer, work: Path, info: dict[str, str]) -> str:
    result = metrics_bench.growth(pg, work, args.history, quick=args.quick)
    runs: list[metrics_bench.MetricsRun] = result["runs"]
    full: metrics_bench.MetricsRun = result["full"]
    first, last = runs[0], runs[-1]
    growth = last.dbt_s / first.dbt_s  # 1.0 with a single history size (--quick)
    log.info("metrics: one date at %d vs %d days of history: dbt %.2fx, wall %.2fx (target <= %.1fx)",
             last.history_days, first.history_days, growth, last.wall_s / first.wall_s, METRICS_GROWTH_LIMIT)
    heaviest, plan = result["explain"]
    lines = [
        "## Metrics cost growth", "",
        _header(info, f"Symbols {', '.join(metrics_bench.SYMBOLS)}; history loaded with COPY "
                      f"({result['load_rows_per_s']:,.0f} rows/s); `kapman metrics` as a child process."),
        "| history (trading days) | contracts of the date | wall s | dbt build s | heaviest model |",
        "|---:|---:|---:|---:|---|",
        *(f"| {r.history_days} | {r.contracts:,} | {r.wall_s:.2f} | {r.dbt_s:.2f} | "
          f"{r.heaviest[0]} {r.heaviest[1]:.2f} s |" for r in runs), "",
        f"- one new date at {last.history_days} vs {first.history_days} days of history: dbt build "
        f"**{growth:.2f}x** (wall {last.wall_s / first.wall_s:.2f}x) — "
        + verdict(growth <= METRICS_GROWTH_LIMIT, f"limit {METRICS_GROWTH_LIMIT}x"),
        f"- full rebuild (mart dropped): {full.dates} dates, {full.contracts:,} contracts, dbt build "
        f"{full.dbt_s:.1f} s (wall {full.wall_s:.1f} s): **{full.contracts / full.dbt_s:,.0f} contracts/s**",
        "",
        f"Model timings of the one-date run at {last.history_days} days: "
        + ", ".join(f"{k} {v:.2f} s" for k, v in sorted(last.models.items(), key=lambda kv: -kv[1])),
        "",
        f"EXPLAIN (ANALYZE, BUFFERS) of the heaviest query, `{heaviest}`, for that date:", "",
        "```", plan, "```",
    ]
    return "\n".join(lines) + "\n"


# --- simulator ---------------------------------------------------------------------------------------

def bench_simulator(args: argparse.Namespace, info: dict[str, str]) -> str:
    import multiprocessing as mp
    from datetime import date

    import bench_simulator as bs

    from loaders.simulator import full_market_universe

    every, day, seed = (100 if args.quick else 10), date(2025, 11, 21), 42
    universe = full_market_universe(500)
    symbols = universe[::every]
    gen_rate, dumps_rate = bs._baselines(symbols, day, seed)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    server = ctx.Process(target=bs._serve, args=(child, seed))
    server.start()
    base_url = parent.recv()
    contracts, pages, wall = bs._fetch_all(base_url, symbols, day)
    parent.send("stop")
    server_cpu = parent.recv()
    server.join()
    per_core = contracts / server_cpu
    log.info("simulator: %s contracts in %d pages; %s contracts/s per core of the server "
             "(baselines: building dicts %s/s, json.dumps %s/s)", f"{contracts:,}", pages,
             f"{per_core:,.0f}", f"{gen_rate:,.0f}", f"{dumps_rate:,.0f}")
    return "\n".join([
        "## Simulator", "",
        _header(info, f"Every {every}th symbol of the full-market universe, cold cache, one client connection."),
        "| contracts | pages | server CPU s | per core | client wall s | build dicts | `json.dumps` |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {contracts:,} | {pages:,} | {server_cpu:.1f} | {per_core:,.0f}/s | {wall:.1f} | "
        f"{gen_rate:,.0f}/s | {dumps_rate:,.0f}/s |",
    ]) + "\n"


# --- results file ------------------------------------------------------------------------------------

def write_results(path: Path, sections: dict[str, str]) -> None:
    """Replace each benchmark's section between its markers; sections that did not run and any
    hand-written text outside the markers are kept."""
    text = path.read_text() if path.exists() else (
        "# Benchmark results\n\nWritten by `make bench` (`bench/run.py`): each section below is "
        "replaced when its benchmark runs again.\n")
    for name, body in sections.items():
        block = f"<!-- bench:{name} -->\n{body}<!-- /bench:{name} -->"
        pattern = re.compile(rf"<!-- bench:{name} -->.*?<!-- /bench:{name} -->", re.S)
        match = pattern.search(text)
        text = (text[:match.start()] + block + text[match.end():] if match
                else text.rstrip("\n") + "\n\n" + block + "\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    harness.log_to_stdout()
    started = time.perf_counter()
    sections: dict[str, str] = {}
    with harness.scratch(keep=args.keep) as work:
        pg = harness.PgServer(work)
        try:
            info = machine(pg)
            log.info("bench: %s\n       %s", info["machine"], info["versions"])
            if "ingest" in args.only:
                sections["ingest"] = bench_ingest(args, pg, work, info)
            if "metrics" in args.only:
                sections["metrics"] = bench_metrics(args, pg, work, info)
            if "simulator" in args.only:
                sections["simulator"] = bench_simulator(args, info)
        finally:
            pg.close()
        if args.keep:
            log.info("scratch directory kept: %s", work)
    write_results(args.results, sections)
    log.info("bench: done in %.0f s; results in %s", time.perf_counter() - started, args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
