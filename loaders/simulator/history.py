"""The simulator's history endpoints (contracts reference, daily bars, Treasury yields, dividends,
open interest), derived from the Market's chains so that a reconstruction's truth is known."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import sys
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import numpy as np

from ..trading_calendar import NEW_YORK, is_trading_day, trading_days
from .market import Market, compact_json
from .model import INDEXES, KNOWN, RATE, close_time_ns, unit

FAMILIES = ("contracts", "aggregates", "treasury", "dividends", "open_interest")
_PATHS = {"/v3/reference/options/contracts": "contracts", "/fed/v1/treasury-yields": "treasury",
          "/v3/reference/dividends": "dividends", "/options/v1/open-interest": "open_interest"}
_LIMITS = {"contracts": (10, 1000), "aggregates": (5000, 50000), "treasury": (100, 50000),
           "dividends": (10, 1000), "open_interest": (1000, 50000)}  # (default, maximum) page size
_TENORS = ("1_month", "3_month", "6_month", "1_year", "2_year", "3_year", "5_year", "7_year",
           "10_year", "20_year", "30_year")
_EARLIEST = date(1990, 1, 2)  # first day of the yields and dividends histories
# Roots of the index options, and the OCC root of each dotted equity (BRK.B -> BRKB).
_INDEX_OF_ROOT = {root: symbol for symbol, (roots, *_) in INDEXES.items() for root in roots}
_EQUITY_OF_ROOT = {symbol.replace(".", ""): symbol for symbol in KNOWN}
_BARE = {symbol: roots[0] for symbol, (roots, *_) in INDEXES.items()}  # I:SPX's options: SPX


class HistoryError(Exception):
    """A non-200 answer: the HTTP status and the real API's body (without request_id)."""

    def __init__(self, status: int, api_status: str, **fields: str) -> None:
        self.status, self.api_status, self.fields = status, api_status, fields

    def body(self, request_id: str) -> dict[str, str]:
        return {"status": self.api_status, "request_id": request_id, **self.fields}


def _bad(message: str) -> HistoryError:
    return HistoryError(400, "ERROR", error=message)


def not_entitled() -> HistoryError:
    return HistoryError(403, "NOT_AUTHORIZED", message="You are not entitled to this data. "
                        "Please upgrade your plan at https://polygon.io/pricing")


@dataclass(frozen=True)
class HistoryRequest:
    """One parsed request. Later pages carry the first page's parameters in the cursor."""

    family: str
    path: str
    params: dict[str, str]  # without apiKey and cursor
    offset: Any  # where this page starts (JSON value); None on the first page
    page: int  # 1 = the first request
    symbol: str  # the underlying it concerns, for per-symbol faults and plans ("" for none)


class _Day(NamedTuple):  # what the history needs from one day's chain
    tickers: list[str]
    bars: np.ndarray  # (n, 7): o h l c v vw n; NaN where the contract did not trade that session
    oi: list[int | None]  # open interest as that day's snapshot shows it (the previous session's)


class _Option(NamedTuple):
    root: str
    expiration: str
    call: bool
    strike: float | int


@lru_cache(maxsize=100_000)
def _parse_option(ticker: str) -> _Option | None:
    """O:{root}{yymmdd}{C|P}{strike * 1000, 8 digits}, or None."""
    body = ticker[2:] if ticker.startswith("O:") else ""
    if len(body) < 16 or body[-9] not in "CP" or not body[-8:].isdigit() or not body[-15:-9].isdigit():
        return None
    root, yymmdd, thousandths = body[:-15], body[-15:-9], int(body[-8:])
    strike = thousandths // 1000 if thousandths % 1000 == 0 else thousandths / 1000
    return _Option(root, f"20{yymmdd[:2]}-{yymmdd[2:4]}-{yymmdd[4:]}", body[-9] == "C", strike)


@lru_cache(maxsize=100_000)
def _reference_row(ticker: str, underlying: str, index: bool, shares: int, cash: float | None) -> bytes:
    """A contract as the reference endpoint lists it (the same every day it is listed)."""
    o = _parse_option(ticker)
    assert o is not None
    row: dict[str, Any] = {"additional_underlyings": [
        {"amount": cash, "type": "currency", "underlying": "USD"}]} if cash else {}
    row.update(cfi="O" + ("C" if o.call else "P") + ("EIC" if index else "ASP")
               + ("S" if shares == 100 and not cash else "N"),
               contract_type="call" if o.call else "put", exercise_style="european" if index else "american",
               expiration_date=o.expiration, primary_exchange="CBOE" if index else "BATO",
               shares_per_contract=shares, strike_price=o.strike, ticker=ticker, underlying_ticker=underlying)
    return compact_json(row)


