"""`kapman metrics`: dbt computes the volatility metrics for the chosen trading dates; this module
picks the dates, runs dbt in-process and has publish.py write the mart's JSON to daily_snapshots."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import date
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from . import db as dbmod
from .logs import SUMMARY, Heartbeat
from .publish import Published, publish
from .trading_calendar import latest_trading_date, trading_days

log = logging.getLogger(__name__)
dbt_log = logging.getLogger("dbt")

PROJECT_DIR = Path(__file__).resolve().parent.parent
PROFILES_DIR = PROJECT_DIR / "profiles"
TRADING_DAYS_SEED = PROJECT_DIR / "dbt_project" / "seeds" / "trading_days.csv"
SEED_YEARS = (2010, 2040)
MART = "volatility_metrics"
GRID = "int_options_snapshots"  # the (ticker, date) pairs of the run, with `is_published`


class DbtError(RuntimeError):
    """dbt failed (compilation, a model, a data test): nothing was published."""


# --- dbt in-process ---------------------------------------------------------------------------

@dataclass
class _Dbt:
    """dbt in-process, one dbtRunner per process: the project is parsed once per database (relation
    names carry the database name) and the manifest reused, since vars only matter at run time."""

    manifests: dict[tuple[str, ...], Any] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def _on_event(self, event: Any) -> None:
        level, msg, name = event.info.level, event.info.msg, event.info.name
        if level == "error":
            self.errors.append(msg)
            dbt_log.error("%s", msg)
        elif level == "warn" and "Deprecation" not in name:
            dbt_log.warning("%s", msg)
        else:
            dbt_log.debug("%s", msg)

    def _common(self) -> list[str]:
        return ["--project-dir", str(PROJECT_DIR), "--profiles-dir", str(PROFILES_DIR),
                "--log-level", "none", "--log-level-file", "info",
                "--no-send-anonymous-usage-stats", "--no-version-check"]

    def manifest(self, database: dbmod.Database) -> Any:
        from dbt.cli.main import dbtRunner  # slow import: only when metrics run

        key = (database.host, str(database.port), database.dbname, database.user,
               os.environ.get("KAPMAN_DBT_SCHEMA", ""))
        if key not in self.manifests:
            self.errors = []
            with dbmod.environment(database.libpq_env()):
                parsed = dbtRunner(callbacks=[self._on_event]).invoke(["parse", *self._common()])
            if not parsed.success:
                raise DbtError(_failure_reason(parsed, self.errors, "dbt parse failed"))
            self.manifests[key] = parsed.result
        return self.manifests[key]

    def relation(self, database: dbmod.Database, name: str) -> str:
        """The relation a model or seed builds into, e.g. "kapman"."analytics"."volatility_metrics"."""
        for node in self.manifest(database).nodes.values():
            if node.name == name and getattr(node, "relation_name", None):
                return str(node.relation_name)
        raise DbtError(f"no dbt model or seed named {name}")

    def invoke(self, database: dbmod.Database, args: list[str]) -> Any:
        from dbt.cli.main import dbtRunner

        manifest = self.manifest(database)
        self.errors = []
        with dbmod.environment(database.libpq_env()):
            result = dbtRunner(manifest=manifest, callbacks=[self._on_event]).invoke(
                [*args, *self._common()])
        if not result.success:
            raise DbtError(_failure_reason(result, self.errors, f"dbt {args[0]} failed"))
        return result


_dbt = _Dbt()


def _failure_reason(result: Any, events: list[str], default: str) -> str:
    if result.exception is not None:
        return f"{default}: {str(result.exception).strip().splitlines()[0]}"
    failed = [
        f"{r.node.name} ({r.status}: {(r.message or '').strip().splitlines()[0] if r.message else ''})"
        for r in getattr(result.result, "results", []) or []
        if str(r.status) in ("error", "fail", "runtime error")
    ]
    if failed:
        return f"{default}: {'; '.join(failed)}"
    return f"{default}: {events[0]}" if events else default


def build(database: dbmod.Database, start: date, end: date, fill_missing: bool = False,
          with_seed: bool = True) -> None:
    """`dbt build` of the mart and everything upstream for trading dates start..end (unit tests
    excluded: they test the code, `make test` runs them)."""
    variables = {"start_date": start.isoformat(), "end_date": end.isoformat(), "fill_missing": fill_missing}
    args = ["build", "--select", f"+{MART}", "--vars", json.dumps(variables),
            "--exclude-resource-type", "unit_test"]
    if not with_seed:
        args += ["--exclude-resource-type", "seed"]
    _dbt.invoke(database, args)


def run_dbt(database: dbmod.Database, args: list[str]) -> Any:
    """Any other dbt command against this database (tests, `--empty` runs)."""
    return _dbt.invoke(database, args)


def seed_is_current(conn: psycopg2.extensions.connection, relation: str) -> bool:
    """Whether the trading_days table already holds exactly the seed file (skips a reload)."""
    with conn.cursor() as cur:
        cur.execute("select to_regclass(%s) is not null", (relation,))
        if not cur.fetchone()[0]:
            return False
        cur.execute(sql.SQL("select md5(string_agg(to_char(trading_date, 'YYYY-MM-DD'), E'\\n'"
                            " order by trading_date)) from {}").format(sql.SQL(relation)))
        stored = cur.fetchone()[0]
    lines = TRADING_DAYS_SEED.read_text().split()[1:]
    return stored == hashlib.md5("\n".join(lines).encode()).hexdigest()


# --- versions, dates and the seed ---------------------------------------------------------------

# The files that define the numbers: the model version moves only when one of them changes.
MODEL_PATHS = ("dbt_project", "macros", "dbt_project.yml", "loaders/metrics.py", "loaders/publish.py")


def model_version() -> str:
    """Package version, plus the last commit that changed the metrics code when running from a
    git checkout (other commits leave the published JSON byte-identical)."""
    try:
        version = metadata.version("kapman-options")
    except metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        sha = subprocess.run(
            ["git", "-C", str(PROJECT_DIR), "log", "-1", "--format=%h", "--abbrev=12", "--", *MODEL_PATHS],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{version}+g{sha}" if sha else version


def requested_dates(args: argparse.Namespace) -> tuple[date, date]:
    """--date wins over --start-date/--end-date; default: the latest trading date."""
    if args.date:
        return args.date, args.date
    if args.start_date:
        return args.start_date, args.end_date
    day = latest_trading_date()
    return day, day


def trading_days_seed_text() -> str:
    """The seed file's content: the trading calendar of ingestion over SEED_YEARS."""
    days = trading_days(date(SEED_YEARS[0], 1, 1), date(SEED_YEARS[1], 12, 31))
    return "trading_date\n" + "".join(f"{day.isoformat()}\n" for day in days)


