"""`kapman demo`: watchlist, ingestion, metrics and report end to end on simulated chains and the embedded database."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator
from datetime import date, timedelta
from pathlib import Path

from . import report
from .db import EMBEDDED_DIR, Database, environment, start_embedded, upgrade
from .logs import SUMMARY
from .trading_calendar import latest_trading_date, snapshot_time, trading_days

log = logging.getLogger(__name__)

# One index with SPX and SPXW roots, ETFs, large and small single-stock chains, a dotted symbol.
DEMO_SYMBOLS = ("I:SPX", "SPY", "QQQ", "AAPL", "MSFT", "NVDA", "TSLA", "JPM", "XOM", "BRK.B")
# Its own database on the embedded server, so simulated chains never mix with data of a real run.
DEMO_DBNAME = "kapman_demo"
NOTICE = "SIMULATED DATA: every option chain in this demo comes from the built-in market simulator, not from the market."
# What the reconstruction step sets: the simulator's origin and key under every name dlt resolves
# (the sectioned names win over the plain ones, so a user's SOURCES__POLYGON__* cannot send the demo
# to the real API), and no client-side rate limit of a real plan.
_POLYGON_ENV = ("POLYGON_BASE_URL", "SOURCES__POLYGON__POLYGON_BASE_URL", "POLYGON_API_KEY",
                "SOURCES__POLYGON__POLYGON_API_KEY", "POLYGON_REQUESTS_PER_MINUTE",
                "SOURCES__POLYGON__POLYGON_REQUESTS_PER_MINUTE", "SOURCES__POLYGON__REQUESTS_PER_MINUTE")


def demo_dates(days: int, end: date | None = None) -> list[date]:
    """The last `days` trading dates up to `end` (default: the latest trading date), oldest first."""
    end = end or latest_trading_date()
    return trading_days(end - timedelta(days=2 * days + 15), end)[-days:]


def _demo_database() -> Database:
    """The demo's database on the embedded server under ./.kapman, whatever DATABASE_URL says."""
    server = start_embedded()
    with server.with_dbname("postgres").connect(autocommit=True) as conn, conn.cursor() as cur:
        cur.execute("select 1 from pg_database where datname = %s", (DEMO_DBNAME,))
        if cur.fetchone() is None:
            cur.execute(f"create database {DEMO_DBNAME}")
    database = server.with_dbname(DEMO_DBNAME)
    upgrade(database)
    return database


def _write_watchlist() -> Path:
    path = Path(EMBEDDED_DIR) / "demo" / f"{report.DEMO_WATCHLIST_ID}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# kapman demo: simulated symbols (written by `kapman demo`)\n" + "\n".join(DEMO_SYMBOLS) + "\n")
    return path


@contextlib.contextmanager
def _simulated_polygon() -> Iterator[None]:
    """The polygon provider's settings pointed at a simulator (in a child process) on loopback that serves
    the historical endpoints, with a one-off key; the environment is restored afterwards."""
    from .simulator.process import SimulatorProcess

    seed = int(os.environ.get("KAPMAN_SIMULATOR_SEED", "42"))  # the seed the simulator provider uses
    key = secrets.token_urlsafe(18)
    with SimulatorProcess(seed, api_key=key) as server:
        log.info("simulator (seed %d) serving SIMULATED history on %s", seed, server.base_url)
        # Every other polygon setting unset: no request limit, no user's key or origin.
        settings: dict[str, str | None] = dict.fromkeys(_POLYGON_ENV)
        settings |= dict.fromkeys(_POLYGON_ENV[:2], server.base_url) | dict.fromkeys(_POLYGON_ENV[2:4], key)
        with environment(settings):
            yield


def stored_sources(database: Database, dates: list[date]) -> dict[str, tuple[list[date], int]]:
    """Per options_chains.source ('snapshot', 'reconstructed'): the demo's days stored from it and
    their rows, as the database holds them (what the demo says it did is what it stored)."""
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute(
            "select source, (time at time zone 'UTC')::date as day, count(*) from options_chains"
            " where time between %s and %s group by 1, 2 order by 1, 2",
            (snapshot_time(dates[0]), snapshot_time(dates[-1])),
        )
        found: dict[str, tuple[list[date], int]] = {}
        for source, day, rows in cur.fetchall():
            days, total = found.get(source, ([], 0))
            found[source] = ([*days, day], total + rows)
        return found