def _date_bounds(params: dict[str, str], field: str) -> tuple[date | None, date | None]:
    """The inclusive range that `field`, `field.gte/.gt/.lte/.lt` ask for (None: unbounded)."""
    lows, highs = [], []
    for suffix, low, shift in (("", 1, 0), ("", 0, 0), (".gte", 1, 0), (".gt", 1, 1), (".lte", 0, 0),
                               (".lt", 0, -1)):
        try:
            if field + suffix in params:
                (lows if low else highs).append(date.fromisoformat(params[field + suffix]) + timedelta(shift))
        except ValueError:
            raise _bad(f"{field + suffix} must be YYYY-MM-DD") from None
    return max(lows, default=None), min(highs, default=None)


def _trading(day: date, step: int) -> date:
    """The first trading day from day on (step 1) or back (step -1); day itself counts."""
    while not is_trading_day(day):
        day += timedelta(days=step)
    return day


def _midnight_ms(day: date) -> int:
    """00:00 New York on day in Unix milliseconds: the `t` of Polygon's daily bars."""
    return int(datetime(day.year, day.month, day.day, tzinfo=NEW_YORK).timestamp()) * 1000


class History:
    """Answers the history endpoints from a Market; thread-safe. Two caches (oldest out) bound the
    memory: `day_cache` chain summaries (about 130 kB for 2,000 contracts) and `range_cache` indexes
    of every contract's bars over a (symbol, from, to). `today` gives the server's date: nothing
    after it. `refuse` lists the families (FAMILIES) answered with 403, as for a plan without them."""

    def __init__(self, market: Market, today: Callable[[], date], refuse: Collection[str] = (),
                 day_cache: int = 300, range_cache: int = 3) -> None:
        if set(refuse) - set(FAMILIES):
            raise ValueError(f"unknown endpoint families {sorted(refuse)}; known: {FAMILIES}")
        self.market, self.today, self.refuse = market, today, frozenset(refuse)
        self._days: OrderedDict[tuple[str, date], _Day] = OrderedDict()
        self._ranges: OrderedDict[tuple[str, date, date], dict[str, list[bytes]]] = OrderedDict()
        self._sizes, self._day_lock, self._range_lock = (day_cache, range_cache), threading.Lock(), threading.Lock()

    @staticmethod
    def family(path: str) -> str | None:
        """The endpoint family a path belongs to, or None."""
        if path.startswith("/v2/aggs/ticker/") and path.count("/") == 9:
            return "aggregates"
        return _PATHS.get(path)

    def parse(self, path: str, query: dict[str, str]) -> HistoryRequest:
        """The request a path and query make. Raises HistoryError (403 refused, 400 bad cursor)."""
        family = self.family(path)
        assert family is not None, path
        if family in self.refuse:
            raise not_entitled()
        params, offset, page = {k: v for k, v in query.items() if k not in ("apiKey", "cursor")}, None, 1
        if "cursor" in query:
            try:
                params, offset, page = json.loads(base64.urlsafe_b64decode(
                    query["cursor"] + "=" * (-len(query["cursor"]) % 4)))
            except (ValueError, TypeError):  # binascii.Error is a ValueError
                raise _bad("invalid cursor") from None
            if not isinstance(page, int) or page < 2 or not all(isinstance(v, str) for v in dict(params).values()):
                raise _bad("invalid cursor")
        if family == "aggregates":
            ticker = unquote(path.split("/")[4])
            option = _parse_option(ticker)
            symbol = (self._underlying(option.root, root=True) if option else
                      ticker if self.market.profile(ticker) and ticker not in _INDEX_OF_ROOT else "")
        elif family == "open_interest":
            roots = [params["root"]] if "root" in params else [
                o.root for t in params.get("ticker.any_of", params.get("ticker", "")).split(",")
                if (o := _parse_option(t.strip()))]
            symbols = {self._underlying(r, root=True) for r in roots}
            symbol = symbols.pop() if len(symbols) == 1 else ""
        else:
            symbol = self._underlying(params.get("underlying_ticker" if family == "contracts" else "ticker", ""))
        return HistoryRequest(family, path, params, offset, page, symbol)

    def _underlying(self, name: str, root: bool = False) -> str:
        """The Market symbol of an underlying as the reference endpoints name it (the bare index
        root: SPX for I:SPX's options), or of an option root; "" when it has no options."""
        if root:
            name = name.rstrip("0123456789")  # adjusted roots: TSLA1 -> TSLA
            name = _INDEX_OF_ROOT.get(name) or _EQUITY_OF_ROOT.get(name, name)
        elif name in _INDEX_OF_ROOT:  # SPX, not SPXW
            return _INDEX_OF_ROOT[name] if _BARE[_INDEX_OF_ROOT[name]] == name else ""
        p = self.market.profile(name)
        return name if p is not None and (root or not p.is_index) else ""

    def respond(self, request: HistoryRequest, origin: str) -> bytes:
        """The 200 body for a request; origin is the base URL the client called (for next_url).
        Raises HistoryError (400) for bad parameters or dates outside the model."""
        default, maximum = _LIMITS[request.family]
        limit = request.params.get("limit", str(default))
        if not limit.isdigit() or not 1 <= int(limit) <= maximum:
            raise _bad(f"limit must be an integer between 1 and {maximum}")
        try:
            rows, following = getattr(self, "_" + request.family)(request, int(limit))
        except ValueError as exc:  # the Market refuses dates outside its range
            raise _bad(str(exc)) from None
        state = json.dumps([request.params, following, request.page + 1], sort_keys=True).encode()
        rid = hashlib.blake2b(state + str([self.market.seed, request.path, request.offset]).encode(),
                              digest_size=16).hexdigest()
        parts = [b"{"]
        if request.family == "aggregates":  # their own envelope; no results when empty
            adjusted = request.params.get("adjusted", "true").lower() != "false"
            parts.append(b'"ticker":%s,"queryCount":%d,"resultsCount":%d,"adjusted":%s,' % (
                json.dumps(unquote(request.path.split("/")[4])).encode(), len(rows), len(rows),
                b"true" if adjusted else b"false"))
        if rows or request.family != "aggregates":
            parts += [b'"results":[', b",".join(rows), b"],"]
        parts += [b'"status":"OK","request_id":"', rid.encode(), b'"']
        if request.family == "aggregates" and rows:
            parts.append(b',"count":%d' % len(rows))
        if following is not None:  # the cursor keeps the first request's parameters, never the key
            cursor = base64.urlsafe_b64encode(state).decode().rstrip("=")
            url = f"{origin.rstrip('/')}{quote(request.path, safe='/:.')}?cursor={cursor}"
            parts += [b',"next_url":', json.dumps(url).encode()]
        return b"".join([*parts, b"}"])

    @staticmethod
    def _paged(items: list[Any], request: HistoryRequest, limit: int) -> tuple[list[Any], int | None]:
        start = request.offset or 0
        if not isinstance(start, int) or start < 0:
            raise _bad("invalid cursor")
        return items[start:start + limit], start + limit if start + limit < len(items) else None

    def _contracts(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any]:
        params = request.params  # without underlying_ticker: empty (the real API lists the market)
        as_of = _date_bounds(params, "as_of")[0] or self.today()
        lo, hi = _date_bounds(params, "expiration_date")
        kind = params.get("contract_type")
        listed = [(t, 100, None) for t in self._day(request.symbol, as_of).tickers] if request.symbol else []
        rows = [_reference_row(t, _BARE.get(request.symbol, request.symbol), request.symbol in INDEXES, shares, cash)
                for t, shares, cash in sorted(listed + self._adjusted(request.symbol, listed, as_of))
                if (o := _parse_option(t)) and (not lo or o.expiration >= lo.isoformat())
                and (not hi or o.expiration <= hi.isoformat()) and (not kind or o.call == (kind == "call"))]
        return self._paged(rows, request, limit)

    def _adjusted(self, symbol: str, listed: list[tuple[str, int, None]], as_of: date
                  ) -> list[tuple[str, int, float | None]]:
        """Non-standard deliverables of some equities (reference only: the snapshot is unchanged):
        the four strikes nearest spot of a middle expiry, under a split-adjusted root (150 shares)
        and under a root with cash in lieu (an additional underlying)."""
        if not listed or symbol in INDEXES or unit("adjusted:" + symbol) >= 0.4:
            return []
        options = [(t, o) for t, _, _ in listed if (o := _parse_option(t))]
        expiries = sorted({o.expiration for _, o in options})
        spot = self.market.spot(symbol, as_of)
        near = sorted((abs(o.strike - spot), t, o) for t, o in options
                      if o.expiration == expiries[len(expiries) // 2])[:4]
        return [(f"O:{o.root}{n}{t[2 + len(o.root):]}", shares, cash) for _, t, o in near
                for n, shares, cash in ((1, 150, None), (2, 100, round(spot * 0.05, 2)))]

    def _aggregates(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any]:
        _, _, _, _, ticker, _, multiplier, timespan, start, end = request.path.split("/")
        if multiplier != "1" or timespan != "day":
            raise _bad("the simulator serves daily bars only: /range/1/day/")
        lo, hi = (datetime.fromtimestamp(int(v) / 1000, NEW_YORK).date() if v.isdigit()
                  else _date_bounds({name: v}, name)[0] for v, name in ((start, "from"), (end, "to")))
        assert lo and hi
        hi = min(hi, self.today())
        if not request.symbol or lo > hi:
            bars: list[bytes] = []
        elif ticker.startswith("O:"):
            bars = self._option_bars(request.symbol, lo, hi).get(unquote(ticker), [])
        else:
            bars = list(self._underlying_bars(request.symbol, lo, hi))
        return self._paged(bars[::-1] if request.params.get("sort") == "desc" else bars, request, limit)

    def _underlying_bars(self, symbol: str, lo: date, hi: date) -> Iterator[bytes]:
        """Daily bars of the underlying: the close is the snapshot's spot, rounded as there; the
        open is the previous calendar day's spot. Indices carry no volume."""
        for day in trading_days(lo, hi):
            close = round(self.market.spot(symbol, day), 2)
            open_ = round(self.market.spot(symbol, day - timedelta(days=1)), 2)
            u = unit(f"bar:{symbol}:{day}")
            high, low = round(max(open_, close) * (1 + 0.006 * u), 2), round(min(open_, close) * (1 - 0.006 * (1 - u)), 2)
            bar: dict[str, Any] = {"o": open_, "c": close, "h": high, "l": low, "t": _midnight_ms(day)}
            if not symbol.startswith("I:"):
                volume = int(20_000_000 * (0.5 + u))
                bar = {"v": volume, "vw": round((high + low + close) / 3, 4), **bar, "n": volume // 150}
            yield compact_json(bar)

    def _option_bars(self, symbol: str, lo: date, hi: date) -> dict[str, list[bytes]]:
        """Each contract's daily bars over [lo, hi], built once (a year: 252 chains), then looked up."""
        key = (symbol, lo, hi)
        with self._range_lock:  # concurrent requests for a new range wait for one build
            if key in self._ranges:
                return self._ranges[key]
            index = defaultdict(list)
            for day in trading_days(lo, hi):
                summary, t = self._day(symbol, day), _midnight_ms(day)
                for i in np.flatnonzero(~np.isnan(summary.bars[:, 0])).tolist():
                    o, h, low, c, v, vw, n = summary.bars[i].tolist()
                    index[summary.tickers[i]].append(compact_json(
                        {"v": int(v), "vw": vw, "o": o, "c": c, "h": h, "l": low, "t": t, "n": int(n)}))
            self._ranges[key] = index
            if len(self._ranges) > self._sizes[1]:
                self._ranges.popitem(last=False)
            return index

    def _day(self, symbol: str, day: date) -> _Day:
        """The summary of symbol's chain on day (LRU-cached)."""
        with self._day_lock:
            if (symbol, day) in self._days:
                return self._days[symbol, day]
        chain, close_ns = self.market.chain(symbol, day), close_time_ns(day)
        summary = _Day([], np.full((len(chain), 7), np.nan), [])
        for i, contract in enumerate(chain):
            summary.tickers.append(sys.intern(contract["details"]["ticker"]))
            summary.oi.append(contract.get("open_interest"))
            bar = contract.get("day") or {}
            # Traded in this session: a bar stamped with this day's close (not a carried-over one).
            if bar.get("last_updated") == close_ns and bar.get("volume", 0) > 0:
                summary.bars[i] = (bar["open"], bar["high"], bar["low"], bar["close"], bar["volume"],
                                   bar["vwap"], max(1, int(bar["volume"] ** 0.75)))  # n: larger tickets
        with self._day_lock:
            self._days[symbol, day] = summary
            if len(self._days) > self._sizes[0]:
                self._days.popitem(last=False)
        return summary

    def _treasury(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any]:
        """A flat curve at the model's rate: y = 100 (e^RATE - 1), so ln(1 + y/100) = RATE."""
        lo, hi = _date_bounds(request.params, "date")
        hi = min(hi or date.max, self.today())
        days, following = self._paged(trading_days(max(lo or _EARLIEST, _EARLIEST), hi), request, limit)
        return [compact_json({"date": d.isoformat(), **{f"yield_{t}": 100 * math.expm1(RATE) for t in _TENORS}})
                for d in days], following

    def _dividends(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any]:
        """Quarterly cash dividends of about spot * q / 4, declared four weeks before the ex-date;
        only those declared by today. Newest first (order=asc for oldest first)."""
        lo, hi = _date_bounds(request.params, "ex_dividend_date")
        p, today, rows = self.market.profile(request.symbol) if request.symbol else None, self.today(), []
        if p is None or p.is_index or p.div_yield <= 0:
            return self._paged([], request, limit)
        first_month, day = 1 + int(unit("div:" + p.symbol) * 3), 6 + int(unit("divday:" + p.symbol) * 14)
        for year in range(_EARLIEST.year, today.year + 2):
            for month in range(first_month, 13, 3):
                ex = _trading(date(year, month, day), 1)
                declared = _trading(ex - timedelta(days=28), -1)
                if declared > today or (lo and ex < lo) or (hi and ex > hi):
                    continue
                rows.append(compact_json({
                    "cash_amount": max(0.01, round(self.market.spot(p.symbol, declared) * p.div_yield / 4, 2)),
                    "currency": "USD", "declaration_date": declared.isoformat(), "dividend_type": "CD",
                    "ex_dividend_date": ex.isoformat(), "frequency": 4,
                    "id": "E" + hashlib.blake2b(f"{p.symbol}{ex}".encode(), digest_size=8).hexdigest(),
                    "pay_date": _trading(ex + timedelta(days=13), 1).isoformat(),
                    "record_date": ex.isoformat(), "ticker": p.symbol}))
        return self._paged(rows[::-1] if request.params.get("order", "desc") == "desc" else rows,
                           request, limit)

    def _open_interest(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any]:
        """OPRA's figure per contract and session X: what the snapshot of the trading day after X
        shows, for the contracts listed on X. Sessions up to the one before today."""
        params = request.params
        if not {"root", "ticker", "ticker.any_of"} & params.keys():
            raise _bad("the simulator needs root, ticker or ticker.any_of")
        wanted = {t.strip() for t in params.get("ticker.any_of", params.get("ticker", "")).split(",")} - {""}
        lo, hi = _date_bounds(params, "date")
        hi = min(hi or date.max, _trading(self.today() - timedelta(days=1), -1))
        days = trading_days(lo or hi, hi) if request.symbol else []
        at, skip = request.offset or [days[0].isoformat() if days else "", 0]
        rows: list[bytes] = []
        for n, session in enumerate(days):
            if session.isoformat() < at:
                continue
            listed = set(self._day(request.symbol, session).tickers)
            after = self._day(request.symbol, _trading(session + timedelta(days=1), 1))
            found = [(t, oi, o) for t, oi in zip(after.tickers, after.oi, strict=True)
                     if oi is not None and t in listed and (not wanted or t in wanted)
                     and (o := _parse_option(t)) and o.root == params.get("root", o.root)]
            take = found[skip:skip + limit - len(rows)]
            rows += [compact_json({"ticker": t, "underlying_ticker": _BARE.get(request.symbol, request.symbol), "root": o.root,
                             "contract_type": "call" if o.call else "put", "expiration_date": o.expiration,
                             "strike_price": o.strike, "open_interest": oi, "date": session.isoformat()})
                     for t, oi, o in take]
            if len(rows) == limit:
                if skip + len(take) < len(found):
                    return rows, [session.isoformat(), skip + len(take)]
                return rows, [days[n + 1].isoformat(), 0] if n + 1 < len(days) else None
            skip = 0
        return rows, None
