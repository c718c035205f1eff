"""The `kapman` command line: argument parsing and dispatch; the work lives in the other modules."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from datetime import date, datetime
from pathlib import Path

from . import db as dbmod
from .logs import setup_logging

log = logging.getLogger("kapman")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_LOCKED = 0, 1, 2, 3


def _iso_date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None


def _iso_datetime(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO timestamp: {text!r}") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"timestamp needs a time zone (e.g. +00:00): {text!r}")
    return value


def _bounded_int(lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo} and {hi}: {value}")
        return value

    return parse


def _symbols(text: str) -> list[str]:
    symbols = [s.strip().upper() for s in text.split(",") if s.strip()]
    if not symbols:
        raise argparse.ArgumentTypeError("--symbols needs at least one symbol, e.g. AAPL,MSFT")
    return symbols


def add_db_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--db-url",
        metavar="URL",
        help="PostgreSQL URL (default: $DATABASE_URL, else an embedded server with its data under .kapman/)",
    )


def add_logging_arguments(parser: argparse.ArgumentParser, debug: bool = False) -> None:
    parser.add_argument("--verbose", "-v", action="store_true", help="log DEBUG detail")
    parser.add_argument("--quiet", "-q", action="store_true", help="log only summaries and errors")
    if debug:
        parser.add_argument("--debug", action="store_true", help="per-metric detail (implies --verbose)")
    parser.add_argument(
        "--heartbeat", type=_bounded_int(0, 1_000_000), default=10, metavar="N",
        help="log a progress line every N symbols (0: off; default 10)",
    )
    parser.add_argument("--summary-json", type=Path, metavar="PATH", help="also write the run summary as JSON")


def add_ingest_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of `kapman ingest`; `dlt pipeline run` registers exactly the same ones."""
    dates = parser.add_argument_group("dates (default: the current NYSE trading date)")
    dates.add_argument("--as-of", type=_iso_date, metavar="YYYY-MM-DD", help="a single trading date")
    dates.add_argument("--start-date", type=_iso_date, metavar="YYYY-MM-DD", help="range start (inclusive)")
    dates.add_argument("--end-date", type=_iso_date, metavar="YYYY-MM-DD", help="range end (inclusive)")
    dates.add_argument(
        "--snapshot-time", type=_iso_datetime, metavar="ISO",
        help="store under this snapshot time instead of D 23:59:59.999999 UTC (single day only)",
    )
    parser.add_argument(
        "--symbols", type=_symbols, metavar="A,B",
        help="only these symbols (intersected with the active watchlists)",
    )
    parser.add_argument(
        "--concurrency", type=_bounded_int(1, 32), default=4, metavar="N",
        help="symbols fetched in parallel, 1 to 32 (default 4)",
    )
    parser.add_argument("--force", action="store_true", help="re-fetch what the ledger says is done (a snapshot's rows are never replaced "
                        "by a reconstruction)")
    parser.add_argument(
        "--provider", choices=("polygon", "simulator"), default="polygon",
        help="polygon: the live API ($POLYGON_API_KEY, $POLYGON_BASE_URL): the current trading date from its "
        "snapshot, past dates reconstructed from its historical endpoints; simulator: the built-in market "
        "simulator over loopback HTTP, any date (default polygon)",
    )
    add_db_argument(parser)
    add_logging_arguments(parser)
    parser.add_argument("--dry-run", action="store_true", help="resolve dates and symbols and say what would run, writing nothing; for past "
                        "dates it fetches the reference pages only, to count the requests a "
                        "reconstruction needs and how long they take at the request limit")