def _sources_line(found: dict[str, tuple[list[date], int]]) -> str:
    """Which days came from where, in one line per source."""
    what = {"reconstructed": "reconstructed from historical prices (contracts, daily bars, yields, "
                             "dividends, open interest) by `kapman ingest --provider polygon`",
            "snapshot": "from option-chain snapshots (`kapman ingest --provider simulator`)"}
    lines = []
    for source in ("reconstructed", "snapshot"):
        if source in found:
            days, rows = found[source]
            span = days[0].isoformat() if len(days) == 1 else f"{days[0].isoformat()} to {days[-1].isoformat()}"
            lines.append(f"{len(days)} trading day(s), {span}: {rows:,} contract rows {what[source]}.")
    return "\n".join(lines) + "\n"


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _span(dates: list[date]) -> list[str]:
    return ["--start-date", dates[0].isoformat(), "--end-date", dates[-1].isoformat()]


def _steps(args: argparse.Namespace, kapman: Callable[[list[str]], int], url: str, dates: list[date],
           make_report: Callable[[], int]) -> list[tuple[str, str, Callable[[], int]]]:
    """The demo's steps: (name, what it does, run it -> exit code)."""
    past, rest = dates[:args.history], dates[args.history:]

    def reconstruct() -> int:
        with _simulated_polygon():
            return kapman(["ingest", "--provider", "polygon", *_span(past), "--concurrency", "4", "--db-url", url])

    steps: list[tuple[str, str, Callable[[], int]]] = [
        ("watchlist", "loading the demo watchlist", lambda: kapman(["watchlists", "load", str(_write_watchlist()), "--db-url", url])),
    ]
    if past:
        steps.append(("reconstruct", f"reconstructing the first {len(past)} trading days ({past[0]} to {past[-1]}) "
                      "from the simulator's historical endpoints over HTTP", reconstruct))
    steps += [
        ("ingest", f"ingesting simulated option-chain snapshots over HTTP ({rest[0]} to {rest[-1]})",
         lambda: kapman(["ingest", "--provider", "simulator", *_span(rest), "--concurrency", "4", "--db-url", url])),
        ("metrics", "computing volatility metrics (dbt)", lambda: kapman(["metrics", *_span(dates), "--db-url", url])),
        ("report", "writing the report", make_report),
    ]
    return steps


def run(args: argparse.Namespace, kapman: Callable[[list[str]], int]) -> int:
    """Runs the steps, prints the per-symbol table and says twice that the data is simulated.
    `kapman(argv)` runs a kapman command (cli.main, handed over so that this module need not
    import the command line that imports it)."""
    args.history = getattr(args, "history", 0) or 0
    if args.history >= args.days:
        log.error("--history %d must be less than --days %d: the latest day always comes from a snapshot",
                  args.history, args.days)
        return 2
    out = sys.stdout
    out.write(f"\n{NOTICE}\n\n")
    out.flush()
    started = time.monotonic()
    database = _demo_database()
    dates = demo_dates(args.days)
    log.log(SUMMARY, "demo: %d symbols x %d trading days (%s to %s, the first %d reconstructed) in %s",
            len(DEMO_SYMBOLS), len(dates), dates[0], dates[-1], args.history, database.display)
    built: list[report.Report] = []

    def make_report() -> int:
        built.append(report.build(database, Path(args.output), simulated=True))
        return 0

    steps = _steps(args, kapman, database.url(), dates, make_report)
    timings: list[str] = []
    for number, (name, what, step) in enumerate(steps, 1):
        log.log(SUMMARY, "[%d/%d] %s", number, len(steps), what)
        step_started = time.monotonic()
        code = step()
        seconds = time.monotonic() - step_started
        timings.append(f"{name} {_duration(seconds)}")
        if code != 0:
            log.error("[%d/%d] %s failed (exit %d): the demo stops here", number, len(steps), what, code)
            out.write(f"\nThe demo did not finish: step {number} ({what}) failed.\n\n{NOTICE}\n")
            return code
        log.log(SUMMARY, "[%d/%d] done in %.1f s", number, len(steps), seconds)

    result = built[0]
    out.write(f"\nVolatility metrics on {dates[-1].isoformat()} (simulated):\n\n")
    out.write(report.text_table(result.latest))
    out.write("\n" + _sources_line(stored_sources(database, dates)))
    elapsed = time.monotonic() - started
    out.write(
        f"\nReport: {result.html_path.resolve()} (charts: {len(result.png_paths)} PNG files beside it)\n"
        f"Finished in {_duration(elapsed)} ({', '.join(timings)}).\n\n{NOTICE}\n"
    )
    return 0