# --- publish ----------------------------------------------------------------------------------
# --- the command --------------------------------------------------------------------------------

def _active_watchlist_tickers(conn: psycopg2.extensions.connection) -> int:
    """Give every active watchlist symbol a tickers row (as ingestion does), so that each gets a
    daily_snapshots row even before its first ingestion; returns how many there are."""
    with conn.cursor() as cur:
        cur.execute("insert into tickers (symbol) select distinct symbol from watchlists where active"
                    " on conflict (symbol) do nothing")
        cur.execute("select count(distinct symbol) from watchlists where active")
        return int(cur.fetchone()[0])


def _log_row(row: Published, debug: bool) -> None:
    if row.status == "MISSING_OPTIONS":
        log.info("%s %s: no options snapshot at or before the date (MISSING_OPTIONS)", row.symbol, row.as_of)
    elif row.status == "PARTIAL":
        log.info("%s %s: snapshot has no IV-valid contracts with DTE >= 1 (PARTIAL)", row.symbol, row.as_of)
    elif row.status == "ERROR" and row.error is None:
        log.error("%s %s: %s (ERROR)", row.symbol, row.as_of, ",".join(row.diagnostics))
    if "stale_options_snapshot" in row.diagnostics:
        log.info("%s %s: latest options snapshot is from %s (stale)", row.symbol, row.as_of,
                 row.document.get("options_snapshot_time"))
    if debug:
        values = row.document.get("metrics", {})
        metrics = " ".join(f"{k}={values[k]}" for k in sorted(values))
        log.debug("%s %s %s %s counts=%s diagnostics=%s", row.symbol, row.as_of, row.status, metrics,
                  row.document.get("counts"), ",".join(row.diagnostics) or "-")


