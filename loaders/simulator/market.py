"""A deterministic option market: Polygon-shaped chains as a pure function of (seed, symbol, date).

The model, in one paragraph: each underlying has a profile (drawn from a hash of its name and the
seed). Its spot follows a geometric Brownian motion on calendar days; its implied-volatility level
follows a mean-reverting process whose shocks are correlated with the spot's (the leverage effect).
The ATM term structure blends a short-end level (which wanders the most) into a calmer long end; the
smile adds put skew and curvature as a function of standardised moneyness. Prices and greeks are
Black-Scholes-Merton at that implied volatility, so chains are internally consistent.

Every path is computed directly for the requested day (no simulation from a start date): the walk
is a Brownian bridge between block ends drawn up front, and the IV level is a finite-memory sum of
the last BLOCK daily shocks. So any date from 1900 to 2199 costs the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache
from typing import Any

import numpy as np

from ..trading_calendar import NEW_YORK, is_trading_day
from .chain import (
    EMPTY_GREEKS_SHARE,
    HIGH_IV_SHARE,
    check_plan,
    day_bars,
    exchanges_and_conditions,
    render,
)

MIN_DATE = date(1900, 1, 1)
MAX_DATE = date(2199, 12, 31)
RATE = 0.04  # risk-free rate used in every price (continuous compounding)
ANCHOR = date(2025, 1, 2)  # the profile's spot is the spot on this date
BLOCK = 1024  # days per block of the random walk; also the IV level's memory (phi**BLOCK ~ 0)
_EPOCH = MIN_DATE - timedelta(days=2 * BLOCK)
_NBLOCKS = (MAX_DATE - _EPOCH).days // BLOCK + 2
_YEAR = 365.0
_MIN_STRIKES = 14  # per expiry and type: enough for the 25/50-delta points to be interpolated well
_STEPS = np.array([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000])
_EQUITY_RE = re.compile(r"^[A-Z][A-Z.]{0,9}$")
_INDEX_RE = re.compile(r"^I:([A-Z]{1,8})$")
_erfc = np.frompyfunc(math.erfc, 1, 1)

try:  # orjson (installed with dlt) serialises about four times faster than the standard library
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - the same JSON, other float spelling (1e-06, not 1e-6)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()

# Index underlyings: option roots (standard, weekly), spot on the anchor date, realised vol, size.
_INDEXES: dict[str, tuple[tuple[str, str], float, float, int]] = {
    "I:SPX": (("SPX", "SPXW"), 5880.0, 0.15, 18000),
    "I:NDX": (("NDX", "NDXP"), 21000.0, 0.19, 11000),
    "I:RUT": (("RUT", "RUTW"), 2250.0, 0.21, 8000),
    "I:VIX": (("VIX", "VIXW"), 17.0, 0.85, 2500),
}
# Well-known names for demos and tests: spot on the anchor date, realised vol, contracts on a
# typical day. Deliberately modest (the real AAPL chain is larger) so tests stay fast.
_KNOWN: dict[str, tuple[float, float, int]] = {
    "AAPL": (243.0, 0.24, 2000), "MSFT": (420.0, 0.22, 1800), "NVDA": (138.0, 0.50, 2000),
    "AMZN": (220.0, 0.30, 1800), "GOOGL": (190.0, 0.30, 1500), "META": (600.0, 0.33, 1800),
    "TSLA": (400.0, 0.60, 2000), "SPY": (590.0, 0.14, 2000), "QQQ": (515.0, 0.18, 2000),
    "IWM": (222.0, 0.21, 1500), "AMD": (122.0, 0.45, 1500), "NFLX": (880.0, 0.35, 1500),
    "JPM": (240.0, 0.22, 1000), "XOM": (107.0, 0.22, 900), "BAC": (44.0, 0.26, 800),
    "KO": (62.0, 0.15, 500), "DIS": (111.0, 0.28, 900), "INTC": (20.0, 0.50, 800),
    "PLTR": (80.0, 0.65, 1200), "GME": (31.0, 0.90, 700), "BRK.B": (455.0, 0.16, 500),
    "F": (10.0, 0.35, 400), "T": (22.0, 0.20, 400), "PFE": (26.0, 0.24, 500),
    "WMT": (90.0, 0.20, 900), "V": (315.0, 0.20, 800), "JNJ": (145.0, 0.16, 600),
    "UNH": (510.0, 0.30, 1000), "COIN": (260.0, 0.75, 1300), "MSTR": (320.0, 1.00, 1400),
}


@dataclass(frozen=True, slots=True)
class Profile:
    """The static parameters of one underlying (a function of seed and symbol only)."""

    symbol: str
    roots: tuple[str, ...]  # option roots; index: (standard, weekly)
    is_index: bool
    spot0: float  # spot on ANCHOR
    drift: float  # annual log drift of the spot
    vol: float  # realised volatility of the spot path
    bound: float  # soft bound on |log(spot/spot0)| so distant dates stay inside the ticker format
    iv_base: float  # long-run ATM implied volatility
    volvol: float  # how far the IV level wanders (std of the log level)
    phi: float  # daily persistence of the IV level
    rho: float  # correlation of IV shocks with spot shocks (negative: leverage effect)
    term_slope: float  # long end relative to iv_base
    term_tau: float  # years over which the short end blends into the long end
    skew: float  # put skew per unit of standardised moneyness (negative: call skew, e.g. VIX)
    smile: float  # smile curvature
    div_yield: float
    target: int  # contracts on a typical day
    schedule: tuple[int, int, int, int, int]  # daily weeks, weeklies, monthlies, quarterlies, LEAPS
    range_k: float  # strike range in standard deviations of log price
    oi_scale: float
    put_call: float  # put/call open-interest balance
    turnover: float  # volume / open interest, before the near-term boost
    quote_cov: float  # share of contracts with a last quote
    trade_cov: float  # share of traded contracts with a last trade
    no_greeks_itm: float  # share of deep in-the-money contracts without greeks and IV


@dataclass(frozen=True, slots=True)
class _Surface:
    """The implied-volatility surface of one symbol on one date."""

    short: float  # ATM vol as maturity -> 0
    long: float  # ATM vol at long maturities
    tau: float
    skew: float
    smile: float

    def atm(self, t: np.ndarray) -> np.ndarray:
        """ATM (forward-moneyness) vol by maturity in years."""
        return self.long + (self.short - self.long) * np.exp(-t / self.tau)

    def vol(self, log_moneyness: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Implied vol at log(K/F) and maturity t; flat beyond 4 standard deviations."""
        atm = self.atm(t)
        z = np.clip(log_moneyness / (atm * np.sqrt(t)), -4.0, 4.0)
        shape = -self.skew * np.tanh(z) + self.smile * (np.sqrt(1.0 + z * z) - 1.0)
        return np.clip(atm * np.exp(shape), 0.01, 4.5)


