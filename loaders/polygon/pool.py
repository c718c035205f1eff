"""The fetch pool: chains fetched by parallel threads, a large chain as parallel expiration-range
slices joined into one result (slicing.py)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Protocol

from .helpers import ProviderError, one_line
from .rows import ChainResult
from .slicing import ExpirationRange, joined

log = logging.getLogger(__name__)


class ChainSource(Protocol):
    """What fetches one day's chains (a ChainClient, or another provider's), from several threads
    at once: the symbol's chain (or one expiration slice); ProviderError when nothing can succeed."""

    def fetch(self, symbol: str, ticker_id: str, snapshot_time: datetime,
              expirations: ExpirationRange | None = None) -> ChainResult: ...


class ChainFetcher:
    """A pool of `concurrency` threads fetching chains in submission order. Callers may submit the
    next batch (or day) before loading the current one: its fetches start as workers free up, so
    fetching goes on while a load runs.

    On a ProviderError nothing more is started: symbols not yet started come back `fatal`, not
    attempted, with the cause.
    """

    def __init__(self, concurrency: int) -> None:
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="polygon")
        self._stop = threading.Event()
        self.fatal: str | None = None

    def submit(self, client: ChainSource, symbols: Mapping[str, str], snapshot_time: datetime,
               slices: Mapping[str, Sequence[ExpirationRange]] | None = None) -> list[Future[ChainResult]]:
        """Queue the symbols' fetches; returns their futures in symbol order. A symbol with
        `slices` (expiration ranges covering every date, see expiration_slices) is fetched as
        that many request chains in parallel, one future for all of them (merge_slices)."""
        futures = []
        for symbol, ticker_id in symbols.items():
            parts = list((slices or {}).get(symbol) or [None])
            pending = [self._pool.submit(self._work, client, symbol, ticker_id, snapshot_time, part)
                       for part in parts]
            futures.append(pending[0] if len(pending) == 1 else joined(pending))
        return futures

    def _work(self, client: ChainSource, symbol: str, ticker_id: str, snapshot_time: datetime,
              expirations: ExpirationRange | None = None) -> ChainResult:
        if self._stop.is_set():
            return ChainResult(symbol, ticker_id, error=f"not fetched: {self.fatal or 'the run stopped'}",
                               fatal=True, attempted=False)
        try:
            return client.fetch(symbol, ticker_id, snapshot_time, expirations)
        except ProviderError as exc:
            self.fatal = self.fatal or str(exc)
            self._stop.set()
            return ChainResult(symbol, ticker_id, error=str(exc), fatal=True)
        except Exception as exc:  # a bug or an unexpected library error: this symbol only
            log.debug("%s: unexpected error", symbol, exc_info=True)
            return ChainResult(symbol, ticker_id, error=one_line(f"{type(exc).__name__}: {exc}"))

    def close(self) -> None:
        """Start nothing new; wait for the fetches in flight."""
        self._stop.set()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> ChainFetcher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