def validate_ingest_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Flag combinations argparse cannot express; a violation is a usage error (exit 2)."""
    if args.as_of and (args.start_date or args.end_date):
        parser.error("--as-of cannot be combined with --start-date/--end-date")
    if bool(args.start_date) != bool(args.end_date):
        parser.error("--start-date and --end-date must be given together")
    if args.start_date and args.end_date < args.start_date:
        parser.error("--end-date must not be before --start-date")
    if args.snapshot_time and args.start_date:
        parser.error("--snapshot-time is only allowed for a single day (not with --start-date/--end-date)")
    if args.verbose and args.quiet:
        parser.error("--verbose and --quiet are mutually exclusive")


def validate_metrics_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.date and bool(args.start_date) != bool(args.end_date):
        parser.error("--start-date and --end-date must be given together")
    if not args.date and args.start_date and args.end_date < args.start_date:
        parser.error("--end-date must not be before --start-date")
    if (args.verbose or args.debug) and args.quiet:
        parser.error("--verbose/--debug and --quiet are mutually exclusive")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kapman",
        description="Options-data layer: Polygon option-chain snapshots into PostgreSQL (dlt), "
        "volatility metrics in SQL (dbt), published to daily_snapshots.volatility_metrics_json.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_db = sub.add_parser("db", help="schema management")
    db_sub = p_db.add_subparsers(dest="db_command", required=True, metavar="SUBCOMMAND")
    p_up = db_sub.add_parser("upgrade", help="create or upgrade the schema (idempotent)")
    add_db_argument(p_up)
    p_prune = db_sub.add_parser("prune", help="drop options_chains partitions older than --retain-days")
    add_db_argument(p_prune)
    p_prune.add_argument("--retain-days", type=_bounded_int(1, 100_000), required=True, metavar="N",
                         help="keep whole months that end within the last N days")

    p_env = sub.add_parser("env", help="print export lines (PG*, DBT_PROFILES_DIR) for psql and dbt by hand")
    add_db_argument(p_env)
    p_env.add_argument("--keep-running", action="store_true",
                       help="leave the embedded server running after this command (for dbt/psql by hand)")

    p_wl = sub.add_parser("watchlists", help="watchlist files")
    wl_sub = p_wl.add_subparsers(dest="watchlists_command", required=True, metavar="SUBCOMMAND")
    p_load = wl_sub.add_parser(
        "load", help="load watchlist files (one symbol per line, # comments; id = file name)"
    )
    p_load.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    add_db_argument(p_load)

    p_ingest = sub.add_parser(
        "ingest", help="ingest option-chain snapshots for the active watchlists (same as `dlt pipeline run`)",
        description="Fetch each active watchlist symbol's full option chain and merge it into options_chains: "
        "the current trading date from the live snapshot, a past date reconstructed from the provider's "
        "historical endpoints (rows marked source = 'reconstructed').",
    )
    add_ingest_arguments(p_ingest)

    p_metrics = sub.add_parser(
        "metrics", help="compute volatility metrics with dbt and publish them to daily_snapshots",
        description="Runs `dbt build` for the chosen trading dates, then upserts "
        "daily_snapshots.volatility_metrics_json for every active watchlist ticker.",
    )
    add_db_argument(p_metrics)
    p_metrics.add_argument("--date", type=_iso_date, metavar="YYYY-MM-DD",
                           help="a single trading date (wins over the range; default: the latest trading date)")
    p_metrics.add_argument("--start-date", type=_iso_date, metavar="YYYY-MM-DD", help="range start (inclusive)")
    p_metrics.add_argument("--end-date", type=_iso_date, metavar="YYYY-MM-DD", help="range end (inclusive)")
    p_metrics.add_argument("--fill-missing", action="store_true",
                           help="only tickers whose volatility_metrics_json is missing for the date")
    add_logging_arguments(p_metrics, debug=True)

    p_sim = sub.add_parser("simulator", help="the built-in market simulator")
    sim_sub = p_sim.add_subparsers(dest="simulator_command", required=True, metavar="SUBCOMMAND")
    p_serve = sim_sub.add_parser("serve", help="serve simulated chains as a Polygon-compatible HTTP API")
    p_serve.add_argument("--port", type=_bounded_int(0, 65535), default=8765, help="port (default 8765)")
    p_serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p_serve.add_argument("--seed", type=int, default=42, help="market seed (default 42)")
    p_serve.add_argument("--plan", choices=("full", "starter"), default="full",
                         help="response shape of a Polygon plan: full (quotes, trades, fmv, spot) or "
                         "starter (none of those) (default full)")

    p_report = sub.add_parser("report", help="write the HTML/PNG volatility report from the database")
    add_db_argument(p_report)
    p_report.add_argument("--output", type=Path, default=Path("report"), metavar="DIR",
                          help="output directory (default ./report)")

    p_demo = sub.add_parser("demo", help="end to end on simulated data and the embedded database")
    p_demo.add_argument("--days", type=_bounded_int(1, 400), default=30,
                        help="trading days (default 30: the last 10 have an IV rank, which needs 20 days of "
                        "history; --days 60 gives 40)")
    p_demo.add_argument("--history", type=_bounded_int(0, 399), nargs="?", const=20, default=0, metavar="N",
                        help="reconstruct the first N of the days from the simulator's historical endpoints "
                        "(`ingest --provider polygon`, as for a real backfill) instead of snapshots; "
                        "--history alone: 20, so that every snapshot day has an IV rank (default 0)")
    p_demo.add_argument("--output", type=Path, default=Path("report"), metavar="DIR")
    return parser


def _cmd_db(args: argparse.Namespace) -> int:
    database = dbmod.resolve(args.db_url)
    if args.db_command == "upgrade":
        applied = dbmod.upgrade(database)
        log.info("%s: schema up to date (%s)", database.display,
                 f"applied {', '.join(applied)}" if applied else "nothing to apply")
        return EXIT_OK
    dbmod.upgrade(database)
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("select drop_options_chains_partitions_before(current_date - %s)", (args.retain_days,))
        log.info("dropped %d options_chains partitions older than %d days", cur.fetchone()[0], args.retain_days)
    return EXIT_OK


def _cmd_env(args: argparse.Namespace) -> int:
    import shlex

    database = dbmod.resolve(args.db_url)
    dbmod.upgrade(database)
    project_dir = Path(__file__).resolve().parent.parent
    env = database.libpq_env() | {"DBT_PROFILES_DIR": str(project_dir / "profiles"),
                                  "DBT_PROJECT_DIR": str(project_dir)}
    for key, value in env.items():
        sys.stdout.write(f"export {key}={shlex.quote(value)}\n")
    if database.embedded_dir:
        if args.keep_running:
            dbmod.keep_embedded_running()
            log.info("embedded server left running (data in %s)", database.embedded_dir)
        else:
            log.warning("the embedded server stops when this command exits: "
                        "use `kapman env --keep-running` to use it from dbt/psql")
    return EXIT_OK


def _cmd_watchlists(args: argparse.Namespace) -> int:
    from .watchlists import load_watchlists

    database = dbmod.resolve(args.db_url)
    dbmod.upgrade(database)
    return load_watchlists(database, args.paths)


def run_ingest(args: argparse.Namespace) -> int:
    from .ingest import run

    return run(args)


def _cmd_metrics(args: argparse.Namespace) -> int:
    from .metrics import run

    return run(args)


def _cmd_simulator(args: argparse.Namespace) -> int:
    from .simulator.server import serve

    return serve(port=args.port, host=args.host, seed=args.seed, plan=args.plan)


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import run

    return run(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run

    return run(args, main)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "db": _cmd_db, "env": _cmd_env, "watchlists": _cmd_watchlists, "ingest": run_ingest,
    "metrics": _cmd_metrics, "simulator": _cmd_simulator, "report": _cmd_report, "demo": _cmd_demo,
}


def dispatch(command: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Run a command and turn expected failures into one-line messages and exit codes."""
    try:
        return command(args)
    except dbmod.DatabaseError as exc:
        log.error("%s", exc)
        return EXIT_FAILED
    except dbmod.LockHeld as exc:
        log.error("%s", exc)
        return EXIT_LOCKED
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "ingest":
        validate_ingest_arguments(parser, args)
    if args.command == "metrics":
        validate_metrics_arguments(parser, args)
    setup_logging(
        verbose=getattr(args, "verbose", False), quiet=getattr(args, "quiet", False),
        debug=getattr(args, "debug", False),
    )
    return dispatch(COMMANDS[args.command], args)


if __name__ == "__main__":
    sys.exit(main())
