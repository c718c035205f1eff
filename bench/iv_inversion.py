"""Black-76 inversion: py_lets_be_rational against vollib (speed and round-trip accuracy on one
core), and loaders.reconstruction.reconstruct_day end to end on a simulated chain."""

from __future__ import annotations

import argparse
import logging
import math
import time
from collections.abc import Callable
from datetime import date, datetime
from datetime import time as clock
from typing import Any

import numpy as np
import py_lets_be_rational as lbr

from loaders.reconstruction import reconstruct_day
from loaders.simulator import Market
from loaders.simulator.model import RATE
from loaders.trading_calendar import NEW_YORK

log = logging.getLogger("bench.iv_inversion")
SEED = 42
DAY = date(2025, 12, 19)
Case = tuple[float, float, float, float, float, float]  # undiscounted price, F, K, T, q (+1/-1), vol


def synthetic_cases(n: int, seed: int = 7) -> list[Case]:
    """Out-of-the-money Black-76 prices over the ranges a chain holds (T 2 days to 2 years)."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    while len(cases) < n:
        t = float(rng.uniform(2, 730)) / 365
        vol = float(rng.uniform(0.05, 1.5))
        x = float(rng.normal(0, 1.5)) * vol * math.sqrt(t)  # log(K/F), up to a few deviations
        strike, q = 100.0 * math.exp(x), 1.0 if x >= 0 else -1.0
        price = lbr.black(100.0, strike, vol, t, q)
        if price > 1e-4:  # a price of $0.05 on a $500 underlying; tinier ones are not inverted
            cases.append((price, 100.0, strike, t, q, vol))
    return cases


def _lbr(case: Case, r: float) -> float:
    price, f, k, t, q, _ = case
    return float(lbr.implied_volatility_from_a_transformed_rational_guess(price, f, k, t, q))


def _vollib() -> Callable[[Case, float], float] | None:
    try:
        from vollib.black import implied_volatility as vollib_iv
    except ImportError:
        return None

    def invert(case: Case, r: float) -> float:
        price, f, k, t, q, _ = case  # vollib takes the discounted price and a flag
        return float(vollib_iv.implied_volatility(price * math.exp(-r * t), f, k, r, t,
                                                  "c" if q > 0 else "p"))
    return invert


def measure(name: str, invert: Callable[[Case, float], float], cases: list[Case]) -> dict[str, Any]:
    """Inversions per second (best of three passes) and the round-trip errors."""
    r = 0.04
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        found = [invert(case, r) for case in cases]
        best = min(best, time.perf_counter() - start)
    errors = np.abs(np.array(found) - np.array([c[5] for c in cases]))
    result = {"library": name, "per_s": len(cases) / best, "median_err": float(np.median(errors)),
              "max_err": float(errors.max())}
    log.info("%-20s %8.0f inversions/s   round trip: median |err| %.1e, max %.1e",
             name, result["per_s"], result["median_err"], result["max_err"])
    return result


def simulated_day(market: Market, symbol: str, day: date) -> dict[str, Any]:
    """reconstruct_day's inputs as the historical endpoints would give them for a simulated day.

    A contract has a bar only when its snapshot `day` bar is D's session; the curve is flat at
    the simulator's continuous RATE; no dividends (the model's dividend yield is in the forward)."""
    chain = market.chain(symbol, day)
    close_ns = int(datetime.combine(day, clock(16), tzinfo=NEW_YORK).timestamp()) * 10**9
    start_ms = int(datetime.combine(day, clock(0), tzinfo=NEW_YORK).timestamp()) * 1000
    bars = {
        c["details"]["ticker"]: {"o": d["open"], "h": d["high"], "l": d["low"], "c": d["close"],
                                 "v": d["volume"], "vw": d["vwap"], "n": 1, "t": start_ms}
        for c in chain if (d := c.get("day") or {}).get("last_updated") == close_ns
    }
    percent = math.expm1(RATE) * 100  # ln(1 + y/100) = RATE
    return {
        "day": day,
        "contracts": [dict(c["details"], underlying_ticker=symbol) for c in chain],
        "bars": bars,
        "underlying_close": market.spot(symbol, day),
        "curve": {"date": day.isoformat(), "yield_1_month": percent, "yield_30_year": percent},
        "dividends": [],
        "open_interest": {c["details"]["ticker"]: c["open_interest"]
                          for c in chain if c.get("open_interest") is not None},
        "underlying_symbol": symbol,
    }


def end_to_end(symbol: str = "AAPL", day: date = DAY) -> float:
    """reconstruct_day on one simulated chain (AAPL: about 2,000 contracts): contracts/s."""
    inputs = simulated_day(Market(SEED), symbol, day)
    result = reconstruct_day(**inputs)
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        reconstruct_day(**inputs)
        best = min(best, time.perf_counter() - start)
    log.info("reconstruct_day %s %s: %d contracts, %d inverted + %d from OTM, in %.3f s: "
             "%.0f contracts/s", symbol, day, result.rows, result.inverted, result.from_otm, best,
             result.rows / best)
    return result.rows / best


def accuracy(symbol: str, day: date = DAY, stale: bool = False) -> dict[str, float]:
    """IV error against the simulator's truth (OTM, close >= 0.20, DTE >= 2).

    stale: each close is repriced at the forward of its last trade, uniform in the session (the
    simulator's trade times), with the underlying moving at its realised vol since then: the
    method's known bias, which the simulator's own closes (all at 16:00) do not have."""
    market = Market(SEED)
    inputs = simulated_day(market, symbol, day)
    profile = market.profile(symbol)
    assert profile is not None
    spot, rng = inputs["underlying_close"], np.random.default_rng(11)
    truth = {c["details"]["ticker"]: c for c in market.chain(symbol, day)}
    picked: list[str] = []
    for ticker, bar in inputs["bars"].items():
        contract = truth[ticker]
        dte = (date.fromisoformat(contract["details"]["expiration_date"]) - day).days
        t, call = dte / 365, contract["details"]["contract_type"] == "call"
        forward = spot * math.exp((RATE - profile.div_yield) * t)
        if "implied_volatility" not in contract or dte < 2:
            continue
        if stale:
            hours = rng.uniform(0, 6.5)
            moved = forward * math.exp(profile.vol * math.sqrt(hours / 6.5 / 252) * rng.normal())
            price = math.exp(-RATE * t) * lbr.black(moved, contract["details"]["strike_price"],
                                                    contract["implied_volatility"], t,
                                                    1.0 if call else -1.0)
            bar["c"] = max(round(price, 2), 0.01)
        strike = contract["details"]["strike_price"]
        if (strike >= forward if call else strike < forward) and bar["c"] >= 0.20:
            picked.append(ticker)
    rows = {r["contract_ticker"]: r for r in reconstruct_day(**inputs).table.to_pylist()}
    found = [t for t in picked if rows[t]["implied_volatility"] is not None]
    errors = np.array([rows[t]["implied_volatility"] - truth[t]["implied_volatility"] for t in found])
    result = {"contracts": len(picked), "with_iv": len(found) / len(picked),
              "within_0005": float(np.mean(np.abs(errors) <= 0.005)),
              "median_abs": float(np.median(np.abs(errors))), "p95_abs": float(np.percentile(np.abs(errors), 95))}
    log.info("%-6s %s %s: %5d OTM contracts, IV for %.1f%%, |err| <= 0.005 for %.1f%%, median %.1e, "
             "p95 %.1e", symbol, day, "stale " if stale else "closes", result["contracts"],
             100 * result["with_iv"], 100 * result["within_0005"], result["median_abs"], result["p95_abs"])
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20000, help="synthetic prices to invert")
    parser.add_argument("--symbol", default="AAPL", help="simulated chain for the end-to-end rate")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cases = synthetic_cases(args.n)
    log.info("%d out-of-the-money Black-76 prices, vol 0.05-1.5, T 2 days-2 years, one core:", len(cases))
    measure("py_lets_be_rational", _lbr, cases)
    vollib = _vollib()
    if vollib is None:
        log.info("vollib               not installed (pip install vollib to compare)")
    else:
        measure("vollib", vollib, cases)
    end_to_end(args.symbol)
    log.info("IV against the simulator's truth (bars at 16:00, then closes of trades spread over the session):")
    for symbol in ("AAPL", "SPY", "TSLA", "I:SPX"):
        for stale in (False, True):
            accuracy(symbol, stale=stale)


if __name__ == "__main__":
    main()
