"""Benchmark the market simulator: serve a full-market day over HTTP with limit=250.

By default it serves every 10th symbol of full_market_universe(500) (about 150,000 contracts,
a representative sample: the indexes, the demo names and the synthetic tiers interleave in
alphabetical order) and extrapolates to the whole day; `--every 1` serves all of it.

The server runs in its own process with a cold cache, so its CPU time covers generating the chains
as well as serving them; contracts per CPU second of that process is the per-core figure. Baselines
from the same run: serialising the same contract dicts with json.dumps alone, and generating them.

    .venv/bin/python bench/bench_simulator.py [--every 10] [--date 2025-11-21] [--seed 42]
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import time
from datetime import date
from multiprocessing.connection import Connection

import requests

from loaders.simulator import Market, SimulatorServer, full_market_universe

log = logging.getLogger("bench_simulator")
KEY = "bench-key"


def _serve(conn: Connection, seed: int) -> None:
    """Child process: serve a cold market; report the process's CPU seconds when told to stop."""
    with SimulatorServer(Market(seed), api_key=KEY) as server:
        started = time.process_time()
        conn.send(server.base_url)
        conn.recv()
        conn.send(time.process_time() - started)


def _fetch_all(base_url: str, symbols: list[str], as_of: date) -> tuple[int, int, float]:
    """Page through every chain like a loader would; returns contracts, requests, seconds."""
    contracts = pages = 0
    started = time.perf_counter()
    with requests.Session() as session:
        for symbol in symbols:
            url: str | None = f"{base_url}/v3/snapshot/options/{symbol}"
            params: dict[str, str | int] = {"limit": 250, "date": as_of.isoformat()}
            while url:
                response = session.get(url, params=params, headers={"Authorization": f"Bearer {KEY}"})
                response.raise_for_status()
                body = response.json()
                contracts += len(body["results"])
                pages += 1
                url, params = body.get("next_url"), {}
    return contracts, pages, time.perf_counter() - started


def _baselines(symbols: list[str], as_of: date, seed: int) -> tuple[float, float]:
    """Contracts/s of generating the dicts, and of json.dumps on the same dicts."""
    market = Market(seed)
    generated = dumped = 0.0
    count = 0
    for symbol in symbols:
        started = time.process_time()
        chain = market.chain(symbol, as_of)
        generated += time.process_time() - started
        started = time.process_time()
        json.dumps(chain, separators=(",", ":"))
        dumped += time.process_time() - started
        count += len(chain)
    return count / generated, count / dumped


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=10, help="serve every Nth symbol (1: all)")
    parser.add_argument("--date", type=date.fromisoformat, default=date(2025, 11, 21))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    universe = full_market_universe(500)
    symbols = universe[:: args.every]
    gen_rate, dumps_rate = _baselines(symbols, args.date, args.seed)

    ctx = mp.get_context("spawn")  # a clean child: no caches or threads inherited
    parent, child = ctx.Pipe()
    server = ctx.Process(target=_serve, args=(child, args.seed))
    server.start()
    base_url = parent.recv()
    contracts, pages, wall = _fetch_all(base_url, symbols, args.date)
    parent.send("stop")
    server_cpu = parent.recv()
    server.join()

    per_core = contracts / server_cpu
    full_day = contracts * len(universe) / len(symbols)
    log.info("symbols served: %d of %d (every %d), %s contracts in %d requests (limit=250)",
             len(symbols), len(universe), args.every, f"{contracts:,}", pages)
    log.info("server: %.1f CPU s -> %s contracts/s per core (cold cache: generation included)",
             server_cpu, f"{per_core:,.0f}")
    log.info("end to end, one client connection: %.1f s wall -> %s contracts/s",
             wall, f"{contracts / wall:,.0f}")
    log.info("baselines, same contracts: generating the dicts %s/s; json.dumps of the dicts %s/s",
             f"{gen_rate:,.0f}", f"{dumps_rate:,.0f}")
    log.info("full-market day: about %s contracts -> about %.0f s of server CPU on one core",
             f"{full_day:,.0f}", full_day / per_core)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
