"""`kapman demo`: watchlist, ingestion, metrics and report end to end on simulated chains and the embedded database."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from datetime import date, timedelta
from pathlib import Path

from . import report
from .db import EMBEDDED_DIR, Database, start_embedded, upgrade
from .logs import SUMMARY
from .trading_calendar import latest_trading_date, trading_days

log = logging.getLogger(__name__)

# One index with SPX and SPXW roots, ETFs, large and small single-stock chains, a dotted symbol.
DEMO_SYMBOLS = ("I:SPX", "SPY", "QQQ", "AAPL", "MSFT", "NVDA", "TSLA", "JPM", "XOM", "BRK.B")
# Its own database on the embedded server, so simulated chains never mix with data of a real run.
DEMO_DBNAME = "kapman_demo"
NOTICE = "SIMULATED DATA: every option chain in this demo comes from the built-in market simulator, not from the market."


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


def _duration(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 60 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def run(args: argparse.Namespace, kapman: Callable[[list[str]], int]) -> int:
    """Runs the four steps, prints the per-symbol table and says twice that the data is simulated.
    `kapman(argv)` runs a kapman command (cli.main, handed over so that this module need not
    import the command line that imports it)."""
    out = sys.stdout
    out.write(f"\n{NOTICE}\n\n")
    out.flush()
    started = time.monotonic()
    database = _demo_database()
    url = database.url()
    dates = demo_dates(args.days)
    span = ["--start-date", dates[0].isoformat(), "--end-date", dates[-1].isoformat()]
    log.log(SUMMARY, "demo: %d symbols x %d trading days (%s to %s) in %s", len(DEMO_SYMBOLS), len(dates),
            dates[0], dates[-1], database.display)
    built: list[report.Report] = []

    def make_report() -> int:
        built.append(report.build(database, Path(args.output), simulated=True))
        return 0

    steps: list[tuple[str, str, Callable[[], int]]] = [
        ("watchlist", "loading the demo watchlist", lambda: kapman(["watchlists", "load", str(_write_watchlist()), "--db-url", url])),
        ("ingest", "ingesting simulated option chains over HTTP",
         lambda: kapman(["ingest", "--provider", "simulator", *span, "--concurrency", "4", "--db-url", url])),
        ("metrics", "computing volatility metrics (dbt)", lambda: kapman(["metrics", *span, "--db-url", url])),
        ("report", "writing the report", make_report),
    ]
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
    elapsed = time.monotonic() - started
    out.write(
        f"\nReport: {result.html_path.resolve()} (charts: {len(result.png_paths)} PNG files beside it)\n"
        f"Finished in {_duration(elapsed)} ({', '.join(timings)}).\n\n{NOTICE}\n"
    )
    return 0