def run(args: argparse.Namespace) -> int:
    """`kapman metrics`; returns the exit code."""
    started = time.monotonic()
    start, end = requested_dates(args)
    dates = trading_days(start, end)
    database = dbmod.resolve(args.db_url)
    dbmod.upgrade(database)
    summary: dict[str, Any] = {
        "command": "metrics", "start_date": start.isoformat(), "end_date": end.isoformat(),
        "trading_dates": len(dates), "fill_missing": args.fill_missing,
    }
    with database.connect(autocommit=True) as lock_conn, dbmod.advisory_lock(lock_conn, "metrics") as got:
        if not got:
            raise dbmod.LockHeld(f"another kapman metrics run holds the lock on {database.display}")
        tickers = _active_watchlist_tickers(lock_conn)
        version = model_version()
        summary |= {"tickers": tickers, "model_version": version}
        log.log(SUMMARY, "START metrics dates=%s..%s (%d trading dates) tickers=%d fill_missing=%s "
                "model_version=%s %s", start, end, len(dates), tickers, args.fill_missing, version,
                database.display)
        rows: list[Published] = []
        code = 0
        if not dates:
            log.warning("no trading dates between %s and %s: nothing to compute", start, end)
        elif dates[0].year < SEED_YEARS[0] or dates[-1].year > SEED_YEARS[1]:
            log.error("the trading calendar of the models (dbt_project/seeds/trading_days.csv) covers "
                      "%d-%d only: regenerate it to compute %s..%s", *SEED_YEARS, start, end)
            code = 1
        elif tickers == 0:
            log.warning("no active watchlist symbols: nothing to compute (kapman watchlists load)")
        else:
            try:
                seed_current = seed_is_current(lock_conn, _dbt.relation(database, "trading_days"))
                build(database, dates[0], dates[-1], args.fill_missing, with_seed=not seed_current)
                rows = publish(database, _dbt.relation(database, GRID), _dbt.relation(database, MART),
                               version, args.fill_missing)
            except DbtError as exc:
                log.error("%s", exc)
                summary["error"] = str(exc)
                code = 1
            heartbeat = Heartbeat(log, args.heartbeat, len(rows), "ticker-dates")
            for row in rows:
                _log_row(row, args.debug)
                heartbeat.tick(last=f"{row.symbol}@{row.as_of}")
    counts = Counter(row.status for row in rows)
    if rows and counts["ERROR"] == len(rows):
        code = 1
    summary |= {
        "processed": len(rows), "success": counts["SUCCESS"], "missing_options": counts["MISSING_OPTIONS"],
        "partial": counts["PARTIAL"], "errors": counts["ERROR"],
        "failed": [{"symbol": r.symbol, "date": r.as_of.isoformat(), "diagnostics": r.diagnostics}
                   for r in rows if r.status == "ERROR"],
        "duration_seconds": round(time.monotonic() - started, 3), "exit_code": code,
    }
    log.log(SUMMARY, "END metrics processed=%d success=%d missing_options=%d partial=%d errors=%d "
            "duration=%.1fs", summary["processed"], summary["success"], summary["missing_options"],
            summary["partial"], summary["errors"], summary["duration_seconds"])
    if args.summary_json:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return code


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-trading-days-seed"]:
        TRADING_DAYS_SEED.write_text(trading_days_seed_text())
    else:
        sys.exit("usage: python -m loaders.metrics --write-trading-days-seed")
