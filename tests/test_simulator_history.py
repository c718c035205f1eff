"""The simulator's history endpoints over real HTTP: shapes, paging, and agreement with the
snapshots the same simulator serves (fixed dates, independent of the frozen today)."""

from __future__ import annotations

import base64
import json
import math
import time
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from typing import Any

import pytest
import requests

from loaders.simulator import Fault, Market, SimulatorServer
from loaders.simulator.model import RATE
from loaders.trading_calendar import NEW_YORK, trading_days

KEY = "test-key"
TODAY = date(2025, 6, 30)  # the server's today: every fixed date below is in its past
START, END = date(2025, 6, 2), date(2025, 6, 13)
DAYS = trading_days(START, END)


@pytest.fixture
def server(market: Market) -> Iterator[SimulatorServer]:
    with SimulatorServer(market, api_key=KEY, today=TODAY) as sim:
        yield sim


def get(sim: SimulatorServer, path: str, **params: Any) -> requests.Response:
    return requests.get(sim.base_url + path, params=params, timeout=300,
                        headers={"Authorization": f"Bearer {KEY}"})


def pages(sim: SimulatorServer, path: str, **params: Any) -> Iterator[dict[str, Any]]:
    """Every page of a listing, following next_url (which carries the cursor only)."""
    response = get(sim, path, **params)
    while True:
        assert response.status_code == 200, response.text
        page = response.json()
        yield page
        if "next_url" not in page:
            return
        assert page["next_url"].startswith(sim.base_url + path + "?cursor=")
        assert KEY not in page["next_url"] and "limit" not in page["next_url"]
        response = requests.get(page["next_url"], headers={"Authorization": f"Bearer {KEY}"}, timeout=30)


def rows(sim: SimulatorServer, path: str, **params: Any) -> list[dict[str, Any]]:
    return [row for page in pages(sim, path, **params) for row in page["results"]]


def midnight_ms(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=NEW_YORK).timestamp()) * 1000


def close_ns(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, 16, tzinfo=NEW_YORK).timestamp()) * 10**9


def traded(contract: dict[str, Any], day: date) -> bool:
    """Traded in day's session: its day bar is that session's (not a carried-over one)."""
    bar = contract.get("day") or {}
    return bar.get("last_updated") == close_ns(day) and bar.get("volume", 0) > 0


def test_contracts_are_the_snapshot_chain_with_paging(server: SimulatorServer, market: Market) -> None:
    day = DAYS[0]
    listed = rows(server, "/v3/reference/options/contracts", underlying_ticker="AAPL",
                  as_of=day.isoformat(), **{"expiration_date.gte": day.isoformat()}, limit=1000)
    chain = {c["details"]["ticker"]: c["details"] for c in market.chain("AAPL", day)}
    assert len(listed) > 1000  # more than one page
    assert [r["ticker"] for r in listed] == sorted(chain)
    for row in listed:
        details = chain[row["ticker"]]
        assert {k: row[k] for k in details} == details
        assert row["underlying_ticker"] == "AAPL" and row["primary_exchange"]
        assert row["cfi"] == ("OCASPS" if row["contract_type"] == "call" else "OPASPS")
    again = get(server, "/v3/reference/options/contracts", underlying_ticker="AAPL", as_of=day.isoformat(),
                **{"expiration_date.gte": day.isoformat()}, limit=1000)
    first = get(server, "/v3/reference/options/contracts", underlying_ticker="AAPL", as_of=day.isoformat(),
                **{"expiration_date.gte": day.isoformat()}, limit=1000)
    assert again.content == first.content  # byte-identical for the same request


def test_contract_filters(server: SimulatorServer, market: Market) -> None:
    day, lo, hi = DAYS[1], DAYS[1] + timedelta(days=7), DAYS[1] + timedelta(days=40)
    listed = rows(server, "/v3/reference/options/contracts", underlying_ticker="MSFT", as_of=day.isoformat(),
                  contract_type="put", limit=250,
                  **{"expiration_date.gt": lo.isoformat(), "expiration_date.lt": hi.isoformat()})
    expected = [c["details"]["ticker"] for c in market.chain("MSFT", day)
                if c["details"]["contract_type"] == "put"
                and lo.isoformat() < c["details"]["expiration_date"] < hi.isoformat()]
    assert expected and [r["ticker"] for r in listed] == expected