def _hash64(text: str) -> int:
    # Python's hash() is salted per process: a stable digest keeps symbols reproducible.
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def _unit(text: str) -> float:
    """A stable number in [0, 1) for a string (seed-independent)."""
    return _hash64(text) / 2.0**64


def _rng(seed: int, symbol: str, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed % 2**63, _hash64(symbol), *keys]))


def _ncdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64)


def _npdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def _black_scholes(spot: float, strike: np.ndarray, t: np.ndarray, r: float, q: float,
                   vol: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, ...]:
    """BSM price, delta, gamma, theta (per day, as Polygon) and vega (per vol point);
    sign is +1 for calls, -1 for puts."""
    sqrt_t = np.sqrt(t)
    d1 = (np.log(spot / strike) + (r - q + 0.5 * vol * vol) * t) / (vol * sqrt_t)
    d2 = d1 - vol * sqrt_t
    disc_q, disc_r = np.exp(-q * t), np.exp(-r * t)
    n1, n2, pdf = _ncdf(sign * d1), _ncdf(sign * d2), _npdf(d1)
    price = np.maximum(sign * (spot * disc_q * n1 - strike * disc_r * n2), 0.0)
    theta = (-spot * disc_q * pdf * vol / (2 * sqrt_t) - sign * r * strike * disc_r * n2
             + sign * q * spot * disc_q * n1) / _YEAR
    return (price, sign * disc_q * n1, disc_q * pdf / (spot * vol * sqrt_t), theta,
            spot * disc_q * pdf * sqrt_t / 100)


