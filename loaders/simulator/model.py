"""The simulated market's model: profiles, the random paths of spot and IV level, the IV surface,
Black-Scholes and the listing schedule, each a pure function of (seed, symbol, date).

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
import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import lru_cache

import numpy as np

from ..trading_calendar import NEW_YORK, is_trading_day

MIN_DATE = date(1900, 1, 1)
MAX_DATE = date(2199, 12, 31)
RATE = 0.04  # risk-free rate used in every price (continuous compounding)
ANCHOR = date(2025, 1, 2)  # the profile's spot is the spot on this date
BLOCK = 1024  # days per block of the random walk; also the IV level's memory (phi**BLOCK ~ 0)
_EPOCH = MIN_DATE - timedelta(days=2 * BLOCK)
_NBLOCKS = (MAX_DATE - _EPOCH).days // BLOCK + 2
DAYS_PER_YEAR = 365.0  # maturities are calendar days / 365
MIN_STRIKES = 14  # per expiry and type: enough for the 25/50-delta points to be interpolated well
_STEPS = np.array([0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000])
_EQUITY_RE = re.compile(r"^[A-Z][A-Z.]{0,9}$")
_INDEX_RE = re.compile(r"^I:([A-Z]{1,8})$")
_erfc = np.frompyfunc(math.erfc, 1, 1)

# Index underlyings: option roots (standard, weekly), spot on the anchor date, realised vol, size.
INDEXES: dict[str, tuple[tuple[str, str], float, float, int]] = {
    "I:SPX": (("SPX", "SPXW"), 5880.0, 0.15, 18000),
    "I:NDX": (("NDX", "NDXP"), 21000.0, 0.19, 11000),
    "I:RUT": (("RUT", "RUTW"), 2250.0, 0.21, 8000),
    "I:VIX": (("VIX", "VIXW"), 17.0, 0.85, 2500),
}
# Well-known names for demos and tests: spot on the anchor date, realised vol, contracts on a
# typical day. Deliberately modest (the real AAPL chain is larger) so tests stay fast.
KNOWN: dict[str, tuple[float, float, int]] = {
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
class Surface:
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


def unit(text: str) -> float:
    """A stable number in [0, 1) for a string (seed-independent)."""
    return _hash64(text) / 2.0**64


def rng_for(seed: int, symbol: str, *keys: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64([seed % 2**63, _hash64(symbol), *keys]))


def ncdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(-x / math.sqrt(2.0)).astype(np.float64)


def _npdf(x: np.ndarray) -> np.ndarray:
    return np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def black_scholes(spot: float, strike: np.ndarray, t: np.ndarray, r: float, q: float,
                   vol: np.ndarray, sign: np.ndarray) -> tuple[np.ndarray, ...]:
    """BSM price, delta, gamma, theta (per day, as Polygon) and vega (per vol point);
    sign is +1 for calls, -1 for puts."""
    sqrt_t = np.sqrt(t)
    d1 = (np.log(spot / strike) + (r - q + 0.5 * vol * vol) * t) / (vol * sqrt_t)
    d2 = d1 - vol * sqrt_t
    disc_q, disc_r = np.exp(-q * t), np.exp(-r * t)
    n1, n2, pdf = ncdf(sign * d1), ncdf(sign * d2), _npdf(d1)
    price = np.maximum(sign * (spot * disc_q * n1 - strike * disc_r * n2), 0.0)
    theta = (-spot * disc_q * pdf * vol / (2 * sqrt_t) - sign * r * strike * disc_r * n2
             + sign * q * spot * disc_q * n1) / DAYS_PER_YEAR
    return (price, sign * disc_q * n1, disc_q * pdf / (spot * vol * sqrt_t), theta,
            spot * disc_q * pdf * sqrt_t / 100)


def target_size(symbol: str) -> int:
    """Contracts on a typical day for a name outside the tables: mostly modest, a few large."""
    u, v = unit("size:" + symbol), unit("size2:" + symbol)
    lo, hi = (200, 2000) if u < 0.80 else (2000, 5000) if u < 0.96 else (5000, 15000)
    return int(lo * (hi / lo) ** v)


def listing_schedule(target: int, is_index: bool) -> tuple[int, int, int, int, int]:
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
def profile_of(seed: int, symbol: str) -> Profile | None:
    """The symbol's profile, or None if it is not an option underlying (empty chain)."""
    index = _INDEX_RE.match(symbol)
    if not (index or _EQUITY_RE.match(symbol)):
        return None
    u = rng_for(seed, symbol, 1).random(20)

    def between(i: int, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(u[i])

    def log_between(i: int, lo: float, hi: float) -> float:
        return lo * (hi / lo) ** float(u[i])

    if index:
        roots, spot0, vol, target = INDEXES.get(
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
        spot0, vol, target = KNOWN.get(
            symbol, (log_between(0, 5, 600), log_between(1, 0.18, 0.9), target_size(symbol))
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
        schedule=listing_schedule(target, bool(index)), range_k=3.0 if target < 2000 else 3.5,
        oi_scale=40.0 * math.sqrt(target / 1000) * log_between(15, 0.5, 2.0), put_call=put_call,
        turnover=between(16, 0.03, 0.25), quote_cov=between(17, 0.85, 1.0),
        trade_cov=between(18, 0.7, 1.0), no_greeks_itm=between(19, 0.3, 0.9),
    )


@lru_cache(maxsize=1024)
def _block_ends(seed: int, symbol: str) -> np.ndarray:
    """The walk at every block boundary (unit variance per day), drawn up front: cheap and exact."""
    totals = rng_for(seed, symbol, 2).standard_normal(_NBLOCKS) * math.sqrt(BLOCK)
    return np.concatenate(([0.0], np.cumsum(totals)))


@lru_cache(maxsize=512)
def _block(seed: int, symbol: str, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One block of days: the walk (a Brownian bridge between its ends), its daily increments
    W(j+1) - W(j), and independent normals for the IV level."""
    ends = _block_ends(seed, symbol)
    z = rng_for(seed, symbol, 3, block).standard_normal((2, BLOCK))
    partial = np.concatenate(([0.0], np.cumsum(z[0])))
    frac = np.arange(BLOCK + 1) / BLOCK
    walk = ends[block] + frac * (ends[block + 1] - ends[block]) + partial - frac * partial[-1]
    return walk[:-1], np.diff(walk), z[1]


def day_index(as_of: date) -> int:
    if not MIN_DATE <= as_of <= MAX_DATE:
        raise ValueError(f"date {as_of} outside the simulated range {MIN_DATE}..{MAX_DATE}")
    return (as_of - _EPOCH).days


def _walk(seed: int, symbol: str, day: int) -> float:
    return float(_block(seed, symbol, day // BLOCK)[0][day % BLOCK])


def spot_at(p: Profile, seed: int, day: int) -> float:
    anchor = day_index(ANCHOR)
    log_move = (p.drift - 0.5 * p.vol**2) * (day - anchor) / DAYS_PER_YEAR + p.vol * (
        _walk(seed, p.symbol, day) - _walk(seed, p.symbol, anchor)
    ) / math.sqrt(DAYS_PER_YEAR)
    # A GBM for any realistic horizon; tanh only bites decades away. Upwards it stops at about
    # 60,000 so that the strikes around spot still fit the ticker's five integer digits.
    bound = p.bound if log_move < 0 else min(p.bound, math.log(60000 / p.spot0))
    return p.spot0 * math.exp(bound * math.tanh(log_move / bound))


def iv_level(p: Profile, seed: int, day: int) -> float:
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


def surface_for(p: Profile, x: float) -> Surface:
    # High level (x > 0): the short end rises most, so the term structure inverts, as in a selloff.
    short = p.iv_base * math.exp(p.volvol * x)
    long = p.iv_base * (1 + p.term_slope) * math.exp(0.35 * p.volvol * x)
    return Surface(short, long, p.term_tau, p.skew * (1 + 0.2 * math.tanh(x)), p.smile)


def _third_friday(year: int, month: int) -> date:
    first = date(year, month, 15)
    return first + timedelta(days=(4 - first.weekday()) % 7)


def trading_on_or_before(day: date) -> date:
    # An expiry on a holiday moves to the previous trading day (e.g. Good Friday -> Thursday).
    while not is_trading_day(day):
        day -= timedelta(days=1)
    return day


def listed_expiries(as_of: date, schedule: tuple[int, int, int, int, int]) -> list[tuple[date, bool]]:
    """Listed expiries on or after as_of, each with whether it is a standard (third-Friday) one."""
    daily_weeks, weeklies, monthlies, quarterlies, leaps = schedule
    standard: list[date] = []
    year, month = as_of.year, as_of.month
    while len(standard) < monthlies + quarterlies + leaps and year <= MAX_DATE.year + 3:
        expiry = trading_on_or_before(_third_friday(year, month))
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
        expiry = trading_on_or_before(friday + timedelta(weeks=week))
        if expiry >= as_of:
            others.add(expiry)
    for offset in range(7 * daily_weeks):
        if is_trading_day(as_of + timedelta(days=offset)):
            others.add(as_of + timedelta(days=offset))
    std = set(standard)
    return sorted([(d, True) for d in std] + [(d, False) for d in others - std])


def strike_grid(forward: float, atm: float, t: float, count: int, k: float) -> np.ndarray:
    """Round strikes around the forward; the range widens with maturity, the step follows."""
    # Capped: real listings stop around a quarter to three times spot, however volatile the name.
    width = min(k * atm * math.sqrt(max(t, 7 / DAYS_PER_YEAR)), 1.1)
    lo, hi = forward * math.exp(-1.25 * width), forward * math.exp(width)  # wider on the put side
    step = float(_STEPS[np.argmin(np.abs(np.log(_STEPS) - math.log((hi - lo) / count)))])
    first, last = max(1, math.ceil(lo / step)), math.floor(hi / step)
    strikes = np.round(np.arange(first, max(last, first + 3) + 1) * step, 3)
    return strikes[strikes < 100000]  # the ticker has 5 integer digits for the strike


def constant_maturity(points: list[tuple[int, float]], days: int) -> float | None:
    """volatility-metrics.md's constant-maturity rule over (DTE, vol) points with DTE >= 1."""
    exact = [v for d, v in points if d == days]
    if exact:
        return exact[0]
    below = [(d, v) for d, v in points if d < days]
    above = [(d, v) for d, v in points if d > days]
    if below and above:
        (d1, v1), (d2, v2) = max(below), min(above)
        w1, w2 = v1 * v1 * d1 / DAYS_PER_YEAR, v2 * v2 * d2 / DAYS_PER_YEAR
        w = w1 + (w2 - w1) * (days - d1) / (d2 - d1)
        return math.sqrt(w / (days / DAYS_PER_YEAR)) if w > 0 else None
    if below or above:
        return min(points, key=lambda p: (abs(p[0] - days), p[0]))[1]
    return None


def close_time_ns(as_of: date) -> int:
    """16:00 New York on as_of in Unix nanoseconds (Polygon's timestamp unit)."""
    close = datetime.combine(as_of, time(16, 0), tzinfo=NEW_YORK)
    return int(close.timestamp()) * 1_000_000_000


