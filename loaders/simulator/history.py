"""The simulator's history endpoints (contracts reference, daily bars, Treasury yields, dividends,
open interest), derived from the Market's chains so that a reconstruction's truth is known."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import sys
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any
from urllib.parse import quote, unquote

import numpy as np

from ..trading_calendar import NEW_YORK, is_trading_day, trading_days
from .market import _INDEXES, _KNOWN, RATE, Market, _close_ns, _dumps, _unit

FAMILIES = ("contracts", "aggregates", "treasury", "dividends", "open_interest")
_PATHS = {"/v3/reference/options/contracts": "contracts", "/fed/v1/treasury-yields": "treasury",
          "/v3/reference/dividends": "dividends", "/options/v1/open-interest": "open_interest"}
_AGGS_PREFIX = "/v2/aggs/ticker/"
_LIMITS = {"contracts": (10, 1000), "aggregates": (5000, 50000), "treasury": (100, 50000),
           "dividends": (10, 1000), "open_interest": (1000, 50000)}  # (default, maximum) page size
_TENORS = ("1_month", "3_month", "6_month", "1_year", "2_year", "3_year", "5_year", "7_year",
           "10_year", "20_year", "30_year")
_EARLIEST = date(1990, 1, 2)  # first day of the yields and dividends histories
_NOT_ENTITLED = ("You are not entitled to this data. Please upgrade your plan at "
                 "https://polygon.io/pricing")
# Roots of the index options, and the OCC root of each dotted equity (BRK.B -> BRKB).
_INDEX_OF_ROOT = {root: symbol for symbol, (roots, *_) in _INDEXES.items() for root in roots}
_EQUITY_OF_ROOT = {symbol.replace(".", ""): symbol for symbol in _KNOWN}


class HistoryError(Exception):
    """A non-200 answer: HTTP status and the real API's error fields."""

    def __init__(self, status: int, api_status: str, **fields: str) -> None:
        super().__init__(next(iter(fields.values()), api_status))
        self.status, self.api_status, self.fields = status, api_status, fields

    def body(self, request_id: str) -> dict[str, str]:
        return {"status": self.api_status, "request_id": request_id, **self.fields}


def _bad(message: str) -> HistoryError:
    return HistoryError(400, "ERROR", error=message)


def not_entitled() -> HistoryError:
    """The 403 the real API sends for data outside the plan."""
    return HistoryError(403, "NOT_AUTHORIZED", message=_NOT_ENTITLED)


