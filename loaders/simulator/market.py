"""A deterministic option market: Polygon-shaped chains as a pure function of (seed, symbol, date).

The model (model.py) gives each contract its price, greeks and implied volatility; this module
lists the contracts, draws their per-contract columns (open interest, volume, bars, quotes) and
serves chains through `Market`, cached as JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import numpy as np

from .chain import (
    EMPTY_GREEKS_SHARE,
    HIGH_IV_SHARE,
    check_plan,
    day_bars,
    exchanges_and_conditions,
    render,
)
from .model import (
    DAYS_PER_YEAR,
    INDEXES,
    KNOWN,
    MIN_STRIKES,
    RATE,
    Profile,
    Surface,
    black_scholes,
    close_time_ns,
    constant_maturity,
    day_index,
    iv_level,
    listed_expiries,
    ncdf,
    profile_of,
    rng_for,
    spot_at,
    strike_grid,
    surface_for,
    target_size,
    trading_on_or_before,
)

try:  # orjson (installed with dlt) serialises about four times faster than the standard library
    from orjson import dumps as _dumps
except ImportError:  # pragma: no cover - the same JSON, other float spelling (1e-06, not 1e-6)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


def compact_json(obj: Any) -> bytes:
    """Compact JSON to keep in a cache. orjson's bytes keep their whole output buffer (orjson 3.13:
    about 8 kB whatever the length; 100,000 contracts held 784 MB), so the cached copy is exact."""
    return bytes(memoryview(_dumps(obj)))


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
        return profile_of(self.seed, symbol)

    def spot(self, symbol: str, as_of: date) -> float:
        """The underlying's closing price on as_of."""
        p = self._require(symbol)
        return spot_at(p, self.seed, day_index(as_of))

    def expiries(self, symbol: str, as_of: date) -> list[date]:
        """Listed expiration dates on or after as_of (all roots)."""
        p = self._require(symbol)
        day_index(as_of)
        return [d for d, _ in listed_expiries(as_of, p.schedule)]

    def truth(self, symbol: str, as_of: date) -> dict[str, Any]:
        """The parameters behind the chain and the metrics they imply.

        `atm_iv_30d`, `atm_iv_90d` and `skew_25d_30d` apply volatility-metrics.md to the model's
        exact smile (no strike grid): per listed expiry with DTE >= 1, the IV where the call delta is
        +0.50 / +0.25 and the put delta -0.50 / -0.25, then the constant-maturity rule. A correct
        implementation run on the chain differs from these only by interpolating between strikes.
        """
        p = self._require(symbol)
        day = day_index(as_of)
        x = iv_level(p, self.seed, day)
        surface = surface_for(p, x)
        dtes = np.array([(d - as_of).days for d, _ in listed_expiries(as_of, p.schedule)])
        dtes = dtes[dtes >= 1]
        t = dtes / DAYS_PER_YEAR
        # Columns: call +0.50, put -0.50, call +0.25, put -0.25.
        targets = np.array([0.5, -0.5, 0.25, -0.25])
        vols = self._vol_at_delta(surface, p.div_yield, t[:, None], targets[None, :])
        atm = (vols[:, 0] + vols[:, 1]) / 2
        points = {name: list(zip(dtes.tolist(), col.tolist(), strict=True))
                  for name, col in (("atm", atm), ("c25", vols[:, 2]), ("p25", vols[:, 3]))}
        atm30, atm90 = (constant_maturity(points["atm"], n) for n in (30, 90))
        c25, p25 = (constant_maturity(points[n], 30) for n in ("c25", "p25"))
        spot = spot_at(p, self.seed, day)
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
        day_index(as_of)
        return list(self._contracts(symbol, as_of, check_plan(plan)))

    def chain_json(self, symbol: str, as_of: date, plan: str = "full") -> list[bytes]:
        """chain() with each contract serialised as compact JSON; cached (LRU) for the server."""
        key = (symbol, as_of, check_plan(plan))
        # One lock around generation too: concurrent pages of a new chain must not build it twice.
        with self._lock:
            cached = self._cache.get(key)
            if cached is None:
                day_index(as_of)
                cached = [compact_json(c) for c in self._contracts(symbol, as_of, plan)]
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
    def _vol_at_delta(surface: Surface, q: float, t: np.ndarray, target: np.ndarray) -> np.ndarray:
        """IV where the BSM delta equals target (>0 call, <0 put); bisection in log-moneyness."""
        t, target = np.broadcast_arrays(t, target)
        span = 12 * surface.atm(t) * np.sqrt(t) + 0.5
        lo, hi = -span, span.copy()
        for _ in range(48):  # delta is monotone in strike; 48 halvings: far below the IV rounding
            mid = (lo + hi) / 2
            vol = surface.vol(mid, t)
            d1 = (-mid + 0.5 * vol * vol * t) / (vol * np.sqrt(t))
            delta = np.exp(-q * t) * np.where(target > 0, ncdf(d1), -ncdf(-d1))
            above = delta > target  # delta falls as the strike rises
            lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
        return surface.vol((lo + hi) / 2, t)

    def _contracts(self, symbol: str, as_of: date, plan: str = "full") -> Iterator[dict[str, Any]]:
        """The chain's contracts in ticker order, built one at a time."""
        p = self.profile(symbol)
        if p is None:
            return
        day = day_index(as_of)
        spot = spot_at(p, self.seed, day)
        surface = surface_for(p, iv_level(p, self.seed, day))
        tickers, expiry_iso, k_arr, call_arr, dte = _listing(p, as_of, spot, surface)
        if not tickers:
            return
        cols = _columns(p, self.seed, day, as_of, spot, surface, k_arr, call_arr, dte)
        # Sorted by ticker up front, so contracts can be yielded one at a time: the server serialises
        # each as it comes and never holds a whole chain of dicts (which the GC would keep scanning).
        order = np.array(sorted(range(len(tickers)), key=tickers.__getitem__), dtype=np.int64)
        lists = [[tickers[i] for i in order], [expiry_iso[i] for i in order]]
        lists += [c[order].tolist() for c in cols]
        yield from render(symbol, plan, p.is_index, round(spot, 2), close_time_ns(as_of), lists)


