"""The simulator in a process of its own. Generating and serialising chains is CPU work that holds
the GIL: served from the loader's own process, it took about two thirds of the GIL time of a
`kapman ingest --provider simulator` run (measured with py-spy --gil), so the loader waited for
the server that fed it. A child process serves on the other core."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date
from multiprocessing.connection import Connection
from types import TracebackType

from .faults import Fault


def _serve(conn: Connection, seed: int, api_key: str, today: date | None, latency_s: float,
           warm: list[str], cache_size: int) -> None:
    """Child process: serve until told to stop; answer "cpu" with the CPU seconds since the last,
    "requests" with the requests served (the last 100,000) by endpoint family."""
    from ..trading_calendar import today as calendar_today
    from .market import Market
    from .server import SimulatorServer

    market = Market(seed, cache_size=cache_size)
    for symbol in warm:  # generated before anyone times the loader
        market.chain_json(symbol, today or calendar_today())
    with SimulatorServer(market, api_key=api_key, today=today) as server:
        if latency_s:
            server.set_fault("*", Fault(latency_s=latency_s))
        conn.send(server.base_url)
        started = time.process_time()
        while True:
            message = conn.recv()
            if message == "requests":
                conn.send(Counter(server.history.family(r.path) or "snapshot" for r in server.requests))
                continue
            conn.send(time.process_time() - started)
            started = time.process_time()
            if message == "stop":
                return


class SimulatorProcess:
    """A SimulatorServer of `Market(seed)` on a free loopback port, in a child process.

    Args:
        seed: the market's seed.
        api_key: the only key the server accepts.
        today: the date served without `date=` (default: the current date in New York, which the
            child reads as the parent would: KAPMAN_TODAY is inherited).
        latency_s: every page delayed by this much (a remote API's round trip).
        warm: symbols whose chains on `today` are generated before the server starts.
        cache_size: chains kept serialised (see Market).
    """

    def __init__(self, seed: int = 42, *, api_key: str, today: date | None = None, latency_s: float = 0.0,
                 warm: Sequence[str] = (), cache_size: int = 32) -> None:
        ctx = mp.get_context("spawn")  # a clean child: no caches, locks or threads inherited
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve, args=(child, seed, api_key, today, latency_s, list(warm), max(cache_size, len(warm) + 8)),
            name="kapman-simulator", daemon=True)
        self._process.start()
        child.close()
        try:
            self.base_url: str = self._conn.recv()
        except EOFError:
            self._process.join(timeout=10)
            raise RuntimeError(f"the simulator process exited before serving (exit {self._process.exitcode})") from None
        self.api_key = api_key

    def cpu_seconds(self) -> float:
        """The server's CPU seconds since it started serving or since the last call."""
        self._conn.send("cpu")
        return float(self._conn.recv())

    def requests_by_family(self) -> Counter[str]:
        """Requests served so far (the last 100,000) by endpoint family: "snapshot", or a history
        family (simulator/history.py FAMILIES)."""
        self._conn.send("requests")
        return self._conn.recv()

    def close(self) -> None:
        with contextlib.suppress(OSError, EOFError):
            self._conn.send("stop")
            self._conn.recv()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def __enter__(self) -> SimulatorProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
