"""Slicing of large chains: a chain known to be large is fetched as parallel expiration-range
slices (its pages would otherwise come one after another), and the slices make one result."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from .rows import ChainResult

log = logging.getLogger(__name__)

ExpirationRange = tuple[date | None, date | None]  # inclusive bounds; None: open on that side
ExpirationCounts = list[tuple[date, int]]  # (expiration, contracts) of a chain, in date order


def expiration_slices(counts: Sequence[tuple[date, int]], slice_contracts: int) -> list[ExpirationRange]:
    """Expiration ranges that split a chain into parallel fetches of about `slice_contracts`
    contracts each, cut at expirations so that the slices hold similar numbers of contracts.

    Args:
        counts: (expiration, contracts) of an earlier snapshot of the chain, in date order.
        slice_contracts: contracts per slice (0: never split).

    Returns:
        No ranges when the chain is small enough for one fetch; else ranges whose first and last
        are open, so that together they cover any expiration (listed since or not).
    """
    total = sum(n for _, n in counts)
    parts = -(-total // slice_contracts) if slice_contracts > 0 else 0
    if parts < 2:
        return []
    cuts: list[date] = []  # the last expiration of each slice but the last
    seen = 0  # contracts up to and including `previous`
    for (previous, before), (_, n) in zip(counts, counts[1:], strict=False):
        seen += before
        # Cut before an expiration that lies mostly beyond the next boundary (none is split).
        if len(cuts) < parts - 1 and seen + n / 2 > total * (len(cuts) + 1) / parts:
            cuts.append(previous)
    if not cuts:
        return []
    starts = [None, *(cut + timedelta(days=1) for cut in cuts)]
    return list(zip(starts, [*cuts, None], strict=True))


def merge_slices(results: Sequence[ChainResult]) -> ChainResult:
    """One symbol's result from its slices' (in slice order): the symbol fails if any slice did,
    and then nothing of it is loaded, exactly as when one request of an unsplit chain fails."""
    first = results[0]
    merged = ChainResult(first.symbol, first.ticker_id, snapshot_time=first.snapshot_time,
                         pages=sum(r.pages for r in results),
                         elapsed=max(r.elapsed for r in results))
    for r in results:
        merged.reject_reasons.update(r.reject_reasons)
        merged.parse_cpu_s += r.parse_cpu_s
    failed = [r for r in results if not r.ok]
    if failed:
        fatal = [r for r in failed if r.fatal]
        merged.error = (fatal or failed)[0].error
        merged.fatal = bool(fatal)
        merged.attempted = any(r.attempted for r in results)
        return merged
    merged.tables = [t for r in results for t in r.tables]
    merged.count()
    return merged


def joined(futures: list[Future[ChainResult]]) -> Future[ChainResult]:
    """A future resolved with merge_slices of `futures` once all of them are done."""
    joined: Future[ChainResult] = Future()
    left = [len(futures)]
    lock = threading.Lock()

    def done(_: Future[ChainResult]) -> None:
        with lock:
            left[0] -= 1
            if left[0]:
                return
        try:
            joined.set_result(merge_slices([f.result() for f in futures]))
        except BaseException as exc:  # noqa: BLE001 (handed to whoever waits on the future)
            joined.set_exception(exc)

    for future in futures:
        future.add_done_callback(done)
    return joined


class SlicePlanner:
    """Which symbols to fetch as slices: those whose latest chain (fetched earlier in the run, else
    stored) held at least twice `slice_contracts`. Thread-safe."""

    def __init__(self, slice_contracts: int) -> None:
        self.slice_contracts = slice_contracts
        self._fetched: dict[str, ExpirationCounts] = {}
        self._lock = threading.Lock()

    def remember(self, result: ChainResult) -> None:
        """Keep the expirations of a large fetched chain for slicing its next fetch."""
        if self.slice_contracts <= 0 or result.contracts < 2 * self.slice_contracts or not result.tables:
            return
        counts = pc.value_counts(pa.chunked_array([t.column("expiration_date") for t in result.tables]))
        pairs = sorted(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))
        with self._lock:
            self._fetched[result.symbol] = pairs

    def plan(self, symbols: Sequence[str],
             stored: Callable[[Sequence[str]], Mapping[str, ExpirationCounts]]) -> dict[str, list[ExpirationRange]]:
        """The slices of each symbol to fetch as slices (the others are absent); `stored(symbols)`
        gives the (expiration, contracts) of the symbols' latest stored chains of that size."""
        if self.slice_contracts <= 0:
            return {}
        with self._lock:
            counts = {s: self._fetched[s] for s in symbols if s in self._fetched}
        unknown = [s for s in symbols if s not in counts]
        if unknown:
            counts |= stored(unknown)
        slices = {s: expiration_slices(c, self.slice_contracts) for s, c in counts.items()}
        for symbol, ranges in slices.items():
            if ranges:
                log.debug("%s: fetched as %d parallel expiration-range slices", symbol, len(ranges))
        return {s: r for s, r in slices.items() if r}