def _target_size(symbol: str) -> int:
    """Contracts on a typical day for a name outside the tables: mostly modest, a few large."""
    u, v = _unit("size:" + symbol), _unit("size2:" + symbol)
    lo, hi = (200, 2000) if u < 0.80 else (2000, 5000) if u < 0.96 else (5000, 15000)
    return int(lo * (hi / lo) ** v)


def _schedule(target: int, is_index: bool) -> tuple[int, int, int, int, int]:
    # Listed expiries grow with the name's size, as on the real exchanges.
    if is_index:
        return (3, 12, 12, 4, 2)
    if target >= 6000:
        return (2, 8, 6, 4, 3)
    if target >= 2000:
        return (0, 6, 5, 3, 2)
    if target >= 700:
        return (0, 4, 4, 2, 2)
    return (0, 0, 3, 2, 1)


@lru_cache(maxsize=4096)
def _profile(seed: int, symbol: str) -> Profile | None:
    """The symbol's profile, or None if it is not an option underlying (empty chain)."""
    index = _INDEX_RE.match(symbol)
    if not (index or _EQUITY_RE.match(symbol)):
        return None
    u = _rng(seed, symbol, 1).random(20)

    def between(i: int, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(u[i])

    def log_between(i: int, lo: float, hi: float) -> float:
        return lo * (hi / lo) ** float(u[i])

    if index:
        roots, spot0, vol, target = _INDEXES.get(
            symbol,
            ((index[1], index[1] + "W"), log_between(0, 500, 20000), between(1, 0.14, 0.3),
             int(log_between(2, 2000, 6000))),
        )
        iv_base = vol * between(3, 1.05, 1.25)
        skew, rho, put_call = between(4, 0.32, 0.45), -0.8, between(5, 1.2, 1.8)
        div_yield, bound = 0.013, 2.5
        if symbol == "I:VIX":  # VIX options: call skew, vol spikes with the index, a tight range
            iv_base, skew, rho, put_call, div_yield, bound = 0.9, -0.15, 0.7, 0.6, 0.0, 1.0
    else:
        spot0, vol, target = _KNOWN.get(
            symbol, (log_between(0, 5, 600), log_between(1, 0.18, 0.9), _target_size(symbol))
        )
        roots = (symbol.replace(".", ""),)
        iv_base = vol * between(3, 1.0, 1.25)
        skew, rho = between(4, 0.06, 0.22), between(6, -0.8, -0.45)
        put_call = log_between(5, 0.45, 1.45)
        div_yield = 0.0 if u[7] < 0.4 else between(8, 0.002, 0.035)
        bound = 2.5
    return Profile(
        symbol=symbol, roots=tuple(roots), is_index=bool(index), spot0=spot0,
        drift=between(9, -0.02, 0.12), vol=vol, bound=bound, iv_base=iv_base,
        volvol=between(10, 0.18, 0.35), phi=between(11, 0.95, 0.985), rho=rho,
        term_slope=between(12, -0.02, 0.12), term_tau=between(13, 0.15, 0.5), skew=skew,
        smile=between(14, 0.02, 0.10), div_yield=div_yield, target=target,
        schedule=_schedule(target, bool(index)), range_k=3.0 if target < 2000 else 3.5,
        oi_scale=40.0 * math.sqrt(target / 1000) * log_between(15, 0.5, 2.0), put_call=put_call,
        turnover=between(16, 0.03, 0.25), quote_cov=between(17, 0.85, 1.0),
        trade_cov=between(18, 0.7, 1.0), no_greeks_itm=between(19, 0.3, 0.9),
    )


@lru_cache(maxsize=1024)
def _block_ends(seed: int, symbol: str) -> np.ndarray:
    """The walk at every block boundary (unit variance per day), drawn up front: cheap and exact."""
    totals = _rng(seed, symbol, 2).standard_normal(_NBLOCKS) * math.sqrt(BLOCK)
    return np.concatenate(([0.0], np.cumsum(totals)))


@lru_cache(maxsize=512)
def _block(seed: int, symbol: str, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of days: the walk (a Brownian bridge between its ends), its daily increments
    W(j+1) - W(j), and independent normals for the IV level."""
    ends = _block_ends(seed, symbol)
    z = _rng(seed, symbol, 3, block).standard_normal((2, BLOCK))
    partial = np.concatenate(([0.0], np.cumsum(z[0])))
    frac = np.arange(BLOCK + 1) / BLOCK
    walk = ends[block] + frac * (ends[block + 1] - ends[block]) + partial - frac * partial[-1]
    return walk[:-1], np.diff(walk), z[1]


def _day_index(as_of: date) -> int:
    if not MIN_DATE <= as_of <= MAX_DATE:
        raise ValueError(f"date {as_of} outside the simulated range {MIN_DATE}..{MAX_DATE}")
    return (as_of - _EPOCH).days


def _walk(seed: int, symbol: str, day: int) -> float:
    return float(_block(seed, symbol, day // BLOCK)[0][day % BLOCK])


def _spot(p: Profile, seed: int, day: int) -> float:
    anchor = _day_index(ANCHOR)
    log_move = (p.drift - 0.5 * p.vol**2) * (day - anchor) / _YEAR + p.vol * (
        _walk(seed, p.symbol, day) - _walk(seed, p.symbol, anchor)
    ) / math.sqrt(_YEAR)
    # A GBM for any realistic horizon; tanh only bites decades away. Upwards it stops at about
    # 60,000 so that the strikes around spot still fit the ticker's five integer digits.
    bound = p.bound if log_move < 0 else min(p.bound, math.log(60000 / p.spot0))
    return p.spot0 * math.exp(bound * math.tanh(log_move / bound))


def _iv_level(p: Profile, seed: int, day: int) -> float:
    """The IV level's standardised state on `day` (stationary N(0, 1)): an AR(1) of daily shocks,
    summed over the last BLOCK days (older shocks weigh less than phi**BLOCK, i.e. nothing)."""
    b, i = divmod(day, BLOCK)
    _, inc_prev, z_prev = _block(seed, p.symbol, b - 1)
    _, inc, z = _block(seed, p.symbol, b)
    shocks = p.rho * np.concatenate((inc_prev, inc)) + math.sqrt(1 - p.rho**2) * np.concatenate(
        (z_prev, z)
    )
    weights = p.phi ** np.arange(BLOCK - 1, -1, -1, dtype=np.float64)
    return float(shocks[i : i + BLOCK] @ weights) * math.sqrt(1 - p.phi**2)


def _surface(p: Profile, x: float) -> _Surface:
    # High level (x > 0): the short end rises most, so the term structure inverts, as in a selloff.
    short = p.iv_base * math.exp(p.volvol * x)
    long = p.iv_base * (1 + p.term_slope) * math.exp(0.35 * p.volvol * x)
    return _Surface(short, long, p.term_tau, p.skew * (1 + 0.2 * math.tanh(x)), p.smile)


def _third_friday(year: int, month: int) -> date:
    first = date(year, month, 15)
    return first + timedelta(days=(4 - first.weekday()) % 7)


def _trading_on_or_before(day: date) -> date:
    # An expiry on a holiday moves to the previous trading day (e.g. Good Friday -> Thursday).
    while not is_trading_day(day):
        day -= timedelta(days=1)
    return day


def _expiries(as_of: date, schedule: tuple[int, int, int, int, int]) -> list[tuple[date, bool]]:
    """Listed expiries on or after as_of, each with whether it is a standard (third-Friday) one."""
    daily_weeks, weeklies, monthlies, quarterlies, leaps = schedule
    standard: list[date] = []
    year, month = as_of.year, as_of.month
    while len(standard) < monthlies + quarterlies + leaps and year <= MAX_DATE.year + 3:
        expiry = _trading_on_or_before(_third_friday(year, month))
        taken = len(standard)
        # Monthlies first, then quarter months, then January LEAPS.
        wanted = (True if taken < monthlies else month % 3 == 0
                  if taken < monthlies + quarterlies else month == 1)
        if expiry >= as_of and wanted:
            standard.append(expiry)
        year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    others: set[date] = set()
    friday = as_of + timedelta(days=(4 - as_of.weekday()) % 7)
    for week in range(weeklies):
        expiry = _trading_on_or_before(friday + timedelta(weeks=week))
        if expiry >= as_of:
            others.add(expiry)
    for offset in range(7 * daily_weeks):
        if is_trading_day(as_of + timedelta(days=offset)):
            others.add(as_of + timedelta(days=offset))
    std = set(standard)
    return sorted([(d, True) for d in std] + [(d, False) for d in others - std])


def _strike_grid(forward: float, atm: float, t: float, count: int, k: float) -> np.ndarray:
    """Round strikes around the forward; the range widens with maturity, the step follows."""
    # Capped: real listings stop around a quarter to three times spot, however volatile the name.
    width = min(k * atm * math.sqrt(max(t, 7 / _YEAR)), 1.1)
    lo, hi = forward * math.exp(-1.25 * width), forward * math.exp(width)  # wider on the put side
    step = float(_STEPS[np.argmin(np.abs(np.log(_STEPS) - math.log((hi - lo) / count)))])
    first, last = max(1, math.ceil(lo / step)), math.floor(hi / step)
    strikes = np.round(np.arange(first, max(last, first + 3) + 1) * step, 3)
    return strikes[strikes < 100000]  # the ticker has 5 integer digits for the strike


def _constant_maturity(points: list[tuple[int, float]], days: int) -> float | None:
    """volatility-metrics.md's constant-maturity rule over (DTE, vol) points with DTE >= 1."""
    exact = [v for d, v in points if d == days]
    if exact:
        return exact[0]
    below = [(d, v) for d, v in points if d < days]
    above = [(d, v) for d, v in points if d > days]
    if below and above:
        (d1, v1), (d2, v2) = max(below), min(above)
        w1, w2 = v1 * v1 * d1 / _YEAR, v2 * v2 * d2 / _YEAR
        w = w1 + (w2 - w1) * (days - d1) / (d2 - d1)
        return math.sqrt(w / (days / _YEAR)) if w > 0 else None
    if below or above:
        return min(points, key=lambda p: (abs(p[0] - days), p[0]))[1]
    return None


def _close_ns(as_of: date) -> int:
    """16:00 New York on as_of in Unix nanoseconds (Polygon's timestamp unit)."""
    close = datetime.combine(as_of, time(16, 0), tzinfo=NEW_YORK)
    return int(close.timestamp()) * 1_000_000_000


class Market:
    """The simulated option market. Thread-safe; chains are generated lazily and cached."""

    def __init__(self, seed: int = 42, cache_size: int = 32) -> None:
        """Args:
        seed: the market's seed; the same (seed, symbol, date) always gives the same chain.
        cache_size: chains kept as serialised JSON (one per symbol and date, least recently used).
        """
        self.seed = seed
        self._cache: OrderedDict[tuple[str, date, str], list[bytes]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def profile(self, symbol: str) -> Profile | None:
        """The symbol's static parameters, or None if it has no options (an empty chain)."""
        return _profile(self.seed, symbol)

    def spot(self, symbol: str, as_of: date) -> float:
        """The underlying's closing price on as_of."""
        p = self._require(symbol)
        return _spot(p, self.seed, _day_index(as_of))

    def expiries(self, symbol: str, as_of: date) -> list[date]:
        """Listed expiration dates on or after as_of (all roots)."""
        p = self._require(symbol)
        _day_index(as_of)
        return [d for d, _ in _expiries(as_of, p.schedule)]

    def truth(self, symbol: str, as_of: date) -> dict[str, Any]:
        """The parameters behind the chain and the metrics they imply.

        `atm_iv_30d`, `atm_iv_90d` and `skew_25d_30d` apply volatility-metrics.md to the model's
        exact smile (no strike grid): per listed expiry with DTE >= 1, the IV where the call delta is
        +0.50 / +0.25 and the put delta -0.50 / -0.25, then the constant-maturity rule. A correct
        implementation run on the chain differs from these only by interpolating between strikes.
        """
        p = self._require(symbol)
        day = _day_index(as_of)
        x = _iv_level(p, self.seed, day)
        surface = _surface(p, x)
        dtes = np.array([(d - as_of).days for d, _ in _expiries(as_of, p.schedule)])
        dtes = dtes[dtes >= 1]
        t = dtes / _YEAR
        # Columns: call +0.50, put -0.50, call +0.25, put -0.25.
        targets = np.array([0.5, -0.5, 0.25, -0.25])
        vols = self._vol_at_delta(surface, p.div_yield, t[:, None], targets[None, :])
        atm = (vols[:, 0] + vols[:, 1]) / 2
        points = {name: list(zip(dtes.tolist(), col.tolist(), strict=True))
                  for name, col in (("atm", atm), ("c25", vols[:, 2]), ("p25", vols[:, 3]))}
        atm30, atm90 = (_constant_maturity(points["atm"], n) for n in (30, 90))
        c25, p25 = (_constant_maturity(points[n], 30) for n in ("c25", "p25"))
        spot = _spot(p, self.seed, day)
        return {
            "symbol": symbol, "as_of": as_of.isoformat(), "spot": round(spot, 2),
            "atm_iv_30d": atm30, "atm_iv_90d": atm90,
            "skew_25d_30d": None if c25 is None or p25 is None else p25 - c25,
            "iv_term_structure": None if atm30 is None or atm90 is None else atm90 - atm30,
            "iv_level_z": x, "atm_short": surface.short, "atm_long": surface.long,
            "skew_param": surface.skew, "smile_param": surface.smile,
            "realized_vol": p.vol, "rate": RATE, "dividend_yield": p.div_yield,
            "put_call_bias": p.put_call, "expiries": len(dtes),
        }

    def chain(self, symbol: str, as_of: date, plan: str = "full") -> list[dict[str, Any]]:
        """The options snapshot of symbol on as_of: Polygon-shaped contracts sorted by ticker,
        shaped for `plan` ("full", or "starter": no quotes, trades, fmv, break-even, spot)."""
        _day_index(as_of)
        return list(self._contracts(symbol, as_of, check_plan(plan)))

    def chain_json(self, symbol: str, as_of: date, plan: str = "full") -> list[bytes]:
        """chain() with each contract serialised as compact JSON; cached (LRU) for the server."""
        key = (symbol, as_of, check_plan(plan))
        # One lock around generation too: concurrent pages of a new chain must not build it twice.
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                _day_index(as_of)
                cached = [_dumps(c) for c in self._contracts(symbol, as_of, plan)]
                self._cache[key] = cached
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
            else:
                self._cache.move_to_end(key)
            return cached

    def _require(self, symbol: str) -> Profile:
        p = self.profile(symbol)
        if p is None:
            raise ValueError(f"{symbol!r} is not an option underlying")
        return p

    @staticmethod
    def _vol_at_delta(surface: _Surface, q: float, t: np.ndarray, target: np.ndarray) -> np.ndarray:
        """IV where the BSM delta equals target (>0 call, <0 put); bisection in log-moneyness."""
        t, target = np.broadcast_arrays(t, target)
        span = 12 * surface.atm(t) * np.sqrt(t) + 0.5
        lo, hi = -span, span.copy()
        for _ in range(48):  # delta is monotone in strike; 48 halvings: far below the IV rounding
            mid = (lo + hi) / 2
            vol = surface.vol(mid, t)
            d1 = (-mid + 0.5 * vol * vol * t) / (vol * np.sqrt(t))
            delta = np.exp(-q * t) * np.where(target > 0, _ncdf(d1), -_ncdf(-d1))
            above = delta > target  # delta falls as the strike rises
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return surface.vol((lo + hi) / 2, t)

    def _contracts(self, symbol: str, as_of: date, plan: str = "full") -> Iterator[dict[str, Any]]:
        """The chain's contracts in ticker order, built one at a time."""
        p = self.profile(symbol)
        if p is None:
            return
        day = _day_index(as_of)
        spot = _spot(p, self.seed, day)
        surface = _surface(p, _iv_level(p, self.seed, day))
        tickers, expiry_iso, k_arr, call_arr, dte = _listing(p, as_of, spot, surface)
        if not tickers:
            return
        cols = _columns(p, self.seed, day, as_of, spot, surface, k_arr, call_arr, dte)
        # Sorted by ticker up front, so contracts can be yielded one at a time: the server serialises
        # each as it comes and never holds a whole chain of dicts (which the GC would keep scanning).
        order = np.array(sorted(range(len(tickers)), key=tickers.__getitem__), dtype=np.int64)
        lists = [[tickers[i] for i in order], [expiry_iso[i] for i in order]]
        lists += [c[order].tolist() for c in cols]
        yield from render(symbol, plan, p.is_index, round(spot, 2), _close_ns(as_of), lists)


def _listing(p: Profile, as_of: date, spot: float, surface: _Surface
             ) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every listed contract: tickers, ISO expiries, strikes, is-call flags and days to expiry."""
    q, r = p.div_yield, RATE
    listed = _expiries(as_of, p.schedule)
    # Index: the standard root lists only the third-Friday expiries; the weekly root lists all.
    per_root = [[d for d, std in listed if std or not p.is_index or i == 1]
                for i in range(len(p.roots))]
    count = max(_MIN_STRIKES, round(p.target / (2 * max(1, sum(map(len, per_root))))))
    grids: dict[date, np.ndarray] = {}
    for d, _ in listed:
        t = max((d - as_of).days, 1) / _YEAR
        forward = spot * math.exp((r - q) * t)
        grids[d] = _strike_grid(forward, float(surface.atm(np.array(t))), t, count, p.range_k)
    tickers: list[str] = []
    expiry_iso: list[str] = []
    strikes, is_call, dtes = [], [], []
    for root, dates in zip(p.roots, per_root, strict=True):
        for d in dates:
            grid = grids[d]
            for call in (True, False):
                prefix = f"O:{root}{d:%y%m%d}{'C' if call else 'P'}"
                tickers += [f"{prefix}{k:08d}" for k in np.round(grid * 1000).astype(np.int64).tolist()]
                expiry_iso += [d.isoformat()] * len(grid)
                strikes.append(grid)
                is_call.append(np.full(len(grid), call))
                dtes.append(np.full(len(grid), (d - as_of).days, dtype=np.float64))
    if not tickers:
        return [], [], np.array([]), np.array([]), np.array([])
    return tickers, expiry_iso, np.concatenate(strikes), np.concatenate(is_call), np.concatenate(dtes)


def _columns(p: Profile, seed: int, day: int, as_of: date, spot: float, surface: _Surface,
             k_arr: np.ndarray, call_arr: np.ndarray, dte: np.ndarray) -> list[np.ndarray]:
    """Every per-contract value, as arrays in the column order chain.render expects (after the
    ticker and expiry)."""
    n, q, r = len(k_arr), p.div_yield, RATE
    prev_spot = _spot(p, seed, day - 1)
    # Expiring today: a few hours of time value (the snapshot is taken at the close).
    t = np.maximum(dte, 0.25) / _YEAR
    log_m = np.log(k_arr / (spot * np.exp((r - q) * t)))
    vol = surface.vol(log_m, t)
    sign = np.where(call_arr, 1.0, -1.0)
    price, delta, gamma, theta, vega = _black_scholes(spot, k_arr, t, r, q, vol, sign)

    rng = _rng(seed, p.symbol, 4, day)
    u = rng.random((15, n))
    noise = rng.standard_normal((3, n))
    # Open interest: near the money (on the out-of-the-money side), near term, round strikes.
    z_otm = sign * log_m / (surface.atm(t) * np.sqrt(np.maximum(t, 7 / _YEAR)))
    weight = (np.exp(-0.5 * ((z_otm - 0.4) / 1.3) ** 2) * (0.2 + np.exp(-t / 0.25))
              * np.where(call_arr, 1.0, p.put_call * math.exp(0.15 * rng.standard_normal())))
    round_strike = (np.round(k_arr * 1000).astype(np.int64) % (10000 if spot > 50 else 5000)) == 0
    oi = np.floor(p.oi_scale * 40 * weight * np.where(round_strike, 1.6, 1.0)
                  * np.exp(0.7 * noise[0] - 0.25)).astype(np.int64)
    volume = np.floor(oi * p.turnover * (0.3 + 3 * np.exp(-t / 0.05)) * np.exp(noise[1] - 0.5)
                      ).astype(np.int64)
    volume = np.where(volume < 1, 0, volume)

    close_ns = _close_ns(as_of)
    prev_price = np.maximum(price - delta * (spot - prev_spot) - theta, 0.0)
    close = np.maximum(np.round(price, 2), 0.01)
    prev_close = np.maximum(np.round(prev_price, 2), 0.01)
    day_open = np.maximum(np.round(prev_close + (close - prev_close) * (u[0] - 0.3), 2), 0.01)
    high = np.round(np.maximum(day_open, close) * (1 + 0.08 * u[1]), 2)
    low = np.maximum(np.round(np.minimum(day_open, close) * (1 - 0.08 * u[2]), 2), 0.01)
    change = np.round(close - prev_close, 2)
    # The awkward parts draw from their own stream, so the model's values above stay as they were.
    v = _rng(seed, p.symbol, 5, day).random((8, n))
    bars = day_bars(v[:5], {
        "close": close, "prev_close": prev_close, "open": day_open, "high": high, "low": low,
        "vwap": np.round(low + (high - low) * u[3], 4), "change": change,
        "change_pct": np.round(change / prev_close * 100, 2), "volume": volume,
    }, oi, close_ns, _close_ns(_trading_on_or_before(as_of - timedelta(days=1))))
    # Quotes: a spread that widens away from the money; ticks of 0.01 below 3.00, else 0.05.
    half = np.maximum(0.005, (0.01 + 0.03 * price) * (1.5 - np.exp(-0.5 * z_otm**2)) / 2)
    tick = np.where(price < 3, 0.01, 0.05)
    bid = np.maximum(np.floor((price - half) / tick) * tick, 0.0).round(2)
    ask = np.maximum(np.ceil((price + half) / tick) * tick, bid + 0.01).round(2)
    trade_ns = close_ns - (u[5] * 23_400).astype(np.int64) * 1_000_000_000  # in the session
    has_trade = np.where(volume > 0, u[7] < p.trade_cov, (oi > 0) & (u[7] < 0.3 * p.trade_cov))
    # No IV can be backed out of a worthless option; deep in the money, providers often skip it,
    # sometimes as `greeks: {}`, and now and then report an IV far above 5 (recorded: 10.17).
    no_greeks = (price < 0.005) | ((np.abs(delta) > 0.93) & (u[8] < p.no_greeks_itm))
    greeks_state = np.where(no_greeks, np.where(v[5] < EMPTY_GREEKS_SHARE, 2, 1), 0)
    high_iv = ~no_greeks & (np.abs(delta) > 0.97) & (v[6] < HIGH_IV_SHARE)
    # Signs survive rounding: call deltas stay positive, put deltas negative.
    delta = np.where(call_arr, np.maximum(delta, 1e-6), np.minimum(delta, -1e-6))
    break_even = np.round(k_arr + sign * price, 4)
    return [
        k_arr, call_arr, break_even, np.round(break_even - round(spot, 2), 4), bars.kind,
        *bars.columns, np.round(price, 4), np.round(delta, 6), np.round(gamma, 6),
        np.round(theta, 6), np.round(vega, 6),
        np.where(high_iv, np.round(5.2 + 6 * v[7], 2), np.round(vol, 6)),
        bid, ask, np.round((bid + ask) / 2, 4),
        close_ns + (u[4] * 900).astype(np.int64) * 1_000_000_000,
        np.where(volume > 0, trade_ns, trade_ns - 86_400_000_000_000),
        np.where(volume > 0, close, prev_close), u[6] < p.quote_cov, has_trade, greeks_state,
        u[9] < 0.95, oi, np.where(u[10] < 0.003, 1, np.where(u[10] < 0.006, 2, 0)),  # 1 null, 2 missing
        (u[11] * 200 + 1).astype(np.int64), (u[14] * 200 + 1).astype(np.int64),
        (noise[2] ** 2 * 20 + 1).astype(np.int64), *exchanges_and_conditions(u[12], u[13]),
    ]


def _synthetic_name(i: int) -> str:
    digest = hashlib.blake2b(f"universe:{i}".encode(), digest_size=8).digest()
    return "".join(chr(65 + b % 26) for b in digest[: 3 + digest[7] % 2])


def full_market_universe(n: int = 500) -> list[str]:
    """A deterministic list of n underlyings that together look like a full market day.

    The four indexes and the well-known names come first; synthetic names fill size tiers so that
    500 symbols hold about 1.5 million contracts (a few huge chains, many mid-sized, some small).
    """
    fixed = list(_INDEXES) + list(_KNOWN)
    if n <= len(fixed):
        return sorted(fixed[:n])
    rest = n - len(fixed)
    quota = {"large": round(rest * 0.12), "small": round(rest * 0.20)}
    quota["mid"] = rest - quota["large"] - quota["small"]
    chosen: list[str] = []
    seen = set(fixed)
    i = 0
    while len(chosen) < rest:
        name = _synthetic_name(i)
        i += 1
        size = _target_size(name)
        tier = "small" if size < 800 else "mid" if 1500 <= size < 5000 else (
            "large" if size >= 5000 else None)
        if name in seen or tier is None or quota[tier] == 0:
            continue
        seen.add(name)
        quota[tier] -= 1
        chosen.append(name)
    return sorted(fixed + chosen)
