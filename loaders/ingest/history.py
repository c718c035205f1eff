"""Past days with the live provider: each (symbol, day) reconstructed from Polygon's historical
endpoints (shared/spec/history.md). What a symbol's days need is fetched once for all of them:
the contracts listed on each day, each contract's bars over the whole range, the underlying's
closes, its dividends and open interest; the Treasury curves once per run."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

from ..logs import SUMMARY
from ..polygon import ChainResult, PolygonConfiguration, RateLimiter, SymbolFetchError, one_line
from ..polygon.history import HistoryClient, HistoryRefused, bar_session, chain_rows, occ_root
from ..reconstruction import STANDARD_SHARES, reconstruct_day
from ..trading_calendar import trading_days

log = logging.getLogger("kapman.ingest")

PROGRESS_REQUESTS = 500  # a progress line every this many requests ...
PROGRESS_SECONDS = 30.0  # ... or this many seconds, whichever comes first
CURVE_LOOKBACK_DAYS = 31  # a day without a curve takes the latest earlier one, at most this far back
_T = TypeVar("_T")


def previous_session(day: date) -> date:
    """The trading day before `day`."""
    return trading_days(day - timedelta(days=14), day - timedelta(days=1))[-1]


def duration(requests: int, per_minute: float | None) -> str:
    """How long `requests` take at the plan's limit, in words."""
    if per_minute is None:
        return "no client-side request limit set (POLYGON_REQUESTS_PER_MINUTE)"
    return f"about {span(requests / per_minute)} at {per_minute:g} requests/minute"


def span(minutes: float) -> str:
    """A duration in minutes, hours or days."""
    return (f"{minutes / 1440:.1f} days" if minutes >= 1440 else f"{minutes / 60:.1f} hours" if minutes >= 120
            else f"{minutes:.0f} minutes")


def is_standard(contract: Any) -> bool:
    """A call or put of 100 shares and nothing else (what a reconstruction keeps and prices)."""
    return (isinstance(contract, Mapping) and isinstance(contract.get("ticker"), str)
            and contract.get("contract_type") in ("call", "put")
            and contract.get("shares_per_contract") == STANDARD_SHARES and not contract.get("additional_underlyings"))


class Progress:
    """Requests done and left during a backfill, logged every PROGRESS_REQUESTS or PROGRESS_SECONDS."""

    def __init__(self, per_minute: float | None) -> None:
        self.per_minute, self.done, self.planned = per_minute, 0, 0
        self._lock = threading.Lock()
        self._logged_at, self._logged_done = time.monotonic(), 0

    def plan(self, requests: int) -> None:
        with self._lock:
            self.planned += requests

    def tick(self) -> None:
        with self._lock:
            self.done += 1
            now = time.monotonic()
            if self.done - self._logged_done < PROGRESS_REQUESTS and now - self._logged_at < PROGRESS_SECONDS:
                return
            self._logged_at, self._logged_done = now, self.done
            left = max(self.planned - self.done, 0)
        log.info("history progress: %d requests done, %d left%s", self.done, left,
                 f" ({duration(left, self.per_minute)})" if self.per_minute else "")


@dataclass
class _Symbol:
    """What one symbol's days need, fetched once; each day's share is dropped once reconstructed."""

    days: list[date]
    listings: dict[date, list[Any]] = field(default_factory=dict)
    pages: dict[date, int] = field(default_factory=dict)
    errors: dict[date, str] = field(default_factory=dict)  # the (symbol, day)s that fail, and why
    bars: dict[date, dict[str, tuple[Any, Any, Any]]] = field(default_factory=dict)
    closes: dict[date, float] = field(default_factory=dict)
    dividends: list[Any] = field(default_factory=list)
    open_interest: dict[date, dict[str, int]] | None = None  # session -> ticker -> OI; None: no endpoint
    left: int = 0

    def fail(self, days: Iterable[date], error: str) -> None:
        for day in days:
            self.errors.setdefault(day, error)