@dataclass(frozen=True)
class HistoryRequest:
    """One parsed request. Later pages carry the first page's parameters in the cursor."""

    family: str
    path: str
    params: dict[str, str]  # without apiKey and cursor
    offset: Any  # where this page starts (JSON value); None on the first page
    page: int  # 1 = the first request
    symbol: str  # the underlying it concerns, for per-symbol faults and plans ("" for none)

    def cursor(self, offset: Any) -> str:
        raw = json.dumps([self.params, offset, self.page + 1], sort_keys=True, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


@dataclass(frozen=True)
class _Day:
    """What the history needs from one day's chain: tickers in order, the session's bars and OI."""

    tickers: list[str]
    bars: np.ndarray  # (n, 7): o h l c v vw n; NaN where the contract did not trade that session
    oi: list[int | None]  # open interest as that day's snapshot shows it (the previous session's)


@dataclass(frozen=True)
class _Option:
    root: str
    expiration: str
    call: bool
    strike: float | int


def _parse_option(ticker: str) -> _Option | None:
    """O:{root}{yymmdd}{C|P}{strike * 1000, 8 digits}, or None."""
    body = ticker[2:] if ticker.startswith("O:") else ""
    if len(body) < 16 or body[-9] not in "CP" or not body[-8:].isdigit() or not body[-15:-9].isdigit():
        return None
    root, yymmdd, thousandths = body[:-15], body[-15:-9], int(body[-8:])
    strike = thousandths // 1000 if thousandths % 1000 == 0 else thousandths / 1000
    return _Option(root, f"20{yymmdd[:2]}-{yymmdd[2:4]}-{yymmdd[4:]}", body[-9] == "C", strike)


def _date(value: str, name: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise _bad(f"{name} must be YYYY-MM-DD") from None


def _date_bounds(params: dict[str, str], field: str) -> tuple[date | None, date | None]:
    """The inclusive range that `field`, `field.gte/.gt/.lte/.lt` ask for (None: unbounded)."""
    lows, highs = [], []
    for suffix, low, shift in (("", True, 0), ("", False, 0), (".gte", True, 0), (".gt", True, 1),
                               (".lte", False, 0), (".lt", False, -1)):
        name = field + suffix
        if name in params:
            (lows if low else highs).append(_date(params[name], name) + timedelta(days=shift))
    return max(lows, default=None), min(highs, default=None)


def _trading_before(day: date) -> date:
    day -= timedelta(days=1)
    while not is_trading_day(day):
        day -= timedelta(days=1)
    return day


def _trading_after(day: date, inclusive: bool = False) -> date:
    day = day if inclusive else day + timedelta(days=1)
    while not is_trading_day(day):
        day += timedelta(days=1)
    return day


def _midnight_ms(day: date) -> int:
    """00:00 New York on day in Unix milliseconds: the `t` of Polygon's daily bars."""
    return int(datetime(day.year, day.month, day.day, tzinfo=NEW_YORK).timestamp()) * 1000


class History:
    """Answers the history endpoints from a Market. Thread-safe; memory bounded by two LRUs."""

    def __init__(self, market: Market, today: Callable[[], date], refuse: Collection[str] = (),
                 day_cache: int = 300, range_cache: int = 3) -> None:
        """Args:
        market: the model (the same one the snapshot endpoint serves).
        today: the server's current date: no bar, yield or OI after it, no dividend declared after.
        refuse: endpoint families answered with 403, as for a plan without them (FAMILIES).
        day_cache: chains kept in summary form (about 150 kB each for 2,000 contracts).
        range_cache: (symbol, from, to) indexes of option bars kept (each contract's bars, as JSON).
        """
        unknown = set(refuse) - set(FAMILIES)
        if unknown:
            raise ValueError(f"unknown endpoint families {sorted(unknown)}; known: {FAMILIES}")
        self.market, self.today, self.refuse = market, today, frozenset(refuse)
        self._days: OrderedDict[tuple[str, date], _Day] = OrderedDict()
        self._ranges: OrderedDict[tuple[str, date, date], dict[str, list[bytes]]] = OrderedDict()
        self._sizes = (day_cache, range_cache)
        self._day_lock, self._range_lock = threading.Lock(), threading.Lock()

    # -- routing -------------------------------------------------------------------------------

    @staticmethod
    def family(path: str) -> str | None:
        """The endpoint family a path belongs to, or None."""
        if path.startswith(_AGGS_PREFIX) and path.count("/") == 9:
            return "aggregates"
        return _PATHS.get(path)

    def parse(self, path: str, query: dict[str, str]) -> HistoryRequest:
        """The request a path and query make. Raises HistoryError (403 refused, 400 bad cursor)."""
        family = self.family(path)
        if family is None:
            raise HistoryError(404, "NOT_FOUND", message="The requested resource was not found")
        if family in self.refuse:
            raise not_entitled()
        params, offset, page = {k: v for k, v in query.items() if k not in ("apiKey", "cursor")}, None, 1
        if "cursor" in query:
            try:
                raw = base64.urlsafe_b64decode(query["cursor"] + "=" * (-len(query["cursor"]) % 4))
                params, offset, page = json.loads(raw)
            except (binascii.Error, ValueError, TypeError):
                raise _bad("invalid cursor") from None
            if not isinstance(params, dict) or not isinstance(page, int) or page < 2:
                raise _bad("invalid cursor")
        return HistoryRequest(family, path, params, offset, page, self._symbol(family, path, params))

    def _symbol(self, family: str, path: str, params: dict[str, str]) -> str:
        if family == "contracts":
            return self._underlying(params.get("underlying_ticker", ""))
        if family == "dividends":
            return self._underlying(params.get("ticker", ""))
        if family == "aggregates":
            ticker = unquote(path.split("/")[4])
            option = _parse_option(ticker)
            if option:
                return self._root_symbol(option.root)
            return ticker if self.market.profile(ticker) and ticker not in _INDEX_OF_ROOT else ""
        if family == "open_interest":
            roots = [params["root"]] if "root" in params else [
                o.root for t in params.get("ticker.any_of", params.get("ticker", "")).split(",")
                if (o := _parse_option(t.strip()))]
            symbols = {self._root_symbol(r) for r in roots}
            return symbols.pop() if len(symbols) == 1 else ""
        return ""

    def _underlying(self, name: str) -> str:
        """The Market symbol of an underlying as the reference endpoints name it: the bare index
        root (SPX for I:SPX's options) or the equity ticker; "" when it has no options."""
        index = _INDEX_OF_ROOT.get(name)
        if index:
            return index if _INDEXES[index][0][0] == name else ""
        p = self.market.profile(name)
        return name if p is not None and not p.is_index else ""

    def _root_symbol(self, root: str) -> str:
        base = root.rstrip("0123456789")  # adjusted roots: AAPL1 -> AAPL
        return _INDEX_OF_ROOT.get(base) or self._underlying(_EQUITY_OF_ROOT.get(base, base))

    # -- answering -----------------------------------------------------------------------------

    def respond(self, request: HistoryRequest, origin: str) -> bytes:
        """The 200 body for a request; origin is the base URL the client called (for next_url).
        Raises HistoryError (400) for bad parameters or dates outside the model."""
        default, maximum = _LIMITS[request.family]
        try:
            limit = int(request.params.get("limit", default))
        except ValueError:
            raise _bad("limit must be an integer") from None
        if not 1 <= limit <= maximum:
            raise _bad(f"limit must be between 1 and {maximum}")
        handler = getattr(self, "_" + request.family)
        try:
            rows, following, head = handler(request, limit)
        except ValueError as exc:  # the Market refuses dates outside its range
            raise _bad(str(exc)) from None
        rid = hashlib.blake2b(json.dumps([self.market.seed, request.path, request.params, request.offset],
                                         sort_keys=True).encode(), digest_size=16).hexdigest()
        parts = [b"{", head]
        if rows or request.family != "aggregates":  # the aggregates omit empty results
            parts += [b'"results":[', b",".join(rows), b"],"]
        parts += [b'"status":"OK","request_id":"', rid.encode(), b'"']
        if request.family == "aggregates" and rows:
            parts.append(b',"count":%d' % len(rows))
        if following is not None:
            url = f"{origin.rstrip('/')}{quote(request.path, safe='/:.')}?cursor={request.cursor(following)}"
            parts += [b',"next_url":', json.dumps(url).encode()]
        return b"".join([*parts, b"}"])

    def _paged(self, rows: list[bytes], request: HistoryRequest, limit: int
               ) -> tuple[list[bytes], Any, bytes]:
        start = request.offset or 0
        if not isinstance(start, int) or start < 0:
            raise _bad("invalid cursor")
        return rows[start:start + limit], start + limit if start + limit < len(rows) else None, b""

    def _contracts(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any, bytes]:
        params = request.params
        if "underlying_ticker" not in params:
            raise _bad("the simulator needs underlying_ticker")
        as_of = _date(params["as_of"], "as_of") if "as_of" in params else self.today()
        lo, hi = _date_bounds(params, "expiration_date")
        if params.get("expired", "false").lower() == "true":  # expired by as_of: none is listed
            hi = min(hi or as_of, as_of - timedelta(days=1))
        kind = params.get("contract_type")
        if kind not in (None, "call", "put"):
            raise _bad("contract_type must be call or put")
        if not request.symbol:
            return self._paged([], request, limit)
        p = self.market.profile(request.symbol)
        assert p is not None
        listed = [(t, 100, None) for t in self._day(request.symbol, as_of).tickers]
        style, underlying = ("european", p.roots[0]) if p.is_index else ("american", request.symbol)
        rows = []
        for ticker, shares, extra in sorted(listed + self._adjusted(request.symbol, listed, as_of)):
            o = _parse_option(ticker)
            assert o is not None
            if ((lo and o.expiration < lo.isoformat()) or (hi and o.expiration > hi.isoformat())
                    or (kind and o.call != (kind == "call"))):
                continue
            cfi = "O{}{}{}{}".format("C" if o.call else "P", style[0].upper(), "IC" if p.is_index else "SP",
                                     "N" if extra or shares != 100 else "S")
            row: dict[str, Any] = {"additional_underlyings": extra} if extra else {}
            row.update(cfi=cfi, contract_type="call" if o.call else "put", exercise_style=style,
                       expiration_date=o.expiration, primary_exchange="CBOE" if p.is_index else "BATO",
                       shares_per_contract=shares, strike_price=o.strike, ticker=ticker,
                       underlying_ticker=underlying)
            rows.append(_dumps(row))
        return self._paged(rows, request, limit)

    def _adjusted(self, symbol: str, listed: list[tuple[str, int, Any]], as_of: date
                  ) -> list[tuple[str, int, Any]]:
        """Non-standard deliverables for some equities (reference only; the snapshot is unchanged):
        the strikes nearest spot of a middle expiry, as a split-adjusted root (150 shares) and a
        root with cash in lieu (an additional underlying)."""
        if not listed or symbol in _INDEXES or _unit("adjusted:" + symbol) >= 0.4:
            return []
        options = [(t, o) for t, _, _ in listed if (o := _parse_option(t))]
        expiries = sorted({o.expiration for _, o in options})
        middle, spot = expiries[len(expiries) // 2], self.market.spot(symbol, as_of)
        near = sorted((abs(o.strike - spot), t, o) for t, o in options if o.expiration == middle)[:4]
        cash = [{"amount": round(spot * 0.05, 2), "type": "currency", "underlying": "USD"}]
        out: list[tuple[str, int, Any]] = []
        for _, ticker, o in near:
            tail = ticker[2 + len(o.root):]
            out += [(f"O:{o.root}1{tail}", 150, None), (f"O:{o.root}2{tail}", 100, cash)]
        return out

    def _aggregates(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any, bytes]:
        _, _, _, _, raw_ticker, _, multiplier, timespan, start, end = request.path.split("/")
        ticker = unquote(raw_ticker)
        if multiplier != "1" or timespan != "day":
            raise _bad("the simulator serves daily bars only: /range/1/day/")
        lo, hi = (datetime.fromtimestamp(int(v) / 1000, NEW_YORK).date() if v.isdigit()
                  else _date(v, name) for v, name in ((start, "from"), (end, "to")))
        hi = min(hi, self.today())
        order = request.params.get("sort", "asc")
        if order not in ("asc", "desc"):
            raise _bad("sort must be asc or desc")
        if not request.symbol or lo > hi:
            bars: list[bytes] = []
        elif ticker.startswith("O:"):
            bars = self._option_bars(request.symbol, lo, hi).get(ticker, [])
        else:
            bars = list(self._underlying_bars(request.symbol, lo, hi))
        rows, following, _ = self._paged(bars[::-1] if order == "desc" else bars, request, limit)
        adjusted = request.params.get("adjusted", "true").lower() != "false"
        head = b'"ticker":%s,"queryCount":%d,"resultsCount":%d,"adjusted":%s,' % (
            json.dumps(ticker).encode(), len(rows), len(rows), b"true" if adjusted else b"false")
        return rows, following, head

    def _underlying_bars(self, symbol: str, lo: date, hi: date) -> Iterator[bytes]:
        """Daily bars of the underlying: the close is the spot the snapshot shows (rounded as
        there); the open is the previous calendar day's spot. Indices carry no volume."""
        p = self.market.profile(symbol)
        assert p is not None
        for day in trading_days(lo, hi):
            close = round(self.market.spot(symbol, day), 2)
            open_ = round(self.market.spot(symbol, day - timedelta(days=1)), 2)
            u = _unit(f"bar:{symbol}:{day}")
            high = round(max(open_, close) * (1 + 0.006 * u), 2)
            low = round(min(open_, close) * (1 - 0.006 * (1 - u)), 2)
            bar: dict[str, Any] = {"o": open_, "c": close, "h": high, "l": low, "t": _midnight_ms(day)}
            if not p.is_index:
                volume = int(p.target * 20_000 * (0.5 + u))
                bar = {"v": volume, "vw": round((high + low + close) / 3, 4), **bar, "n": volume // 150}
            yield _dumps(bar)

    def _option_bars(self, symbol: str, lo: date, hi: date) -> dict[str, list[bytes]]:
        """Each contract's daily bars over [lo, hi], built once per range (a year of a 2,000-contract
        chain is 252 chains): every contract's request is then a lookup."""
        key = (symbol, lo, hi)
        with self._range_lock:  # concurrent requests for a new range wait for one build
            index = self._ranges.get(key)
            if index is not None:
                self._ranges.move_to_end(key)
                return index
            index = defaultdict(list)
            for day in trading_days(lo, hi):
                summary, t = self._day(symbol, day), _midnight_ms(day)
                for i in np.flatnonzero(~np.isnan(summary.bars[:, 0])).tolist():
                    o, h, low, c, v, vw, n = summary.bars[i].tolist()
                    index[summary.tickers[i]].append(_dumps(
                        {"v": int(v), "vw": vw, "o": o, "c": c, "h": h, "l": low, "t": t, "n": int(n)}))
            self._ranges[key] = index
            if len(self._ranges) > self._sizes[1]:
                self._ranges.popitem(last=False)
            return index

    def _day(self, symbol: str, day: date) -> _Day:
        """The summary of symbol's chain on day (LRU-cached)."""
        key = (symbol, day)
        with self._day_lock:
            cached = self._days.get(key)
            if cached is not None:
                self._days.move_to_end(key)
                return cached
        chain, close_ns = self.market.chain(symbol, day), _close_ns(day)
        bars = np.full((len(chain), 7), np.nan)
        tickers, oi = [], []
        for i, contract in enumerate(chain):
            tickers.append(sys.intern(contract["details"]["ticker"]))
            oi.append(contract.get("open_interest"))
            bar = contract.get("day") or {}
            # Traded in this session: a bar stamped with this day's close (not a carried-over one).
            if bar.get("last_updated") == close_ns and bar.get("volume", 0) > 0:
                volume = bar["volume"]
                bars[i] = (bar["open"], bar["high"], bar["low"], bar["close"], volume, bar["vwap"],
                           max(1, int(volume**0.75)))  # trades: larger days have larger tickets
        summary = _Day(tickers, bars, oi)
        with self._day_lock:
            self._days[key] = summary
            if len(self._days) > self._sizes[0]:
                self._days.popitem(last=False)
        return summary

    def _treasury(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any, bytes]:
        """A flat curve at the model's rate: y = 100 (e^RATE - 1), so ln(1 + y/100) = RATE."""
        lo, hi = _date_bounds(request.params, "date")
        hi = min(hi or date.max, self.today())
        days = trading_days(max(lo or _EARLIEST, _EARLIEST), hi)
        start = request.offset or 0
        if not isinstance(start, int) or start < 0:
            raise _bad("invalid cursor")
        value = 100 * math.expm1(RATE)
        rows = [_dumps({"date": d.isoformat(), **{f"yield_{t}": value for t in _TENORS}})
                for d in days[start:start + limit]]
        return rows, start + limit if start + limit < len(days) else None, b""

    def _dividends(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any, bytes]:
        """Quarterly cash dividends of about spot * q / 4, declared four weeks before the ex-date;
        only those declared by today. Newest first (order=asc for oldest first)."""
        params = request.params
        if "ticker" not in params:
            raise _bad("the simulator needs ticker")
        lo, hi = _date_bounds(params, "ex_dividend_date")
        p = self.market.profile(request.symbol) if request.symbol else None
        rows: list[bytes] = []
        if p is not None and p.div_yield > 0:
            today, month0 = self.today(), 1 + int(_unit("div:" + p.symbol) * 3)
            for year in range(_EARLIEST.year, today.year + 2):
                for month in range(month0, 13, 3):
                    ex = _trading_after(date(year, month, 6 + int(_unit("divday:" + p.symbol) * 14)), True)
                    declared = _trading_before(ex - timedelta(days=27))
                    if declared > today or (lo and ex < lo) or (hi and ex > hi):
                        continue
                    amount = max(0.01, round(self.market.spot(p.symbol, declared) * p.div_yield / 4, 2))
                    rows.append(_dumps({
                        "cash_amount": amount, "currency": "USD", "declaration_date": declared.isoformat(),
                        "dividend_type": "CD", "ex_dividend_date": ex.isoformat(), "frequency": 4,
                        "id": "E" + hashlib.blake2b(f"{p.symbol}{ex}".encode(), digest_size=8).hexdigest(),
                        "pay_date": _trading_after(ex + timedelta(days=13), True).isoformat(),
                        "record_date": ex.isoformat(), "ticker": p.symbol}))
        if params.get("order", "desc") == "desc":
            rows.reverse()
        return self._paged(rows, request, limit)

    def _open_interest(self, request: HistoryRequest, limit: int) -> tuple[list[bytes], Any, bytes]:
        """OPRA's figure per contract and session X: what the snapshot of the trading day after X
        shows, for the contracts listed on X. Sessions up to the one before today."""
        params = request.params
        if not {"root", "ticker", "ticker.any_of"} & params.keys():
            raise _bad("the simulator needs root, ticker or ticker.any_of")
        root = params.get("root")
        wanted = {t.strip() for t in params.get("ticker.any_of", params.get("ticker", "")).split(",")} - {""}
        lo, hi = _date_bounds(params, "date")
        hi = min(hi or date.max, _trading_before(self.today()))
        days = trading_days(lo or hi, hi) if request.symbol else []
        at, skip = request.offset or [days[0].isoformat() if days else "", 0]
        rows: list[bytes] = []
        for n, session in enumerate(days):
            if session.isoformat() < at:
                continue
            listed = set(self._day(request.symbol, session).tickers)
            after = self._day(request.symbol, _trading_after(session))
            found = [(t, oi, o) for t, oi in zip(after.tickers, after.oi, strict=True)
                     if oi is not None and t in listed and (not wanted or t in wanted)
                     and (o := _parse_option(t)) and (root is None or o.root == root)]
            take = found[skip:skip + limit - len(rows)]
            for ticker, oi, o in take:
                rows.append(_dumps({
                    "ticker": ticker, "underlying_ticker": self._bare(request.symbol), "root": o.root,
                    "contract_type": "call" if o.call else "put", "expiration_date": o.expiration,
                    "strike_price": o.strike, "open_interest": oi, "date": session.isoformat()}))
            if len(rows) == limit:
                if skip + len(take) < len(found):
                    return rows, [session.isoformat(), skip + len(take)], b""
                return rows, [days[n + 1].isoformat(), 0] if n + 1 < len(days) else None, b""
            skip = 0
        return rows, None, b""

    @staticmethod
    def _bare(symbol: str) -> str:
        return _INDEXES[symbol][0][0] if symbol in _INDEXES else symbol
