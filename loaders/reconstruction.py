"""A past trading day's option chain rebuilt from end-of-day prices: IV and greeks (history.md)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any

import numpy as np
import pyarrow as pa
from py_lets_be_rational import implied_volatility_from_a_transformed_rational_guess as _lbr_iv
from py_lets_be_rational.exceptions import AboveMaximumException, BelowIntrinsicException

from .trading_calendar import NEW_YORK

MIN_CLOSE = 0.05  # below this an end-of-day price says nothing about volatility (history.md)
YEAR_DAYS = 365.0  # T = calendar days / 365, as the metrics' DTE
STANDARD_SHARES = 100
_TENOR_RE = re.compile(r"^yield_(\d+)_(month|year)s?$")
_OCC_RE = re.compile(r"^O:[A-Z0-9.]+\d{6}([CP])\d{8}$")
_erfc = np.frompyfunc(math.erfc, 1, 1)

# Types as in the snapshot pages (polygon/rows.py ARROW_SCHEMA; a test compares).
SCHEMA = pa.schema([
    pa.field("contract_ticker", pa.string(), nullable=False),
    pa.field("expiration_date", pa.date32(), nullable=False),
    pa.field("strike_price", pa.float64(), nullable=False),
    pa.field("option_type", pa.string(), nullable=False),
    pa.field("implied_volatility", pa.float64()),
    pa.field("delta", pa.float64()),
    pa.field("gamma", pa.float64()),
    pa.field("theta", pa.float64()),
    pa.field("vega", pa.float64()),
    pa.field("open_interest", pa.int64()),
    pa.field("volume", pa.int64(), nullable=False),
    pa.field("last", pa.float64()),
    pa.field("bid", pa.float64()),
    pa.field("ask", pa.float64()),
    pa.field("underlying_price", pa.float64()),
    pa.field("day_updated_at", pa.timestamp("us", tz="UTC")),
    pa.field("underlying_symbol", pa.string()),
    pa.field("exercise_style", pa.string()),
    pa.field("shares_per_contract", pa.int64()),
    pa.field("source", pa.string(), nullable=False),
])

# Why a row has no IV; exactly one reason per row without one.
NOT_INVERTED_REASONS = (
    "expiring",  # expiration on or before D: T < 1 trading day
    "no_bar",  # no trade on D
    "zero_volume",  # a bar with v = 0
    "close_below_min",  # close < MIN_CLOSE
    "no_forward",  # no parity pair and no underlying close
    "outside_bounds",  # OTM price at/below intrinsic or at/above the maximum (F for calls, K for puts)
    "inversion_failed",  # the library raised or returned a non-finite volatility
    "no_otm_iv",  # in the money, and the OTM contract at its strike and expiry has no IV
)


@dataclass(frozen=True)
class ReconstructedDay:
    """The rebuilt chain of one (symbol, day) and what happened to each listed contract."""

    table: pa.Table  # SCHEMA, one row per standard contract listed on D
    rejected: dict[str, int] = field(default_factory=dict)  # not stored: why
    not_inverted: dict[str, int] = field(default_factory=dict)  # stored with null IV: why
    inverted: int = 0  # OTM contracts whose own price gave the IV
    from_otm: int = 0  # ITM contracts that took the IV of the OTM contract at their strike

    @property
    def rows(self) -> int:
        """Rows in the table."""
        return self.table.num_rows


@dataclass
class _Chain:
    """The standard contracts as arrays (one entry per row)."""

    tickers: list[str]
    expiries: list[date]
    strike: np.ndarray
    sign: np.ndarray  # +1 call, -1 put
    dte: np.ndarray  # calendar days to expiry
    close: np.ndarray  # NaN without a bar
    volume: np.ndarray
    bar_ms: list[int | None]
    style: list[str | None]
    shares: list[int | None]


# --- rate and forward ----------------------------------------------------------------------------

def curve_points(curve: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The curve's tenors in calendar days and yields in percent, shortest first (None skipped)."""
    points = []
    for key, value in curve.items():
        match = _TENOR_RE.match(key)
        if match is None or value is None:
            continue
        n = int(match[1])
        points.append((n * YEAR_DAYS / 12 if match[2] == "month" else n * YEAR_DAYS, float(value)))
    if not points:
        raise ValueError(f"treasury curve of {curve.get('date')!r} holds no yield_* value")
    points.sort()
    return np.array([p[0] for p in points]), np.array([p[1] for p in points])