def _listing(p: Profile, as_of: date, spot: float, surface: Surface
             ) -> tuple[list[str], list[str], np.ndarray, np.ndarray, np.ndarray]:
    """Every listed contract: tickers, ISO expiries, strikes, is-call flags and days to expiry."""
    q, r = p.div_yield, RATE
    listed = listed_expiries(as_of, p.schedule)
    # Index: the standard root lists only the third-Friday expiries; the weekly root lists all.
    per_root = [[d for d, std in listed if std or not p.is_index or i == 1]
                for i in range(len(p.roots))]
    count = max(MIN_STRIKES, round(p.target / (2 * max(1, sum(map(len, per_root))))))
    grids: dict[date, np.ndarray] = {}
    for d, _ in listed:
        t = max((d - as_of).days, 1) / DAYS_PER_YEAR
        forward = spot * math.exp((r - q) * t)
        grids[d] = strike_grid(forward, float(surface.atm(np.array(t))), t, count, p.range_k)
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


def _columns(p: Profile, seed: int, day: int, as_of: date, spot: float, surface: Surface,
             k_arr: np.ndarray, call_arr: np.ndarray, dte: np.ndarray) -> list[np.ndarray]:
    """Every per-contract value, as arrays in the column order chain.render expects (after the
    ticker and expiry)."""
    n, q, r = len(k_arr), p.div_yield, RATE
    prev_spot = spot_at(p, seed, day - 1)
    # Expiring today: a few hours of time value (the snapshot is taken at the close).
    t = np.maximum(dte, 0.25) / DAYS_PER_YEAR
    log_m = np.log(k_arr / (spot * np.exp((r - q) * t)))
    vol = surface.vol(log_m, t)
    sign = np.where(call_arr, 1.0, -1.0)
    price, delta, gamma, theta, vega = black_scholes(spot, k_arr, t, r, q, vol, sign)

    rng = rng_for(seed, p.symbol, 4, day)
    u = rng.random((15, n))
    noise = rng.standard_normal((3, n))
    # Open interest: near the money (on the out-of-the-money side), near term, round strikes.
    z_otm = sign * log_m / (surface.atm(t) * np.sqrt(np.maximum(t, 7 / DAYS_PER_YEAR)))
    weight = (np.exp(-0.5 * ((z_otm - 0.4) / 1.3) ** 2) * (0.2 + np.exp(-t / 0.25))
              * np.where(call_arr, 1.0, p.put_call * math.exp(0.15 * rng.standard_normal())))
    round_strike = (np.round(k_arr * 1000).astype(np.int64) % (10000 if spot > 50 else 5000)) == 0
    oi = np.floor(p.oi_scale * 40 * weight * np.where(round_strike, 1.6, 1.0)
                  * np.exp(0.7 * noise[0] - 0.25)).astype(np.int64)
    volume = np.floor(oi * p.turnover * (0.3 + 3 * np.exp(-t / 0.05)) * np.exp(noise[1] - 0.5)
                      ).astype(np.int64)
    volume = np.where(volume < 1, 0, volume)

    close_ns = close_time_ns(as_of)
    prev_price = np.maximum(price - delta * (spot - prev_spot) - theta, 0.0)
    close = np.maximum(np.round(price, 2), 0.01)
    prev_close = np.maximum(np.round(prev_price, 2), 0.01)
    day_open = np.maximum(np.round(prev_close + (close - prev_close) * (u[0] - 0.3), 2), 0.01)
    high = np.round(np.maximum(day_open, close) * (1 + 0.08 * u[1]), 2)
    low = np.maximum(np.round(np.minimum(day_open, close) * (1 - 0.08 * u[2]), 2), 0.01)
    change = np.round(close - prev_close, 2)
    # The awkward parts draw from their own stream, so the model's values above stay as they were.
    v = rng_for(seed, p.symbol, 5, day).random((8, n))
    bars = day_bars(v[:5], {
        "close": close, "prev_close": prev_close, "open": day_open, "high": high, "low": low,
        "vwap": np.round(low + (high - low) * u[3], 4), "change": change,
        "change_pct": np.round(change / prev_close * 100, 2), "volume": volume,
    }, oi, close_ns, close_time_ns(trading_on_or_before(as_of - timedelta(days=1))))
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
    fixed = list(INDEXES) + list(KNOWN)
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
        size = target_size(name)
        tier = "small" if size < 800 else "mid" if 1500 <= size < 5000 else (
            "large" if size >= 5000 else None)
        if name in seen or tier is None or quota[tier] == 0:
            continue
        seen.add(name)
        quota[tier] -= 1
        chosen.append(name)
    return sorted(fixed + chosen)
