"""The official Polygon/Massive Python client (`massive`, test-only) against the simulator over
loopback: it pages through the chains and gets exactly the contracts `kapman ingest` stores."""

from __future__ import annotations

from pathlib import Path

import pytest
from massive import RESTClient

from loaders import db as dbmod
from loaders.simulator import Market, SimulatorServer
from tests.conftest import FROZEN_TODAY, query
from tests.test_ingest import run, watch

KEY = "test-key"
SYMBOLS = ("KO", "I:VIX")  # a small equity chain and an index (both several pages at 250)
PATH = "/v3/snapshot/options/"


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dlt's pipelines dir and the run summary under tmp_path; no key or URL from the outside."""
    monkeypatch.chdir(tmp_path)
    for name in ("POLYGON_API_KEY", "POLYGON_BASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


def _stored(database: dbmod.Database, symbol: str) -> list[str]:
    rows = query(database, "select c.contract_ticker from options_chains c join tickers k"
                           " on k.id = c.ticker_id where k.symbol = %s order by 1", (symbol,))
    return [ticker for (ticker,) in rows]


def test_the_official_client_pages_through_the_chains_the_loader_stores(
        database: dbmod.Database, db_url: str, market: Market, monkeypatch: pytest.MonkeyPatch) -> None:
    with SimulatorServer(market, api_key=KEY, today=FROZEN_TODAY) as server:
        client = RESTClient(api_key=KEY, base=server.base_url, retries=0)
        official = {symbol: sorted(c.details.ticker for c in client.list_snapshot_options_chain(
            symbol, params={"limit": 250})) for symbol in SYMBOLS}
        sent = server.requests
        monkeypatch.setenv("POLYGON_API_KEY", KEY)
        monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
        watch(database, *(("official", symbol) for symbol in SYMBOLS))
        code, summary = run(db_url, "--provider", "polygon")
    assert code == 0, summary
    for symbol in SYMBOLS:
        chain = market.chain(symbol, FROZEN_TODAY)
        assert len(chain) > 250  # more than one page
        assert official[symbol] == _stored(database, symbol) == sorted(
            c["details"]["ticker"] for c in chain)
    # What the client sent: the key as a Bearer header on every page and never in a URL, the index
    # symbol raw in the path, and on later pages nothing but the cursor.
    assert len(sent) == sum(-(-len(market.chain(s, FROZEN_TODAY)) // 250) for s in SYMBOLS)
    assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in sent)
    assert all("apiKey" not in r.query and KEY not in r.path for r in sent)
    assert {r.path for r in sent} == {PATH + "KO", PATH + "I:VIX"}
    later = [r.query for r in sent if "cursor" in r.query]
    assert len(later) == len(sent) - len(SYMBOLS) and all(set(q) == {"cursor"} for q in later)