def test_index_contracts_are_asked_by_the_bare_root(server: SimulatorServer, market: Market) -> None:
    day, expiry = DAYS[0], "2025-06-20"  # a third Friday: listed under both roots
    params = {"as_of": day.isoformat(), "expiration_date": expiry, "limit": 1000}
    listed = rows(server, "/v3/reference/options/contracts", underlying_ticker="VIX", **params)
    expected = sorted(c["details"]["ticker"] for c in market.chain("I:VIX", day)
                      if c["details"]["expiration_date"] == expiry)
    assert [r["ticker"] for r in listed] == expected
    assert {r["ticker"][:6] for r in listed} == {"O:VIX2", "O:VIXW"}  # both roots
    assert {(r["underlying_ticker"], r["exercise_style"]) for r in listed} == {("VIX", "european")}
    assert {r["cfi"] for r in listed} == {"OCEICS", "OPEICS"}
    for name in ("I:VIX", "VIXW"):
        assert rows(server, "/v3/reference/options/contracts", underlying_ticker=name, **params) == []


def test_non_standard_deliverables_only_in_the_reference(server: SimulatorServer, market: Market) -> None:
    day = DAYS[0]
    listed = rows(server, "/v3/reference/options/contracts", underlying_ticker="TSLA", as_of=day.isoformat(),
                  limit=1000)
    odd = [r for r in listed if r["shares_per_contract"] != 100 or r.get("additional_underlyings")]
    snapshot = {c["details"]["ticker"] for c in market.chain("TSLA", day)}
    assert {r["shares_per_contract"] for r in odd} == {100, 150}
    assert any(r.get("additional_underlyings") for r in odd)
    assert all(r["cfi"].endswith("N") and r["ticker"] not in snapshot for r in odd)
    assert {r["ticker"] for r in listed} - {r["ticker"] for r in odd} == snapshot


def test_option_bars_are_the_snapshot_day_bars(server: SimulatorServer, market: Market) -> None:
    chains = {day: {c["details"]["ticker"]: c for c in market.chain("AAPL", day)} for day in DAYS}
    tickers = sorted(chains[DAYS[0]])
    # Some contracts that skip a session while listed (no bar that day), and some others.
    gaps = [t for t in tickers if any(t in chains[d] and not traded(chains[d][t], d) for d in DAYS)]
    assert gaps
    for ticker in gaps[:15] + tickers[::200]:
        response = get(server, f"/v2/aggs/ticker/{ticker}/range/1/day/{START}/{END}",
                       adjusted="false", limit=50000)
        body = response.json()
        expected = [(d, chains[d][ticker]["day"]) for d in DAYS
                    if ticker in chains[d] and traded(chains[d][ticker], d)]
        assert body["ticker"] == ticker and body["adjusted"] is False and body["status"] == "OK"
        assert body["resultsCount"] == body.get("count", 0) == len(expected)
        got = body.get("results", [])
        assert [bar["t"] for bar in got] == [midnight_ms(d) for d, _ in expected]
        for bar, (_, day_bar) in zip(got, expected, strict=True):
            assert (bar["o"], bar["h"], bar["l"], bar["c"], bar["v"], bar["vw"]) == (
                day_bar["open"], day_bar["high"], day_bar["low"], day_bar["close"], day_bar["volume"],
                day_bar["vwap"])
            assert bar["n"] >= 1
    weekend = get(server, f"/v2/aggs/ticker/{tickers[0]}/range/1/day/2025-06-07/2025-06-08").json()
    assert weekend["resultsCount"] == 0 and "results" not in weekend