def continuous_rate(curve: Mapping[str, Any], days: np.ndarray | float) -> np.ndarray:
    """r = ln(1 + y/100), y interpolated linearly in days between tenors and flat outside."""
    tenor_days, yields = curve_points(curve)
    return np.log1p(np.interp(np.asarray(days, dtype=np.float64), tenor_days, yields) / 100.0)


def dividend_pv(dividends: Sequence[Mapping[str, Any]], day: date, expiry: date,
                curve: Mapping[str, Any]) -> float:
    """PV on D of the cash dividends declared by D with an ex-date in (D, expiry].

    A dividend without a declaration date is left out: nothing shows it was known on D."""
    pv = 0.0
    for div in dividends:
        declared, ex_raw = div.get("declaration_date"), div.get("ex_dividend_date")
        if not declared or not ex_raw or date.fromisoformat(declared) > day:
            continue
        ex_date = date.fromisoformat(ex_raw)
        if day < ex_date <= expiry:
            t_days = (ex_date - day).days
            r = float(continuous_rate(curve, t_days))
            pv += float(div["cash_amount"]) * math.exp(-r * t_days / YEAR_DAYS)
    return pv


def parity_forward(pairs: Sequence[tuple[float, float, float]], r: float, t: float) -> float | None:
    """F = K + e^{rT}(C - P) at the strike where |C - P| is smallest; pairs are (K, C, P)."""
    if not pairs:
        return None
    strike, call, put = min(pairs, key=lambda p: (abs(p[1] - p[2]), p[0]))
    return strike + math.exp(r * t) * (call - put)


def _forwards(chain: _Chain, usable: np.ndarray, spot: float | None, day: date,
              curve: Mapping[str, Any], dividends: Sequence[Mapping[str, Any]]) -> dict[date, float]:
    """The forward of every expiry with T > 0: from parity, else spot carried minus dividends."""
    # A pair shares root, expiry and strike (SPX and SPXW list the same expiry and strike).
    by_key: dict[tuple[str, date, float], dict[int, float]] = {}
    for i in np.flatnonzero(usable):
        key = (chain.tickers[i][:-9], chain.expiries[i], float(chain.strike[i]))
        by_key.setdefault(key, {})[int(chain.sign[i])] = float(chain.close[i])
    pairs: dict[date, list[tuple[float, float, float]]] = {}
    for (_, expiry, strike), prices in by_key.items():
        if len(prices) == 2:
            pairs.setdefault(expiry, []).append((strike, prices[1], prices[-1]))
    forwards: dict[date, float] = {}
    for expiry in set(chain.expiries):
        dte = (expiry - day).days
        if dte < 1:
            continue
        t, r = dte / YEAR_DAYS, float(continuous_rate(curve, dte))
        forward = parity_forward(pairs.get(expiry, []), r, t)
        if forward is None and spot is not None:
            forward = (spot - dividend_pv(dividends, day, expiry, curve)) * math.exp(r * t)
        if forward is not None and forward > 0:
            forwards[expiry] = forward
    return forwards


# --- inversion and greeks ------------------------------------------------------------------------

