"""Ingestion throughput on simulated chains: `python bench/ingest_throughput.py [--db-url URL]`.

Loads a watchlist of the simulator's indexes and well-known names (about 75,000 contracts a day),
then times `kapman ingest --provider simulator` on one day: the first load (every row inserted),
an unchanged re-run with --force (every row compared, none written), and a five-day range.
Without --db-url it uses a scratch database on the embedded server under ./.kapman.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from loaders import cli
from loaders import db as dbmod
from loaders.simulator.market import _INDEXES, _KNOWN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db-url", help="a scratch database (its options data is replaced)")
    parser.add_argument("--concurrency", default="4")
    args = parser.parse_args()
    if args.db_url:
        database = dbmod.Database.from_url(args.db_url)
    else:
        server = dbmod.start_embedded()
        with server.with_dbname("postgres").connect(autocommit=True) as conn, conn.cursor() as cur:
            cur.execute("drop database if exists kapman_bench with (force)")
            cur.execute("create database kapman_bench")
        database = server.with_dbname("kapman_bench")
    dbmod.upgrade(database)
    symbols = [s for s in _INDEXES if s != "I:VIX"] + list(_KNOWN)
    work = Path(tempfile.mkdtemp(prefix="kapman-bench-"))
    watchlist = work / "bench.txt"
    watchlist.write_text("\n".join(symbols) + "\n")
    cli.main(["watchlists", "load", str(watchlist), "--db-url", database.url()])
    runs = [("first load, 1 day", ["--as-of", "2025-06-02"]),
            ("unchanged re-run (--force), 1 day", ["--as-of", "2025-06-02", "--force"]),
            ("range of 5 new days", ["--start-date", "2025-06-09", "--end-date", "2025-06-13"])]
    for label, extra in runs:
        summary = work / "summary.json"
        started = time.monotonic()
        code = cli.main(["ingest", "--provider", "simulator", "--db-url", database.url(), "--quiet",
                         "--concurrency", args.concurrency, "--summary-json", str(summary), *extra])
        elapsed = time.monotonic() - started
        result = json.loads(summary.read_text())
        contracts = sum(s["contracts"] for s in result["symbols"])
        print(f"{label:36} exit {code}  {contracts:>7} contracts  {result['rows_written']:>7} written  "
              f"{elapsed:6.1f} s  {contracts / elapsed:8.0f} contracts/s")


if __name__ == "__main__":
    main()