def test_underlying_bars_close_at_the_snapshot_spot(server: SimulatorServer, market: Market) -> None:
    for symbol, field in (("AAPL", "price"), ("I:VIX", "value")):
        body = get(server, f"/v2/aggs/ticker/{symbol}/range/1/day/{START}/{END}", adjusted="false").json()
        assert [bar["t"] for bar in body["results"]] == [midnight_ms(d) for d in DAYS]
        for bar, day in zip(body["results"], DAYS, strict=True):
            assert bar["c"] == market.chain(symbol, day)[0]["underlying_asset"][field]
            assert bar["l"] <= min(bar["o"], bar["c"]) <= max(bar["o"], bar["c"]) <= bar["h"]
            assert ("v" in bar) == (symbol == "AAPL")  # indices carry no volume


def test_treasury_curve_recovers_the_rate(server: SimulatorServer) -> None:
    listed = rows(server, "/fed/v1/treasury-yields", limit=3,
                  **{"date.gte": START.isoformat(), "date.lte": END.isoformat()})
    assert [r["date"] for r in listed] == [d.isoformat() for d in DAYS]
    tenors = [k for k in listed[0] if k != "date"]
    assert tenors[0] == "yield_1_month" and tenors[-1] == "yield_30_year" and len(tenors) == 11
    for row in listed:
        assert all(math.isclose(math.log1p(row[t] / 100), RATE, abs_tol=1e-15) for t in tenors)


def test_dividends_follow_the_dividend_yield(server: SimulatorServer, market: Market) -> None:
    payer = next(s for s in ("KO", "JPM", "PFE", "T", "JNJ", "XOM") if market.profile(s).div_yield > 0)
    listed = rows(server, "/v3/reference/dividends", ticker=payer, limit=7,
                  **{"ex_dividend_date.gte": "2024-01-01"})
    q = market.profile(payer).div_yield
    assert len(listed) >= 6 and listed == sorted(listed, key=lambda r: r["ex_dividend_date"], reverse=True)
    for row in listed:
        declared, ex = date.fromisoformat(row["declaration_date"]), date.fromisoformat(row["ex_dividend_date"])
        assert declared <= TODAY and 25 <= (ex - declared).days <= 35 and row["pay_date"] > row["ex_dividend_date"]
        assert row["cash_amount"] == pytest.approx(market.spot(payer, declared) * q / 4, abs=0.006)
        assert row["frequency"] == 4 and row["ticker"] == payer
    for symbol in ("SPX", next(s for s in ("XOM", "AAPL", "MSFT") if market.profile(s).div_yield == 0)):
        assert rows(server, "/v3/reference/dividends", ticker=symbol) == []


def test_open_interest_is_the_next_snapshot(server: SimulatorServer, market: Market) -> None:
    sessions = DAYS[:3]
    listed = rows(server, "/options/v1/open-interest", root="AAPL", limit=700,
                  **{"date.gte": sessions[0].isoformat(), "date.lte": sessions[-1].isoformat()})
    expected = []
    for session, following in zip(sessions, DAYS[1:4], strict=True):
        on_session = {c["details"]["ticker"] for c in market.chain("AAPL", session)}
        expected += [(session.isoformat(), c["details"]["ticker"], c["open_interest"])
                     for c in market.chain("AAPL", following)
                     if c["details"]["ticker"] in on_session and c.get("open_interest") is not None]
    assert [(r["date"], r["ticker"], r["open_interest"]) for r in listed] == expected
    assert {(r["root"], r["underlying_ticker"]) for r in listed} == {("AAPL", "AAPL")}
    one = rows(server, "/options/v1/open-interest", ticker=listed[0]["ticker"], date=sessions[0].isoformat())
    assert one == [listed[0]]
    weekly = rows(server, "/options/v1/open-interest", root="VIXW", date=sessions[0].isoformat(), limit=50000)
    assert weekly and {(r["root"], r["underlying_ticker"]) for r in weekly} == {("VIXW", "VIX")}