def black76_iv(undiscounted: float, forward: float, strike: float, t: float,
               is_call: bool) -> tuple[float | None, str | None]:
    """Black-76 IV of an undiscounted price with Jäckel's "Let's Be Rational" (never clamped).

    Returns (iv, None) or (None, reason) with reason 'outside_bounds' or 'inversion_failed'."""
    try:
        iv = _lbr_iv(undiscounted, forward, strike, t, 1.0 if is_call else -1.0)
    except (BelowIntrinsicException, AboveMaximumException):
        return None, "outside_bounds"
    except (ArithmeticError, ValueError):
        return None, "inversion_failed"
    if math.isfinite(iv) and 0 < iv < 1e6:
        return iv, None
    # On some paths the library answers 0 at intrinsic and +-FLOAT_MAX at the bounds.
    return None, "outside_bounds" if iv == 0 or abs(iv) >= 1e300 else "inversion_failed"


def _ncdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64)


def greeks(spot: float, forward: np.ndarray, strike: np.ndarray, t: np.ndarray, r: np.ndarray,
           vol: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, ...]:
    """Delta, gamma, theta, vega in the snapshot's units (loaders/simulator/market.py).

    The forward carries the underlying at the implied yield q = r - ln(F/S)/T, so these are the
    Black-Scholes-Merton greeks: spot delta e^{-qT}N(d1) (minus e^{-qT} for a put), gamma per unit
    of S, theta per calendar day, vega per volatility point (0.01). NaN where vol is NaN."""
    sqrt_t = np.sqrt(t)
    d1 = (np.log(forward / strike) + 0.5 * vol * vol * t) / (vol * sqrt_t)
    d2 = d1 - vol * sqrt_t
    disc_r = np.exp(-r * t)
    disc_q = disc_r * forward / spot
    q = r - np.log(forward / spot) / t
    pdf = np.exp(-0.5 * d1 * d1) / math.sqrt(2.0 * math.pi)
    n1, n2 = _ncdf(sign * d1), _ncdf(sign * d2)
    delta = sign * disc_q * n1
    gamma = disc_q * pdf / (spot * vol * sqrt_t)
    theta = (-spot * disc_q * pdf * vol / (2 * sqrt_t) - sign * r * strike * disc_r * n2
             + sign * q * spot * disc_q * n1) / YEAR_DAYS
    vega = spot * disc_q * pdf * sqrt_t / 100
    return delta, gamma, theta, vega


def _reject_reason(contract: Mapping[str, Any]) -> str | None:
    """Why a listed contract is not stored, or None (history.md: standard deliverables only)."""
    kind = contract.get("contract_type")
    if kind == "other":
        return "contract_type_other"
    if contract.get("shares_per_contract") != STANDARD_SHARES or contract.get("additional_underlyings"):
        return "non_standard_deliverable"
    occ = _OCC_RE.match(contract.get("ticker") or "")  # the counterpart is found by symbol
    if kind not in ("call", "put") or occ is None or occ[1] != kind[0].upper():
        return "malformed"
    try:
        date.fromisoformat(contract["expiration_date"])
        strike = float(contract["strike_price"])
    except (KeyError, TypeError, ValueError):
        return "malformed"
    return None if strike > 0 else "malformed"