class Backfill:
    """One run's reconstructions. Thread-safe: the fetch threads ask for (symbol, day)s in any
    order; the first one of a symbol fetches what all of its days need."""

    def __init__(self, config: PolygonConfiguration, concurrency: int, limiter: RateLimiter | None) -> None:
        self.progress = Progress(config.request_limit)
        # Connections for the fetch threads and the history pool's alike.
        self.client = HistoryClient(config, 2 * concurrency, limiter, on_request=self.progress.tick)
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="history")
        self._days_of: dict[str, list[date]] = {}
        self._symbols: dict[str, _Symbol] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        self._curve_lock = threading.Lock()
        self._curves: list[dict[str, Any]] | None = None
        self._curve_error: str | None = None
        self._said: set[str] = set()

    def plan(self, todo: Mapping[date, Sequence[str]]) -> None:
        """The (symbol, day)s this run reconstructs: each symbol's bars cover all of its days."""
        days_of: dict[str, list[date]] = {}
        for day in sorted(todo):
            for symbol in todo[day]:
                days_of.setdefault(symbol, []).append(day)
        self._days_of = days_of
        pairs = sum(len(d) for d in days_of.values())
        if pairs:
            log.info("history: %d (symbol, day)s to reconstruct for %d symbols; per symbol its reference pages per"
                     " day, one aggregates request per contract for the whole range, and a few more (%s)", pairs,
                     len(days_of), "`kapman ingest --dry-run` counts them" if self.progress.per_minute else
                     "no client-side request limit")

    def fetch(self, day: date, symbol: str, ticker_id: str, snapshot_time: datetime) -> ChainResult:
        """The (symbol, day)'s reconstructed chain, or its error (ProviderError propagates)."""
        started = time.monotonic()
        result = ChainResult(symbol, ticker_id, snapshot_time=snapshot_time, source="reconstructed")
        history = self._prepared(symbol, day)
        try:
            error = history.errors.get(day) or self._curve_error
            curve = None if error else self._curve(day)
            if error or curve is None:
                result.error = error or self._curve_error or f"no Treasury curve on or before {day}"
            else:
                self._reconstruct(result, history, day, curve)
        except (SymbolFetchError, ValueError) as exc:  # a bar of another day, an unusable input
            result.error = one_line(f"cannot reconstruct {day}: {exc}")
        finally:
            self._release(symbol, history, day)
        result.elapsed = time.monotonic() - started
        result.count()  # tables are set only once the day is rebuilt
        return result

    def _reconstruct(self, result: ChainResult, history: _Symbol, day: date, curve: Mapping[str, Any]) -> None:
        bars = {t: {"c": c, "v": v, "t": ms} for t, (c, v, ms) in history.bars.get(day, {}).items()}
        oi = None if history.open_interest is None else history.open_interest.get(previous_session(day), {})
        rebuilt = reconstruct_day(day, history.listings.get(day, []), bars, history.closes.get(day), curve,
                                  history.dividends, oi, underlying_symbol=result.symbol)
        result.tables = [chain_rows(rebuilt.table, result.ticker_id, result.snapshot_time)]
        result.pages = history.pages.get(day, 0)
        result.reject_reasons.update(rebuilt.rejected)
        result.with_iv = rebuilt.inverted + rebuilt.from_otm
        result.not_inverted = dict(rebuilt.not_inverted)

    def _release(self, symbol: str, history: _Symbol, day: date) -> None:
        with self._lock:
            history.listings.pop(day, None)
            history.bars.pop(day, None)
            history.left -= 1
            if history.left <= 0 and self._symbols.get(symbol) is history:
                del self._symbols[symbol]  # every day done: its bars go

    def _prepared(self, symbol: str, day: date) -> _Symbol:
        with self._lock:
            lock = self._locks.setdefault(symbol, threading.Lock())
        with lock:
            with self._lock:
                history = self._symbols.get(symbol)
            if history is None or day not in history.days:
                days = self._days_of.get(symbol) or [day]
                history = self._fetch_symbol(symbol, days if day in days else [day])
                with self._lock:
                    self._symbols[symbol] = history
            return history

    def _map(self, work: Callable[[_T], Any], items: Sequence[_T]) -> Iterator[Any]:
        """work over items on the history pool, results in order as they come (a ProviderError
        ends the run: it propagates)."""
        return self._pool.map(work, items)

    def _fetch_symbol(self, symbol: str, days: list[date]) -> _Symbol:
        """Everything the symbol's days need, one request per contract for the whole range."""
        history = _Symbol(days, left=len(days))
        self.progress.plan(len(days))
        listed_on: dict[str, list[date]] = {}
        shared: dict[str, Any] = {}
        for day, contracts, error in self._map(lambda d: _attempt(d, self.client.contracts, symbol, d), days):
            if error:
                history.errors[day] = error
                continue
            history.listings[day] = contracts = [_shared(shared, c) for c in contracts]
            history.pages[day] = max(1, -(-len(contracts) // 1000))
            for contract in contracts:
                if is_standard(contract):
                    listed_on.setdefault(contract["ticker"], []).append(day)
        tickers, roots = sorted(listed_on), sorted({occ_root(t) for t in listed_on})
        wanted = [d for d in days if d not in history.errors]
        if not wanted:
            return history
        start, end = wanted[0], wanted[-1]
        requests = len(tickers) + 2 + len(roots)
        self.progress.plan(requests)
        per_minute = self.progress.per_minute
        slow = per_minute is not None and requests / per_minute >= 1440  # a day or more: say so loudly
        log.log(logging.WARNING if slow else logging.INFO, "history: %s %s..%s: %d contracts listed, %d more "
                "requests (%s)", symbol, start, end, len(tickers), requests, duration(requests, per_minute))
        history.bars = {d: {} for d in wanted}
        for ticker, bars, error in self._map(lambda t: _attempt(t, self.client.bars, t, start, end, symbol), tickers):
            self._keep_bars(history, ticker, bars, error, listed_on[ticker])
        _, closes, error = _attempt(symbol, self.client.bars, symbol, start, end, symbol)
        try:
            for bar in closes or []:
                session, (close, _, _) = bar_session(bar, symbol)
                history.closes[session] = close
        except SymbolFetchError as exc:
            error = one_line(str(exc))
        if error:
            history.fail(wanted, error)
        history.dividends = self._optional(symbol, "dividends", lambda: self.client.dividends(symbol), history, wanted)
        self._open_interest(symbol, history, roots, start, end)
        return history

    def _keep_bars(self, history: _Symbol, ticker: str, bars: list[Any] | None, error: str | None,
                   listed: list[date]) -> None:
        if error:
            history.fail(listed, error)
            return
        try:
            for bar in bars or []:
                session, values = bar_session(bar, ticker)
                if session in history.bars:
                    history.bars[session][ticker] = values
        except SymbolFetchError as exc:
            history.fail(listed, one_line(str(exc)))

    def _optional(self, symbol: str, what: str, fetch: Callable[[], list[Any]], history: _Symbol,
                  days: list[date]) -> list[Any]:
        """An endpoint the plan may lack: unavailable (403/404) means none, said once per run."""
        try:
            return fetch()
        except HistoryRefused as exc:
            self._say_once(what, f"{what} unavailable ({exc}): taken as none for every symbol")
        except SymbolFetchError as exc:
            history.fail(days, one_line(f"{what}: {exc}"))
        return []

    def _open_interest(self, symbol: str, history: _Symbol, roots: list[str], start: date, end: date) -> None:
        """OI of the session before each day, once per OCC root (SPX and SPXW) for the range."""
        if "open interest" in self._said:
            return  # the plan lacks it: not asked again
        first, last = previous_session(start), previous_session(end)
        found: dict[date, dict[str, int]] = {}
        for root in roots:
            rows = self._optional(symbol, "open interest", lambda r=root: self.client.open_interest(r, first, last, symbol),
                                  history, list(history.bars))
            if "open interest" in self._said:
                return
            for row in rows:
                if isinstance(row, Mapping) and isinstance(row.get("open_interest"), int) and row.get("date"):
                    found.setdefault(date.fromisoformat(row["date"]), {})[row["ticker"]] = row["open_interest"]
        history.open_interest = found

    def _say_once(self, key: str, message: str) -> None:
        with self._lock:
            if key in self._said:
                return
            self._said.add(key)
        log.warning("history: %s", message)

    def _curve(self, day: date) -> Mapping[str, Any] | None:
        """The Treasury curve of `day`, or the latest earlier one; the run's curves fetched once."""
        with self._curve_lock:
            if self._curves is None and self._curve_error is None:
                days = [d for ds in self._days_of.values() for d in ds] or [day]
                self.progress.plan(1)
                try:
                    self._curves = self.client.treasury(min(days) - timedelta(days=CURVE_LOOKBACK_DAYS), max(days))
                except SymbolFetchError as exc:
                    self._curve_error = one_line(f"treasury yields: {exc}")
            curves = self._curves or []
        earlier = [c for c in curves if c["date"] <= day.isoformat()]
        return earlier[-1] if earlier else None

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _shared(seen: dict[str, Any], contract: Any) -> Any:
    """One copy of a contract listed on many days: a year of listings holds each about 250 times
    (about 500 MB for a 2,000-contract chain), a contract's fields rarely change."""
    if not isinstance(contract, dict) or not isinstance(contract.get("ticker"), str):
        return contract
    kept = seen.setdefault(contract["ticker"], contract)
    return kept if kept is contract or kept == contract else contract


def _attempt(key: _T, work: Callable[..., Any], *args: Any) -> tuple[_T, Any, str | None]:
    """(key, work(*args), None), or (key, None, the error) when it failed for this request only."""
    try:
        return key, work(*args), None
    except SymbolFetchError as exc:
        return key, None, one_line(str(exc))


class ReconstructedChains:
    """The ChainSource of one past day: its chains reconstructed by the run's Backfill."""

    def __init__(self, backfill: Backfill, day: date) -> None:
        self.backfill, self.day = backfill, day

    def fetch(self, symbol: str, ticker_id: str, snapshot_time: datetime,
              expirations: Any = None) -> ChainResult:
        """The whole day's chain (reconstructed days are never sliced: Provider.slices)."""
        return self.backfill.fetch(self.day, symbol, ticker_id, snapshot_time)


def estimate(config: PolygonConfiguration, todo: Mapping[date, Sequence[str]]) -> int:
    """`--dry-run`: the requests a reconstruction of `todo` (day -> symbols) needs, logged per
    symbol and in all with the time they take at the configured limit. It fetches the reference
    pages (to count the contracts), nothing else.

    Raises:
        ProviderError: 401, or the origin cannot be reached.
    """
    limit = config.request_limit
    client = HistoryClient(config, 1, RateLimiter(limit) if limit is not None else None)
    days_of: dict[str, list[date]] = {}
    for day in sorted(todo):
        for symbol in todo[day]:
            days_of.setdefault(symbol, []).append(day)
    total = 1 if days_of else 0  # the Treasury curves, once per run
    for symbol, days in days_of.items():
        tickers: set[str] = set()
        before = client.requests
        for day in days:
            try:
                tickers |= {c["ticker"] for c in client.contracts(symbol, day) if is_standard(c)}
            except SymbolFetchError as exc:
                log.warning("dry run: %s %s: %s (this day would fail)", symbol, day, one_line(str(exc)))
        pages, roots = client.requests - before, len({occ_root(t) for t in tickers})
        needs = pages + len(tickers) + 2 + roots
        log.log(SUMMARY, "dry run: %s %s..%s reconstructed: %d requests (%d reference pages, %d contracts' bars, "
                "underlying closes, dividends, open interest of %d roots)", symbol, days[0], days[-1], needs,
                pages, len(tickers), roots)
        total += needs
    if total:
        log.log(SUMMARY, "dry run: the reconstruction needs %d requests in all (%s); the dry run sent %d of them",
                total, duration(total, limit), client.requests)
        if limit is not None and total / limit >= 1440:
            log.warning("at %g requests/minute this backfill takes %s: consider a shorter range, fewer symbols "
                        "or a plan with a higher limit", limit, span(total / limit))
    return total