def test_refused_families_and_unknown_paths(market: Market) -> None:
    with SimulatorServer(market, api_key=KEY, today=TODAY, refuse=("open_interest",)) as sim:
        refused = get(sim, "/options/v1/open-interest", root="AAPL")
        assert refused.status_code == 403 and refused.json()["status"] == "NOT_AUTHORIZED"
        assert "not entitled" in refused.json()["message"]
        assert get(sim, "/fed/v1/treasury-yields", date=START.isoformat()).status_code == 200
        assert get(sim, "/v2/reference/options/contracts").status_code == 404
    with SimulatorServer(market, api_key=KEY, today=TODAY, not_entitled={"AAPL"}) as sim:
        assert get(sim, f"/v2/aggs/ticker/AAPL/range/1/day/{START}/{END}").status_code == 403
    with pytest.raises(ValueError, match="unknown endpoint families"):
        SimulatorServer(market, refuse=("quotes",))


def test_auth_bad_input_and_the_request_log(server: SimulatorServer) -> None:
    url = f"{server.base_url}/fed/v1/treasury-yields"
    assert requests.get(url, timeout=10).json()["error"] == "API Key was not provided"
    assert requests.get(url, params={"apiKey": "nope"}, timeout=10).status_code == 401
    page = requests.get(url, params={"apiKey": KEY, "limit": 2, "date.gte": START.isoformat()}, timeout=10)
    assert page.status_code == 200 and KEY not in page.json()["next_url"]
    assert json.loads(base64.urlsafe_b64decode(page.json()["next_url"].split("cursor=")[1] + "=="))
    for params in ({"limit": 0}, {"limit": 50001}, {"date.gte": "June"}, {"cursor": "%%%"}):
        bad = get(server, "/fed/v1/treasury-yields", **params)
        assert bad.status_code == 400 and bad.json()["status"] == "ERROR", params
    assert get(server, "/v2/aggs/ticker/AAPL/range/1/week/2025-06-02/2025-06-13").status_code == 400
    assert {r.path for r in server.requests} == {
        "/fed/v1/treasury-yields", "/v2/aggs/ticker/AAPL/range/1/week/2025-06-02/2025-06-13"}


def test_symbol_faults_reach_its_history(server: SimulatorServer) -> None:
    server.set_fault("AAPL", Fault(status_429_times=1, status_5xx_times=1, retry_after_s=2))
    path = f"/v2/aggs/ticker/AAPL/range/1/day/{START}/{END}"
    first, second, third = (get(server, path) for _ in range(3))
    assert (first.status_code, first.headers["Retry-After"]) == (429, "2")
    assert (second.status_code, third.status_code) == (503, 200)
    assert get(server, "/fed/v1/treasury-yields", date=START.isoformat()).status_code == 200


@pytest.mark.slow  # 252 chains: about 8 s on an idle core, a minute on a loaded machine
def test_a_year_of_one_contract(server: SimulatorServer, market: Market,
                                record_property: Any) -> None:
    """A contract's year builds the range's index once (252 chains), then every contract's year is
    a lookup. The times are recorded (junit properties), not asserted."""
    lo, hi = date(2024, 7, 1), date(2025, 6, 30)
    ticker = next(c["details"]["ticker"] for c in market.chain("AAPL", lo)
                  if c["details"]["expiration_date"] >= "2025-06-01" and traded(c, lo))
    started = time.perf_counter()
    body = get(server, f"/v2/aggs/ticker/{ticker}/range/1/day/{lo}/{hi}", adjusted="false", limit=50000).json()
    first = time.perf_counter() - started
    started = time.perf_counter()
    again = get(server, f"/v2/aggs/ticker/{ticker}/range/1/day/{lo}/{hi}", adjusted="false", limit=50000)
    record_property("year_first_request_s", round(first, 2))
    record_property("year_next_request_s", round(time.perf_counter() - started, 4))
    assert 0 < body["resultsCount"] <= len(trading_days(lo, hi)) and again.json() == body
    assert body["results"][0]["t"] == midnight_ms(lo)
