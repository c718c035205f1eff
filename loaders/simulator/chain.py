"""How the simulated snapshot is rendered: the awkward parts of real responses, and plan profiles.

The market model (market.py) prices every contract; this module turns its columns into Polygon
contract objects the way real responses look: a contract that did not trade today shows the
previous session's `day` bar, some contracts carry `greeks: {}`, a few deep in-the-money ones an
implied volatility above 5, and the starter plan leaves out quotes, trades, `fmv` and
`break_even_price` and reduces `underlying_asset` to its ticker.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

PLANS = ("full", "starter")
STALE_SHARE = 0.85  # of the contracts with open interest that did not trade today
EMPTY_GREEKS_SHARE = 0.3  # of the contracts without IV: `greeks: {}` instead of no key
HIGH_IV_SHARE = 0.05  # of the deep in-the-money contracts (|delta| > 0.97) that have greeks
_EXCHANGES = (300, 301, 302, 303, 304, 307, 308, 309, 312, 313, 315, 316, 319, 322, 323, 325)
_CONDITIONS = (209, 219, 227, 229, 233)


def check_plan(plan: str) -> str:
    """The plan name, or ValueError."""
    if plan not in PLANS:
        raise ValueError(f"plan must be one of {', '.join(PLANS)}, got {plan!r}")
    return plan


@dataclass(frozen=True, slots=True)
class DayBars:
    """The `day` bar per contract: today's when it traded, else mostly the previous session's."""

    kind: np.ndarray  # 0: no bar ({}), 1: today's, 2: the previous session's
    columns: tuple[np.ndarray, ...]  # change, change %, close, high, updated ns, low, open, prev, vol, vwap


def day_bars(u: np.ndarray, today: dict[str, np.ndarray], oi: np.ndarray, close_ns: int,
             prev_close_ns: int) -> DayBars:
    """Today's bars where volume > 0; for most untraded contracts with open interest, the previous
    session's bar (close = the model's previous close), built from draws `u` (5 rows), not from
    the previous day's chain (which would double the cost of every chain).

    today: the model's arrays close, prev_close, open, high, low, vwap, change, change_pct, volume.
    """
    volume, prev_close = today["volume"], today["prev_close"]
    traded = volume > 0
    stale = ~traded & (oi > 0) & (u[0] < STALE_SHARE)
    before = np.maximum(np.round(prev_close * np.exp(0.15 * (u[1] - 0.5)), 2), 0.01)
    s_open = np.maximum(np.round(before + (prev_close - before) * u[2], 2), 0.01)
    s_high = np.round(np.maximum(s_open, prev_close) * (1 + 0.06 * u[3]), 2)
    s_low = np.maximum(np.round(np.minimum(s_open, prev_close) * (1 - 0.06 * u[3]), 2), 0.01)
    s_change = np.round(prev_close - before, 2)
    pick = lambda now, then: np.where(stale, then, now)  # noqa: E731
    columns = (
        pick(today["change"], s_change),
        pick(today["change_pct"], np.round(s_change / before * 100, 2)),
        pick(today["close"], prev_close),
        pick(today["high"], s_high),
        np.where(stale, prev_close_ns, close_ns),
        pick(today["low"], s_low),
        pick(today["open"], s_open),
        pick(prev_close, before),
        pick(volume, 1 + np.floor(u[4] * np.sqrt(np.maximum(oi, 1)) * 3).astype(np.int64)),
        pick(today["vwap"], np.round(s_low + (s_high - s_low) * u[2], 4)),
    )
    return DayBars(np.where(traded, 1, np.where(stale, 2, 0)), columns)


def render(symbol: str, plan: str, is_index: bool, spot: float, close_ns: int,
           cols: Sequence[list[Any]]) -> Iterator[dict[str, Any]]:
    """Polygon contract objects from per-contract column lists, in the order of the lists.

    cols (in this order): ticker, expiry, strike, is_call, break_even, change_to_break_even,
    bar kind, the 10 DayBars columns, fmv, delta, gamma, theta, vega, iv, bid, ask, mid,
    quote ns, trade ns, trade price, has_quote, has_trade, greeks state (0 greeks, 1 none,
    2 `{}`), has_fmv, oi, oi state (0 value, 1 null, 2 missing), ask size, bid size, trade size,
    exchange index, condition index.
    """
    starter = plan == "starter"
    style = "european" if is_index else "american"
    under_key = "value" if is_index else "price"
    for (ticker, expiry, K, call, be, cbe, bar, ch, chp, cl, hi, dns, lo, op, pc, vo, vw, fmv, de,
         ga, th, ve, iv, bi, ak, md, qns, tns, tpx, hq, ht, gs, hf, o_i, ois, ask_size, bid_size,
         tsize, ex, cond) in zip(*cols, strict=True):
        c: dict[str, Any] = {} if starter else {"break_even_price": be}
        c["day"] = {
            "change": ch, "change_percent": chp, "close": cl, "high": hi, "last_updated": dns,
            "low": lo, "open": op, "previous_close": pc, "volume": vo, "vwap": vw,
        } if bar else {}
        c["details"] = {
            "contract_type": "call" if call else "put", "exercise_style": style,
            "expiration_date": expiry, "shares_per_contract": 100,
            "strike_price": int(K) if K == int(K) else K, "ticker": ticker,
        }
        if hf and not starter:
            c["fmv"] = fmv
        if gs == 0:
            c["greeks"] = {"delta": de, "gamma": ga, "theta": th, "vega": ve}
            c["implied_volatility"] = iv
        elif gs == 2:
            c["greeks"] = {}
        if hq and not starter:
            c["last_quote"] = {"ask": ak, "ask_size": ask_size, "bid": bi, "bid_size": bid_size,
                               "last_updated": qns, "midpoint": md, "timeframe": "DELAYED"}
        if ht and not starter:
            c["last_trade"] = {"price": tpx, "sip_timestamp": tns, "size": tsize,
                               "conditions": [_CONDITIONS[cond]], "exchange": _EXCHANGES[ex],
                               "timeframe": "DELAYED"}
        if ois != 2:
            c["open_interest"] = None if ois else o_i
        c["underlying_asset"] = {"ticker": symbol} if starter else {
            "change_to_break_even": cbe, "last_updated": close_ns, under_key: spot,
            "ticker": symbol, "timeframe": "DELAYED"}
        yield c


def exchanges_and_conditions(u_exchange: np.ndarray, u_condition: np.ndarray) -> tuple[np.ndarray, ...]:
    """Indexes into the exchange and condition codes for uniform draws."""
    return ((u_exchange * len(_EXCHANGES)).astype(np.int64),
            (u_condition * len(_CONDITIONS)).astype(np.int64))

