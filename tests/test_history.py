"""Past days with `--provider polygon`: reconstructed from the historical endpoints of the simulator
over HTTP (POLYGON_BASE_URL), into real PostgreSQL, then through `kapman metrics` (issue #14)."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from datetime import date

import pytest
import requests

from loaders import cli
from loaders.simulator import Market, SimulatorServer
from loaders.trading_calendar import snapshot_time, trading_days
from tests.conftest import fresh_database, query
from tests.metrics_support import dbt_artifacts_in_tmp, documents, run_metrics  # noqa: F401 (fixtures)
from tests.test_ingest import _workdir, count, run, watch  # noqa: F401 (fixtures)

KEY = "pk-history-5be1f0a9d2"
START, END = date(2025, 12, 15), date(2025, 12, 22)
DAYS = trading_days(START, END)
AFTER = date(2025, 12, 23)  # "today" after the range: every day of it is past
RANGE = ("--start-date", START.isoformat(), "--end-date", END.isoformat())
SYMBOLS = ("KO", "T")  # small chains; T lists non-standard deliverables too


def serve(market: Market, monkeypatch: pytest.MonkeyPatch, today: date, **kwargs: object) -> SimulatorServer:
    """The simulator as the live API on `today` (also the run's today), the polygon provider pointed at it."""
    monkeypatch.setenv("KAPMAN_TODAY", today.isoformat())
    server = SimulatorServer(market, api_key=KEY, today=today, **kwargs).start()
    monkeypatch.setenv("POLYGON_API_KEY", KEY)
    monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
    return server


@pytest.fixture
def history(market: Market, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorServer]:
    server = serve(market, monkeypatch, AFTER)
    yield server
    server.stop()


def listed(server: SimulatorServer, symbol: str, day: date) -> list[dict]:
    """The simulator's reference contracts of `day`, asked over HTTP as a user would."""
    found, url = [], f"{server.base_url}/v3/reference/options/contracts"
    params: dict | None = {"underlying_ticker": symbol.removeprefix("I:"), "as_of": day.isoformat(),
                           "expiration_date.gte": day.isoformat(), "limit": 1000}
    while url:
        body = requests.get(url, params=params, headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
        found += body["results"]
        url, params = body.get("next_url"), None
    return found


def standard(contracts: list[dict]) -> list[dict]:
    return [c for c in contracts if c["shares_per_contract"] == 100 and not c.get("additional_underlyings")]


def stored(database, symbol: str, day: date) -> dict[str, int]:
    """Rows of (symbol, day) by source."""
    return dict(query(database, "select c.source, count(*) from options_chains c join tickers k on k.id = c.ticker_id"
                                " where k.symbol = %s and c.time = %s group by 1", (symbol, snapshot_time(day))))


def test_a_range_is_reconstructed_once_per_day_and_a_rerun_fetches_nothing(database, db_url, history) -> None:
    watch(database, *(("a", s) for s in SYMBOLS))
    code, summary = run(db_url, *RANGE)
    assert code == 0 and [d["outcome"] for d in summary["days"]] == ["succeeded"] * len(DAYS)
    history_requests = [r for r in history.requests if r.path.startswith(("/v2/", "/v3/ref", "/fed/", "/options/"))]
    entries = {(s["day"], s["symbol"]): s for s in summary["symbols"]}
    reference = {(symbol, day): listed(history, symbol, day) for symbol in SYMBOLS for day in DAYS}
    assert any(len(standard(c)) < len(c) for c in reference.values())  # some are rejected
    for (symbol, day), contracts in reference.items():
        entry = entries[(day.isoformat(), symbol)]
        kept = len(standard(contracts))
        assert stored(database, symbol, day) == {"reconstructed": kept} and entry["contracts"] == kept
        assert entry["rejected"] == len(contracts) - kept  # non-standard deliverables, counted
        assert 0 < entry["with_iv"] < kept and sum(entry["not_inverted"].values()) == kept - entry["with_iv"]
    # each contract's bars once for the whole range; the underlying, dividends, OI per root and the curve once
    aggs = Counter(r.path.split("/")[4] for r in history_requests if r.path.startswith("/v2/aggs/"))
    contracts = {c["ticker"] for cs in reference.values() for c in standard(cs)}
    assert set(aggs) == contracts | set(SYMBOLS) and set(aggs.values()) == {1}
    assert all(r.path.endswith(f"/{START}/{END}") for r in history_requests if r.path.startswith("/v2/aggs/"))
    paths = Counter(r.path for r in history_requests)
    assert paths["/fed/v1/treasury-yields"] == 1 and paths["/v3/reference/dividends"] == len(SYMBOLS)
    assert paths["/options/v1/open-interest"] == len({t[2:-15] for t in contracts})
    assert paths["/v3/reference/options/contracts"] == len(SYMBOLS) * len(DAYS)  # one page each here
    # the key: in the header only, to the configured origin
    assert all(r.headers.get("Authorization") == f"Bearer {KEY}" and "apiKey" not in r.query for r in history_requests)
    assert count(database, "select count(*) from options_chains where open_interest is not null") > 0
    assert count(database, "select count(*) from ingestion_ledger where status = 'completed'") == 2 * len(DAYS)

    rows = count(database, "select count(*) from options_chains")
    history.clear_requests()
    code, again = run(db_url, *RANGE)
    assert code == 0 and again["days_skipped"] == len(DAYS) and history.requests == []
    assert count(database, "select count(*) from options_chains") == rows
