"""The market simulator: the model's shape and ground truth, the HTTP API, and every fault knob."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import requests

from loaders.simulator import Fault, Market, SimulatorServer, full_market_universe

DAY = date(2025, 11, 21)  # a Friday, monthly expiration day
KEY = "test-key"
PATH = "/v3/snapshot/options/"
TOP_LEVEL = {"break_even_price", "day", "details", "fmv", "greeks", "implied_volatility",
             "last_quote", "last_trade", "open_interest", "underlying_asset"}
DAY_FIELDS = {"change", "change_percent", "close", "high", "last_updated", "low", "open",
              "previous_close", "volume", "vwap"}


def _get(server: SimulatorServer, symbol: str, **params: Any) -> requests.Response:
    params.setdefault("apiKey", KEY)
    params.setdefault("date", DAY.isoformat())
    return requests.get(server.base_url + PATH + symbol, params=params, timeout=10)


def _walk(first: requests.Response, max_pages: int = 100) -> list[dict[str, Any]]:
    """Follow next_url to the end, sending the key as a Bearer header (never in the URL)."""
    body = first.json()
    results = list(body["results"])
    for _ in range(max_pages):
        if "next_url" not in body:
            return results
        body = requests.get(body["next_url"], headers={"Authorization": f"Bearer {KEY}"},
                            timeout=10).json()
        results += body["results"]
    raise AssertionError("pagination did not end")


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- the model -----------------------------------------------------------------------------------


def test_contract_shape_matches_polygon(market: Market) -> None:
    chain = market.chain("AAPL", DAY)
    assert 300 <= len(chain) <= 3000
    close_ns = int(datetime(2025, 11, 21, 21, 0, tzinfo=UTC).timestamp()) * 10**9  # 16:00 New York
    for c in chain:
        assert set(c) <= TOP_LEVEL and {"details", "underlying_asset", "day"} <= set(c)
        d = c["details"]
        assert set(d) == {"contract_type", "exercise_style", "expiration_date",
                          "shares_per_contract", "strike_price", "ticker"}
        assert d["contract_type"] in ("call", "put") and d["exercise_style"] == "american"
        assert date.fromisoformat(d["expiration_date"]) >= DAY and d["shares_per_contract"] == 100
        assert _number(d["strike_price"]) and d["strike_price"] > 0
        expected = (f"O:AAPL{date.fromisoformat(d['expiration_date']):%y%m%d}"
                    f"{d['contract_type'][0].upper()}{round(d['strike_price'] * 1000):08d}")
        assert d["ticker"] == expected
        u = c["underlying_asset"]
        assert u["ticker"] == "AAPL" and _number(u["price"]) and "value" not in u
        assert u["last_updated"] == close_ns and u["timeframe"] == "DELAYED"
        if c["day"]:
            assert set(c["day"]) == DAY_FIELDS and isinstance(c["day"]["volume"], int)
            assert c["day"]["low"] <= c["day"]["close"] <= c["day"]["high"]
        if c.get("greeks"):
            g = c["greeks"]
            assert set(g) == {"delta", "gamma", "theta", "vega"} and all(map(_number, g.values()))
            assert (g["delta"] > 0) if d["contract_type"] == "call" else (g["delta"] < 0)
            assert g["gamma"] >= 0 and g["vega"] >= 0
            # Above 5 only deep in the money, as recorded real responses show (e.g. 10.17).
            assert 0 < c["implied_volatility"] <= 5 or abs(g["delta"]) > 0.97
        else:
            assert c.get("greeks", {}) == {} and "implied_volatility" not in c
        if "last_quote" in c:
            q = c["last_quote"]
            assert set(q) == {"ask", "ask_size", "bid", "bid_size", "last_updated", "midpoint",
                              "timeframe"}
            assert 0 <= q["bid"] < q["ask"] and q["midpoint"] == pytest.approx((q["bid"] + q["ask"]) / 2)
            assert isinstance(q["last_updated"], int) and q["last_updated"] > 10**18  # nanoseconds
        if "last_trade" in c:
            t = c["last_trade"]
            assert set(t) == {"price", "sip_timestamp", "size", "conditions", "exchange", "timeframe"}
            assert isinstance(t["sip_timestamp"], int) and t["sip_timestamp"] > 10**18
            assert isinstance(t["conditions"], list) and isinstance(t["exchange"], int)
        if c.get("open_interest") is not None:
            assert isinstance(c["open_interest"], int) and c["open_interest"] >= 0
    # Everything that may be missing is missing somewhere, and present somewhere.
    for field in ("greeks", "last_quote", "last_trade"):
        assert 0 < sum(field in c for c in chain) < len(chain), field
    assert any(not c["day"] for c in chain) and any(c["day"] for c in chain)


def test_greeks_and_prices_are_black_scholes_at_the_iv(market: Market) -> None:
    truth = market.truth("MSFT", DAY)
    spot, r, q = truth["spot"], truth["rate"], truth["dividend_yield"]
    ncdf = lambda x: 0.5 * math.erfc(-x / math.sqrt(2))  # noqa: E731
    checked = 0
    for c in market.chain("MSFT", DAY)[::7]:
        d = c["details"]
        dte = (date.fromisoformat(d["expiration_date"]) - DAY).days
        # The IVs above 5 deep in the money are quirks of the feed, not the model's vol: skipped.
        if dte < 1 or not c.get("greeks") or "fmv" not in c or c["implied_volatility"] > 5:
            continue
        t, k, iv, call = dte / 365, d["strike_price"], c["implied_volatility"], d["contract_type"] == "call"
        d1 = (math.log(spot / k) + (r - q + iv * iv / 2) * t) / (iv * math.sqrt(t))
        d2 = d1 - iv * math.sqrt(t)
        if call:
            price, delta = spot * math.exp(-q * t) * ncdf(d1) - k * math.exp(-r * t) * ncdf(d2), \
                math.exp(-q * t) * ncdf(d1)
        else:
            price, delta = k * math.exp(-r * t) * ncdf(-d2) - spot * math.exp(-q * t) * ncdf(-d1), \
                -math.exp(-q * t) * ncdf(-d1)
        # Spot and IV are rounded in the payload: allow for that, nothing more.
        assert c["fmv"] == pytest.approx(price, abs=0.02 + 0.002 * price)
        assert c["greeks"]["delta"] == pytest.approx(delta, abs=0.003)
        assert c["break_even_price"] == pytest.approx(k + c["fmv"] if call else k - c["fmv"], abs=1e-3)
        checked += 1
    assert checked > 50


def test_some_contracts_lack_greeks_and_iv(market: Market) -> None:
    chain = market.chain("NVDA", DAY)
    spot = chain[0]["underlying_asset"]["price"]
    bare = [c for c in chain if not c.get("greeks")]
    assert bare and all("implied_volatility" not in c for c in bare)
    itm = 0
    for c in bare:
        k, call = c["details"]["strike_price"], c["details"]["contract_type"] == "call"
        in_the_money = (k < spot) if call else (k > spot)
        assert in_the_money or c.get("fmv", 0) < 0.01  # else worthless: no IV to back out
        itm += in_the_money
    assert itm > 0


def test_chain_is_deterministic_sorted_and_seeded(market: Market) -> None:
    chain = market.chain("AAPL", DAY)
    tickers = [c["details"]["ticker"] for c in chain]
    assert tickers == sorted(tickers) and len(set(tickers)) == len(tickers)
    assert Market(seed=7).chain("AAPL", DAY) == chain
    assert Market(seed=8).chain("AAPL", DAY) != chain
    assert market.chain("AAPL", date(2025, 11, 24)) != chain


def test_any_date_and_any_ordinary_symbol_work(market: Market) -> None:
    for day in (date(1950, 3, 1), date(2150, 7, 15)):
        chain = market.chain("XYZ", day)
        assert chain and min(c["details"]["expiration_date"] for c in chain) >= day.isoformat()
    assert 100 <= len(market.chain("QWERTY.B", DAY)) <= 15000
    assert market.chain("not a symbol", DAY) == [] and market.profile("aapl") is None
    with pytest.raises(ValueError):
        market.chain("AAPL", date(1800, 1, 1))


def test_expiries_follow_the_listing_calendar(market: Market) -> None:
    big, small = market.expiries("AAPL", DAY), market.expiries("F", DAY)
    assert len(big) > len(small) >= 4
    assert {date(2025, 11, 28), date(2025, 12, 5), date(2025, 12, 19), date(2026, 1, 16)} <= set(big)
    assert max(big) >= date(2027, 1, 1)  # LEAPS, about two years out
    # Small names list monthlies only (Thursday when the Friday is a holiday: Juneteenth 2026).
    assert all(15 <= d.day <= 21 and d.weekday() in (3, 4) for d in small)
    assert date(2026, 6, 18) in small
    # A Friday holiday moves the expiry to Thursday (Good Friday 2026).
    assert date(2026, 4, 2) in market.expiries("AAPL", date(2026, 3, 20))
    # The index lists dailies.
    assert {date(2025, 11, 24), date(2025, 11, 25)} <= set(market.expiries("I:SPX", DAY))


def test_strike_grid_widens_with_maturity(market: Market) -> None:
    spans: dict[str, list[float]] = defaultdict(list)
    for c in market.chain("AAPL", DAY):
        spans[c["details"]["expiration_date"]].append(c["details"]["strike_price"])
    ordered = [max(s) / min(s) for _, s in sorted(spans.items())]
    assert ordered[-1] > 2 * ordered[1]


def test_index_has_two_roots_sharing_expiry_strike_type(market: Market) -> None:
    chain = market.chain("I:SPX", DAY)
    assert 10000 <= len(chain) <= 20000
    roots: dict[tuple[str, float, str], set[str]] = defaultdict(set)
    for c in chain:
        d, u = c["details"], c["underlying_asset"]
        assert d["exercise_style"] == "european" and u["ticker"] == "I:SPX"
        assert "value" in u and "price" not in u
        roots[(d["expiration_date"], d["strike_price"], d["contract_type"])].add(d["ticker"][2:-15])
    assert {r for rs in roots.values() for r in rs} == {"SPX", "SPXW"}
    shared = [key for key, rs in roots.items() if len(rs) == 2]
    assert shared and all(date.fromisoformat(e).weekday() in (3, 4) for e, _, _ in shared)
    assert any(c["details"]["ticker"].startswith("O:SPXW261218C0") for c in chain)


def test_open_interest_concentrates_near_the_money_and_near_term(market: Market) -> None:
    chain = market.chain("AAPL", DAY)
    spot = chain[0]["underlying_asset"]["price"]
    near, far, short, long = 0, 0, 0, 0
    for c in chain:
        oi = c.get("open_interest") or 0
        k = c["details"]["strike_price"]
        near += oi if abs(math.log(k / spot)) < 0.1 else 0
        far += oi if abs(math.log(k / spot)) > 0.3 else 0
        dte = (date.fromisoformat(c["details"]["expiration_date"]) - DAY).days
        short += oi if dte <= 60 else 0
        long += oi if dte > 300 else 0
    assert near > 2 * far and short > 2 * long


def test_put_call_balance_varies_by_symbol(market: Market) -> None:
    def ratio(symbol: str) -> float:
        oi = {"call": 0, "put": 0}
        for c in market.chain(symbol, DAY):
            oi[c["details"]["contract_type"]] += c.get("open_interest") or 0
        return oi["put"] / oi["call"]

    ratios = [ratio(s) for s in ("AAPL", "KO", "F", "JPM", "I:SPX")]
    assert max(ratios) > 1.5 * min(ratios)


def _spec_smile_metrics(chain: list[dict[str, Any]], as_of: date) -> dict[str, float | None]:
    """An independent re-computation of volatility-metrics.md (per-expiry delta interpolation,
    then constant maturity by total variance)."""
    by_dte: dict[int, dict[str, dict[float, list[float]]]] = defaultdict(
        lambda: {"call": defaultdict(list), "put": defaultdict(list)})
    for c in chain:
        d, iv, g = c["details"], c.get("implied_volatility"), c.get("greeks")
        dte = (date.fromisoformat(d["expiration_date"]) - as_of).days
        if dte < 1 or iv is None or not 0 < iv <= 5 or not g:
            continue
        delta = g["delta"]
        if (0 < delta < 1) if d["contract_type"] == "call" else (-1 < delta < 0):
            by_dte[dte][d["contract_type"]][delta].append(iv)

    def at(points: dict[float, list[float]], target: float) -> float | None:
        lo, hi = [x for x in points if x <= target], [x for x in points if x >= target]
        if not lo or not hi:
            return None
        d_lo, d_hi = max(lo), min(hi)
        iv_lo, iv_hi = (sum(points[x]) / len(points[x]) for x in (d_lo, d_hi))
        return iv_lo if d_hi == d_lo else iv_lo + (iv_hi - iv_lo) * (target - d_lo) / (d_hi - d_lo)

    series: dict[str, list[tuple[int, float]]] = {"atm": [], "c25": [], "p25": []}
    for dte, side in sorted(by_dte.items()):
        atm = [v for v in (at(side["call"], 0.5), at(side["put"], -0.5)) if v is not None]
        for name, value in (("atm", sum(atm) / len(atm) if atm else None),
                            ("c25", at(side["call"], 0.25)), ("p25", at(side["put"], -0.25))):
            if value is not None:
                series[name].append((dte, value))

    def constant(points: list[tuple[int, float]], n: int) -> float | None:
        below, above = [p for p in points if p[0] < n], [p for p in points if p[0] > n]
        if any(p[0] == n for p in points):
            return next(v for d, v in points if d == n)
        if below and above:
            (d1, v1), (d2, v2) = max(below), min(above)
            w = v1 * v1 * d1 / 365 + (v2 * v2 * d2 - v1 * v1 * d1) / 365 * (n - d1) / (d2 - d1)
            return math.sqrt(w / (n / 365))
        return min(points, key=lambda p: abs(p[0] - n))[1] if points else None

    c25, p25 = constant(series["c25"], 30), constant(series["p25"], 30)
    return {"atm_iv_30d": constant(series["atm"], 30), "atm_iv_90d": constant(series["atm"], 90),
            "skew_25d_30d": None if c25 is None or p25 is None else p25 - c25}


@pytest.mark.parametrize("symbol", ["AAPL", "F", "GME", "I:SPX", "I:VIX", "XYZ"])
def test_truth_agrees_with_the_metric_definitions_on_the_chain(market: Market, symbol: str) -> None:
    for day in (DAY, date(2024, 3, 28), date(2031, 6, 2)):
        truth, chain = market.truth(symbol, day), market.chain(symbol, day)
        for name, value in _spec_smile_metrics(chain, day).items():
            assert value == pytest.approx(truth[name], abs=0.005), (symbol, day, name)
        underlying = chain[0]["underlying_asset"]
        assert truth["spot"] == underlying.get("price", underlying.get("value"))


def test_iv_level_wanders_so_iv_rank_moves(market: Market) -> None:
    days = [date.fromordinal(DAY.toordinal() - i) for i in range(500, 0, -2)]  # every other day
    atm = [market.truth("AAPL", d)["atm_iv_30d"] for d in days]
    ranks = []
    for i in range(126, len(atm)):  # a one-year IV rank
        history = atm[i - 126:i]
        ranks.append(100 * (atm[i] - min(history)) / (max(history) - min(history)))
    assert min(ranks) < 30 and max(ranks) > 70
    steps = sorted(abs(a - b) for a, b in zip(atm, atm[1:], strict=False))
    assert steps[len(steps) // 2] < 0.1 * (max(atm) - min(atm))  # it wanders, day by day
    term = [market.truth("I:SPX", d)["iv_term_structure"] for d in days[::20]]
    assert max(term) - min(term) > 0.01


def test_full_market_universe_is_about_a_million_and_a_half_contracts(market: Market) -> None:
    universe = full_market_universe()
    assert universe == full_market_universe() and len(set(universe)) == 500
    assert {"I:SPX", "I:NDX", "AAPL"} <= set(universe)
    sample = universe[::25]
    total = sum(len(market.chain(s, DAY)) for s in sample) * len(universe) / len(sample)
    assert 1_000_000 < total < 2_000_000
    assert len(full_market_universe(50)) == 50


# -- the HTTP API --------------------------------------------------------------------------------


def test_pagination_walks_the_whole_chain(simulator: SimulatorServer, market: Market) -> None:
    first = _get(simulator, "AAPL", limit=250)
    assert first.status_code == 200 and first.headers["Content-Type"] == "application/json"
    body = first.json()
    assert body["status"] == "OK" and isinstance(body["request_id"], str) and len(body["results"]) == 250
    assert body["next_url"].startswith(simulator.base_url + PATH + "AAPL?cursor=")
    assert KEY not in body["next_url"] and "apiKey" not in body["next_url"]
    assert _walk(first) == json.loads(json.dumps(market.chain("AAPL", DAY)))
    assert len(_get(simulator, "AAPL").json()["results"]) == 10  # Polygon's default limit
    # The cursor keeps the date: later pages are not re-dated by the server's today.
    urls = [r.query for r in simulator.requests if "cursor" in r.query]
    assert urls and all("date" not in q and "limit" not in q for q in urls)


def test_concurrent_clients_get_whole_chains(simulator: SimulatorServer, market: Market) -> None:
    from concurrent.futures import ThreadPoolExecutor

    symbols = ["KO", "F", "T", "PFE", "JNJ", "BRK.B"] * 2
    with ThreadPoolExecutor(8) as pool:
        chains = list(pool.map(lambda s: _walk(_get(simulator, s, limit=100)), symbols))
    for symbol, chain in zip(symbols, chains, strict=True):
        assert chain == json.loads(json.dumps(market.chain(symbol, DAY)))


def test_pages_are_byte_identical(simulator: SimulatorServer, market: Market) -> None:
    def pages() -> list[bytes]:
        first = _get(simulator, "I:SPX", limit=250)
        second = requests.get(first.json()["next_url"], params={"apiKey": KEY}, timeout=10)
        return [first.content, second.content]

    assert pages() == pages()
    with SimulatorServer(Market(seed=7), api_key=KEY) as other:
        again = _get(other, "I:SPX", limit=250).content
    assert again.replace(other.base_url.encode(), simulator.base_url.encode()) == pages()[0]


def test_last_page_has_no_next_url_and_empty_chain_is_ok(simulator: SimulatorServer) -> None:
    chain = simulator.market.chain("F", DAY)
    limit = next(n for n in range(200, 251) if len(chain) % n)  # the last page is a partial one
    body = _get(simulator, "F", limit=limit).json()
    while "next_url" in body:
        last, body = body, requests.get(body["next_url"], params={"apiKey": KEY}, timeout=5).json()
    assert len(last["results"]) == limit and 0 < len(body["results"]) < limit
    exact = next(n for n in range(250, 0, -1) if len(chain) % n == 0)  # the last page is full
    pages = len(chain) // exact
    body = _get(simulator, "F", limit=exact).json()
    for _ in range(pages - 1):
        body = requests.get(body["next_url"], params={"apiKey": KEY}, timeout=5).json()
    assert len(body["results"]) == exact and "next_url" not in body
    assert _get(simulator, "nosuch").json() == {"status": "OK", "request_id": _get(
        simulator, "nosuch").json()["request_id"], "results": []}


def test_without_date_the_server_uses_its_today(market: Market) -> None:
    with SimulatorServer(market, api_key=KEY, today=date(2026, 1, 5)) as server:
        body = requests.get(server.base_url + PATH + "KO", params={"apiKey": KEY, "limit": 250},
                            timeout=10).json()
    assert body["results"] == json.loads(json.dumps(market.chain("KO", date(2026, 1, 5))))[:250]


def test_bad_parameters_are_400(simulator: SimulatorServer) -> None:
    assert _get(simulator, "AAPL", limit=251).status_code == 400
    assert _get(simulator, "AAPL", limit="x").status_code == 400
    assert _get(simulator, "AAPL", date="2025-13-01").status_code == 400
    assert _get(simulator, "AAPL", cursor="!!!").status_code == 400
    assert requests.get(simulator.base_url + "/v2/other", timeout=5).status_code == 404


def test_auth_401_403_and_bearer(market: Market) -> None:
    with SimulatorServer(market, api_key=KEY, not_entitled={"TSLA"}) as server:
        url = server.base_url + PATH + "AAPL"
        missing = requests.get(url, timeout=5)
        assert missing.status_code == 401 and missing.json()["error"] == "API Key was not provided"
        wrong = requests.get(url, params={"apiKey": "nope"}, timeout=5)
        assert wrong.status_code == 401 and wrong.json()["status"] == "ERROR"
        assert requests.get(url, headers={"Authorization": "Bearer nope"}, timeout=5).status_code == 401
        assert requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5).status_code == 200
        denied = requests.get(server.base_url + PATH + "TSLA", params={"apiKey": KEY}, timeout=5)
        assert denied.status_code == 403
        assert denied.json()["status"] == "NOT_AUTHORIZED" and "message" in denied.json()
        assert "error" not in denied.json()
        recorded = server.requests
    assert [r.path for r in recorded] == [PATH + "AAPL"] * 4 + [PATH + "TSLA"]
    assert recorded[3].headers["Authorization"] == f"Bearer {KEY}" and recorded[1]["query"] == {"apiKey": "nope"}


# -- faults --------------------------------------------------------------------------------------


def test_fault_latency(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(latency_s=0.3))
    started = time.monotonic()
    assert _get(simulator, "AAPL").status_code == 200
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    assert _get(simulator, "MSFT").status_code == 200 and time.monotonic() - started < 0.3


def test_fault_429_with_retry_after_then_recovers(simulator: SimulatorServer) -> None:
    simulator.set_fault("*", Fault(status_429_times=2, retry_after_s=3))
    for _ in range(2):
        limited = _get(simulator, "AAPL")
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
    assert _get(simulator, "AAPL").status_code == 200
    assert _get(simulator, "MSFT").status_code == 429  # counted per symbol


def test_fault_5xx_burst(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(status_5xx_times=3, status_5xx_code=502))
    assert [_get(simulator, "AAPL").status_code for _ in range(4)] == [502, 502, 502, 200]
    with pytest.raises(ValueError):
        Fault(status_5xx_code=404)


def test_rate_limit_answers_429_over_the_plans_rate(market: Market) -> None:
    with SimulatorServer(market, api_key=KEY, rate_limit=(3, 0.5)) as server:
        assert [_get(server, "AAPL").status_code for _ in range(4)] == [200, 200, 200, 429]
        assert _get(server, "MSFT").status_code == 429  # one limit for the key, every symbol
        assert server.rate_limited == 2
        limited = _get(server, "AAPL")
        assert limited.headers["Retry-After"] == "1" and "exceeded" in limited.json()["error"]
        time.sleep(0.55)  # the window has slid past the served requests
        assert _get(server, "AAPL").status_code == 200


def test_fault_hang_past_the_client_timeout(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(hang_s=5, times=1))
    with pytest.raises(requests.Timeout):
        requests.get(simulator.base_url + PATH + "AAPL", params={"apiKey": KEY}, timeout=0.3)
    assert _get(simulator, "AAPL").status_code == 200  # times=1: the retry is answered


def test_fault_truncated_body(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(truncate_body=True))
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        _get(simulator, "AAPL", limit=250)


def test_fault_non_json_and_html_200(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(non_json=True))
    response = _get(simulator, "AAPL")
    assert response.status_code == 200
    with pytest.raises(requests.JSONDecodeError):
        response.json()
    simulator.set_fault("AAPL", Fault(html_200=True))
    response = _get(simulator, "AAPL")
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/html")
    assert response.text.startswith("<!DOCTYPE html>")


def test_fault_results_not_list(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(results_not_list=True))
    body = _get(simulator, "AAPL").json()
    assert body["status"] == "OK" and isinstance(body["results"], dict)


def test_fault_contract_repeated_across_pages(simulator: SimulatorServer, market: Market) -> None:
    simulator.set_fault("AAPL", Fault(repeat_contract_across_pages=True, on_pages={1}))
    results = _walk(_get(simulator, "AAPL", limit=250))
    tickers = [c["details"]["ticker"] for c in results]
    assert len(tickers) == len(market.chain("AAPL", DAY)) + 1
    assert tickers[249] == tickers[250] and len(set(tickers)) == len(tickers) - 1


def test_fault_next_url_loop(simulator: SimulatorServer) -> None:
    simulator.set_fault("AAPL", Fault(next_url_loop=True, on_pages={2}))
    first = _get(simulator, "AAPL", limit=250).json()
    second = requests.get(first["next_url"], params={"apiKey": KEY}, timeout=5).json()
    assert second["next_url"] == first["next_url"]  # page 2 points at itself
    third = requests.get(second["next_url"], params={"apiKey": KEY}, timeout=5).json()
    assert third == second


def test_fault_foreign_next_url(simulator: SimulatorServer, market: Market) -> None:
    with SimulatorServer(market, api_key="other-key") as foreign:
        simulator.set_fault("*", Fault(foreign_next_url=foreign.base_url))
        body = _get(simulator, "AAPL", limit=250).json()
        assert body["next_url"].startswith(foreign.base_url + PATH + "AAPL?cursor=")
        # A careful client does not follow it with the key; here we follow it bare and check
        # what the foreign origin saw.
        assert requests.get(body["next_url"], timeout=5).status_code == 401
        (seen,) = foreign.requests
    assert "apiKey" not in seen.query and "Authorization" not in seen.headers


def test_fault_on_pages_times_and_precedence(simulator: SimulatorServer) -> None:
    simulator.set_fault("*", Fault(status_5xx_times=1, on_pages={2}))
    simulator.set_fault("MSFT", Fault(html_200=True, times=2))
    first = _get(simulator, "AAPL", limit=10)
    assert first.status_code == 200  # page 1 is not targeted
    page2 = requests.get(first.json()["next_url"], params={"apiKey": KEY}, timeout=5)
    assert page2.status_code == 503
    assert requests.get(first.json()["next_url"], params={"apiKey": KEY}, timeout=5).status_code == 200
    types = [_get(simulator, "MSFT").headers["Content-Type"][:9] for _ in range(3)]
    assert types == ["text/html", "text/html", "applicati"]  # the symbol's own fault, twice
    simulator.clear_faults()
    assert _get(simulator, "MSFT").headers["Content-Type"] == "application/json"


# -- the command ---------------------------------------------------------------------------------


def test_serve_runs_in_the_foreground_until_ctrl_c(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = ("from loaders.cli import main; raise SystemExit(main(['simulator', 'serve', '--port',"
            f" '{port}', '--seed', '3', '--plan', 'starter']))")
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent, env=os.environ.copy())
    try:
        url = f"http://127.0.0.1:{port}{PATH}KO"
        for _ in range(100):
            try:
                response = requests.get(url, params={"apiKey": "sim-key"}, timeout=2)
                break
            except requests.ConnectionError:
                time.sleep(0.05)
        assert response.status_code == 200 and response.json()["results"]
        assert response.json()["results"][0]["underlying_asset"] == {"ticker": "KO"}  # --plan starter
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    assert f"base URL http://127.0.0.1:{port}" in err and "API key sim-key" in err and "SIMULATED" in err
    assert "apiKey=" not in err  # the example sends the key as a header, as clients should


def test_expiration_filters_narrow_the_chain_and_the_cursor_keeps_them(
        simulator: SimulatorServer, market: Market) -> None:
    chain = json.loads(json.dumps(market.chain("I:SPX", DAY)))
    expiries = sorted({c["details"]["expiration_date"] for c in chain})
    lo, hi = expiries[3], expiries[len(expiries) * 2 // 3]
    inside = [c for c in chain if lo <= c["details"]["expiration_date"] <= hi]
    assert 250 < len(inside) < len(chain)
    # Small pages: the filters must survive many cursors (both roots, SPX and SPXW, are in range).
    first = _get(simulator, "I:SPX", limit=100, **{"expiration_date.gte": lo, "expiration_date.lte": hi})
    assert _walk(first) == inside
    assert {c["details"]["ticker"].startswith("O:SPXW") for c in inside} == {True, False}
    later = [r.query for r in simulator.requests if "cursor" in r.query]
    assert later and all(set(q) == {"cursor"} for q in later)
    # Disjoint ranges (one side open) add up to the whole chain.
    below = _walk(_get(simulator, "I:SPX", limit=250, **{"expiration_date.lte": expiries[9]}))
    above = _walk(_get(simulator, "I:SPX", limit=250, **{"expiration_date.gte": expiries[10]}))
    assert sorted(below + above, key=lambda c: c["details"]["ticker"]) == chain
    assert _get(simulator, "I:SPX", **{"expiration_date.gte": "2025-13-01"}).status_code == 400
    empty = _get(simulator, "I:SPX", **{"expiration_date.gte": hi, "expiration_date.lte": lo}).json()
    assert empty["results"] == [] and "next_url" not in empty


# -- as awkward as the real API ------------------------------------------------------------------


def _tickers(contracts: list[dict[str, Any]]) -> list[str]:
    return [c["details"]["ticker"] for c in contracts]


@pytest.mark.parametrize(("params", "keep"), [
    ({"contract_type": "put"}, lambda d: d["contract_type"] == "put"),
    ({"strike_price.gt": "240", "strike_price.lte": "300"}, lambda d: 240 < d["strike_price"] <= 300),
    ({"strike_price.gte": "240", "strike_price.lt": "250"}, lambda d: 240 <= d["strike_price"] < 250),
    ({"strike_price": "250"}, lambda d: d["strike_price"] == 250),
    ({"expiration_date.gt": "2025-12-19", "expiration_date.lt": "2026-06-18", "contract_type": "call"},
     lambda d: "2025-12-19" < d["expiration_date"] < "2026-06-18" and d["contract_type"] == "call"),
    ({"expiration_date": "2026-01-16"}, lambda d: d["expiration_date"] == "2026-01-16"),
])
def test_filters_narrow_the_chain_and_the_cursor_keeps_them(
        simulator: SimulatorServer, market: Market, params: dict[str, str], keep: Any) -> None:
    chain = json.loads(json.dumps(market.chain("AAPL", DAY)))
    expected = [c for c in chain if keep(c["details"])]
    assert 20 < len(expected) < len(chain)  # the filter bites, and pages are needed at limit=7
    simulator.clear_requests()
    assert _walk(_get(simulator, "AAPL", limit=7, **params), max_pages=1000) == expected
    later = [r.query for r in simulator.requests if "cursor" in r.query]
    assert len(later) == -(-len(expected) // 7) - 1 and all(set(q) == {"cursor"} for q in later)


@pytest.mark.parametrize("sort", ["ticker", "expiration_date", "strike_price"])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_sort_and_order_survive_the_cursor(simulator: SimulatorServer, market: Market, sort: str,
                                          order: str) -> None:
    chain = json.loads(json.dumps(market.chain("KO", DAY)))
    got = _walk(_get(simulator, "KO", limit=100, sort=sort, order=order))
    keys = [(c["details"][sort], c["details"]["ticker"]) for c in got]
    assert keys == sorted(keys, reverse=order == "desc")
    assert sorted(_tickers(got)) == _tickers(chain)  # a permutation of the whole chain


def test_filtered_pages_are_byte_identical_and_bad_filters_are_400(simulator: SimulatorServer) -> None:
    params = {"contract_type": "call", "strike_price.gte": "200", "sort": "strike_price", "order": "desc"}

    def pages() -> list[bytes]:
        first = _get(simulator, "AAPL", limit=50, **params)
        second = requests.get(first.json()["next_url"], headers={"Authorization": f"Bearer {KEY}"},
                              timeout=10)
        return [first.content, second.content]

    assert pages() == pages()
    for bad in ({"contract_type": "other"}, {"sort": "volume"}, {"order": "up"},
                {"strike_price.gt": "abc"}, {"strike_price": "nan"}, {"expiration_date.lt": "soon"}):
        response = _get(simulator, "AAPL", **bad)
        assert response.status_code == 400 and response.json()["status"] == "ERROR", bad


def test_starter_plan_has_no_quotes_trades_fmv_break_even_or_spot(market: Market) -> None:
    full = market.chain("SPY", DAY)
    with SimulatorServer(market, api_key=KEY, plan="starter") as server:
        starter = _walk(_get(server, "SPY", limit=250))
    assert _tickers(starter) == _tickers(full)
    for lean, rich in zip(starter, full, strict=True):
        assert not {"last_quote", "last_trade", "fmv", "break_even_price"} & set(lean)
        assert lean["underlying_asset"] == {"ticker": "SPY"}
        for key in ("day", "details", "greeks", "implied_volatility", "open_interest"):
            assert lean.get(key) == rich.get(key), key
    assert any("last_quote" in c for c in full) and all("price" in c["underlying_asset"] for c in full)
    with pytest.raises(ValueError):
        SimulatorServer(market, plan="business")


def test_untraded_contracts_mostly_show_the_previous_sessions_bar(market: Market) -> None:
    monday = date(2025, 11, 24)
    close_ns = int(datetime(2025, 11, 24, 21, 0, tzinfo=UTC).timestamp()) * 10**9
    friday_close_ns = int(datetime(2025, 11, 21, 21, 0, tzinfo=UTC).timestamp()) * 10**9
    truth = {c["details"]["ticker"]: c for c in market.chain("AAPL", monday)}
    stale = [c for c in truth.values() if c["day"] and c["day"]["last_updated"] != close_ns]
    empty = [c for c in truth.values() if not c["day"]]
    assert stale and empty
    untraded = len(stale) + len(empty)
    assert 0.7 < len(stale) / untraded < 0.95  # most, not all
    for c in stale:
        bar = c["day"]
        assert bar["last_updated"] == friday_close_ns  # the previous session, over the weekend
        assert bar["volume"] > 0 and set(bar) == DAY_FIELDS
        assert bar["low"] <= bar["close"] <= bar["high"] and bar["low"] <= bar["open"] <= bar["high"]
        assert bar["change"] == pytest.approx(bar["close"] - bar["previous_close"], abs=0.011)
        assert c.get("open_interest") != 0  # a contract that never traded has no bar at all
    # Today's bars close at today's close, and the stale bar closes at today's previous_close.
    traded = [c for c in truth.values() if c["day"] and c["day"]["last_updated"] == close_ns]
    assert traded and all(c["day"]["volume"] > 0 for c in traded)
    assert any(c.get("open_interest") == 0 for c in empty)  # never traded: still {}


def test_greeks_empty_and_iv_above_5_deep_in_the_money(market: Market) -> None:
    chain = [c for s in ("AAPL", "I:SPX", "KO") for c in market.chain(s, DAY)]
    empty = [c for c in chain if c.get("greeks") == {}]
    high = [c for c in chain if (c.get("implied_volatility") or 0) > 5]
    assert empty and all("implied_volatility" not in c for c in empty)
    assert 0 < len(high) < 0.02 * len(chain)  # now and then
    assert all(abs(c["greeks"]["delta"]) > 0.97 for c in high)
    assert len(empty) < 0.1 * len(chain)


def test_403_answers_like_the_real_api(market: Market) -> None:
    with SimulatorServer(market, api_key=KEY, not_entitled={"I:SPX"}) as server:
        denied = requests.get(server.base_url + PATH + "I:SPX", headers={"Authorization": f"Bearer {KEY}"},
                              timeout=5)
        allowed = requests.get(server.base_url + PATH + "KO", headers={"Authorization": f"Bearer {KEY}"},
                               timeout=5)
    body = denied.json()
    assert denied.status_code == 403 and list(body) == ["status", "request_id", "message"]
    assert body["status"] == "NOT_AUTHORIZED" and isinstance(body["request_id"], str)
    assert body["message"].startswith("You are not entitled to this data.")
    assert allowed.status_code == 200  # one underlying refused, not the key


def test_next_url_follows_the_host_called_and_index_symbols_travel_raw(simulator: SimulatorServer) -> None:
    port = simulator.base_url.rsplit(":", 1)[1]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}"):
        body = requests.get(f"http://{host}{PATH}I:SPX", params={"limit": 250},
                            headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
        assert body["next_url"].startswith(f"http://{host}{PATH}I:SPX?cursor=")
    simulator.clear_requests()
    raw = requests.get(simulator.base_url + PATH + "I:SPX", params={"limit": 5, "date": DAY.isoformat()},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    encoded = requests.get(simulator.base_url + PATH + "I%3ASPX",
                           params={"limit": 5, "date": DAY.isoformat()},
                           headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert raw.status_code == encoded.status_code == 200
    assert raw.json()["results"] == encoded.json()["results"] != []
    assert [r.path for r in simulator.requests] == [PATH + "I:SPX", PATH + "I%3ASPX"]