def _bar_fields(ticker: str, bar: Mapping[str, Any], day: date) -> tuple[float, int, int]:
    """(close, volume, start in Unix ms) of a bar, checked to be D's session."""
    try:
        close, volume, start_ms = float(bar["c"]), int(bar["v"]), int(bar["t"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bar of {ticker} lacks a numeric c, v or t: {exc}") from None
    session = datetime.fromtimestamp(start_ms / 1000, UTC).astimezone(NEW_YORK).date()
    if session != day:
        raise ValueError(f"bar of {ticker} is for {session}, not {day}")
    if not math.isfinite(close) or close < 0 or volume < 0:
        raise ValueError(f"bar of {ticker} has close {close} and volume {volume}")
    return close, volume, start_ms


def _parse_chain(day: date, contracts: Sequence[Mapping[str, Any]],
                 bars: Mapping[str, Mapping[str, Any]]) -> tuple[_Chain, Counter[str], list[str | None]]:
    """The standard contracts (one per ticker, the last listing wins) with their bars on D."""
    rejected: Counter[str] = Counter()
    kept: dict[str, Mapping[str, Any]] = {}
    for contract in contracts:
        reason = _reject_reason(contract)
        if reason:
            rejected[reason] += 1
        else:
            kept[contract["ticker"]] = contract
    tickers = list(kept)
    expiries = [date.fromisoformat(kept[t]["expiration_date"]) for t in tickers]
    close, volume, bar_ms = np.full(len(tickers), np.nan), np.zeros(len(tickers), np.int64), []
    for i, ticker in enumerate(tickers):
        bar = bars.get(ticker)
        if bar is None:
            bar_ms.append(None)
            continue
        close[i], volume[i], start_ms = _bar_fields(ticker, bar, day)
        bar_ms.append(start_ms)
    chain = _Chain(
        tickers=tickers, expiries=expiries,
        strike=np.array([float(kept[t]["strike_price"]) for t in tickers], dtype=np.float64),
        sign=np.array([1.0 if kept[t]["contract_type"] == "call" else -1.0 for t in tickers]),
        dte=np.array([(e - day).days for e in expiries], dtype=np.float64),
        close=close, volume=volume, bar_ms=bar_ms,
        style=[kept[t].get("exercise_style") for t in tickers],
        shares=[kept[t].get("shares_per_contract") for t in tickers],
    )
    return chain, rejected, [kept[t].get("underlying_ticker") for t in tickers]


def _check_inputs(day: date, underlying_close: float | None, curve: Mapping[str, Any]) -> None:
    if not isinstance(day, date) or isinstance(day, datetime):
        raise ValueError(f"day must be a date, not {day!r}")
    if underlying_close is not None and not (math.isfinite(underlying_close) and underlying_close > 0):
        raise ValueError(f"underlying close of {day} must be a positive number, not {underlying_close!r}")
    curve_date = curve.get("date")
    if curve_date and date.fromisoformat(str(curve_date)) > day:
        raise ValueError(f"treasury curve of {curve_date} is later than {day}: it was not known then")
    curve_points(curve)


def _price_reasons(chain: _Chain) -> np.ndarray:
    """The first reason each contract's own price cannot give an IV, or None."""
    reasons = np.full(len(chain.tickers), None, dtype=object)
    checks = (
        ("close_below_min", chain.close < MIN_CLOSE),
        ("zero_volume", chain.volume == 0),
        ("no_bar", np.isnan(chain.close)),
        ("expiring", chain.dte < 1),
    )
    for reason, mask in checks:  # last assignment wins: the checks run from the weakest reason up
        reasons[mask] = reason
    return reasons


def _counterpart(ticker: str) -> str:
    """The contract of the other type at the same root, expiry and strike (OCC symbology)."""
    return ticker[:-9] + ("P" if ticker[-9] == "C" else "C") + ticker[-8:]


def _implied_vols(chain: _Chain, reasons: np.ndarray, forward: np.ndarray,
                  rate: np.ndarray) -> tuple[np.ndarray, int, int]:
    """IV per contract (NaN where none), filling `reasons`; also the inverted and borrowed counts."""
    t = chain.dte / YEAR_DAYS
    usable = reasons == None  # noqa: E711 - element-wise on an object array
    reasons[usable & np.isnan(forward)] = "no_forward"
    priced = usable & ~np.isnan(forward)
    otm = priced & np.where(chain.sign > 0, chain.strike >= forward, chain.strike < forward)
    iv = np.full(len(chain.tickers), np.nan)
    for i in np.flatnonzero(otm):
        undiscounted = float(chain.close[i] * math.exp(rate[i] * t[i]))
        value, reason = black76_iv(undiscounted, float(forward[i]), float(chain.strike[i]),
                                   float(t[i]), bool(chain.sign[i] > 0))
        if value is None:
            reasons[i] = reason
        else:
            iv[i] = value
    position = {ticker: i for i, ticker in enumerate(chain.tickers)}
    borrowed = 0
    for i in np.flatnonzero(priced & ~otm):
        j = position.get(_counterpart(chain.tickers[i]))
        if j is not None and otm[j] and not np.isnan(iv[j]):
            iv[i] = iv[j]
            borrowed += 1
        else:
            reasons[i] = "no_otm_iv"
    return iv, int(np.count_nonzero(~np.isnan(iv))) - borrowed, borrowed


def reconstruct_day(
    day: date,
    contracts: Sequence[Mapping[str, Any]],
    bars: Mapping[str, Mapping[str, Any]],
    underlying_close: float | None,
    curve: Mapping[str, Any],
    dividends: Sequence[Mapping[str, Any]] = (),
    open_interest: Mapping[str, int] | None = None,
    *,
    underlying_symbol: str | None = None,
) -> ReconstructedDay:
    """Rebuild D's chain as the snapshot would have shown it after the close (history.md).

    Args:
        day: the trading day D.
        contracts: the reference endpoint's contracts listed as of D.
        bars: contract ticker -> its daily aggregate on D (`o h l c v vw n t`); no trade, no entry.
        underlying_close: the underlying's unadjusted close on D (None: unknown).
        curve: D's treasury-yields result (or the latest earlier one), yields in percent.
        dividends: the underlying's cash dividends (`cash_amount`, `ex_dividend_date`,
            `declaration_date`, `pay_date`).
        open_interest: contract ticker -> OI of the previous session; None without the endpoint.
        underlying_symbol: stored in `underlying_symbol` (default: each contract's underlying_ticker).

    Returns:
        The rows (SCHEMA) and the counts of rejected, not inverted and inverted contracts.

    Raises:
        ValueError: an input that cannot be right (a bar of another day, a curve from after D, ...).
    """
    _check_inputs(day, underlying_close, curve)
    chain, rejected, underlyings = _parse_chain(day, contracts, bars)
    rate = continuous_rate(curve, np.maximum(chain.dte, 0.0))
    reasons = _price_reasons(chain)
    forwards = _forwards(chain, reasons == None, underlying_close, day, curve, dividends)  # noqa: E711
    forward = np.array([forwards.get(e, np.nan) for e in chain.expiries], dtype=np.float64)
    iv, inverted, borrowed = _implied_vols(chain, reasons, forward, rate)
    t = np.maximum(chain.dte, 1.0) / YEAR_DAYS
    with np.errstate(invalid="ignore", divide="ignore"):  # NaN IV gives NaN greeks: null
        delta, gamma, theta, vega = greeks(underlying_close or math.nan, forward, chain.strike, t,
                                           rate, iv, chain.sign)
    n = len(chain.tickers)
    oi = [open_interest.get(tk) for tk in chain.tickers] if open_interest is not None else [None] * n
    symbols = [underlying_symbol] * n if underlying_symbol else underlyings
    columns = [
        chain.tickers, chain.expiries, chain.strike, ["C" if s > 0 else "P" for s in chain.sign],
        iv, delta, gamma, theta, vega, oi, chain.volume, chain.close, [None] * n, [None] * n,
        [underlying_close] * n, [None if ms is None else ms * 1000 for ms in chain.bar_ms],
        symbols, chain.style, chain.shares, ["reconstructed"] * n,
    ]
    arrays = [pa.array(values, type=f.type, from_pandas=True) for f, values in zip(SCHEMA, columns, strict=True)]
    return ReconstructedDay(
        table=pa.Table.from_arrays(arrays, schema=SCHEMA), rejected=dict(rejected),
        not_inverted=dict(Counter(r for r in reasons if r is not None)),
        inverted=inverted, from_otm=borrowed,
    )
