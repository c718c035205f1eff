"""Published real responses (tests/fixtures/polygon/, sources in its README) served verbatim over
loopback HTTP to `kapman ingest --provider polygon`: every contract is stored with the response's
values, and what no recording shows yet (IV 10.17, contract_type "other", starter-plan shapes,
timestamps that are not nanoseconds) goes through the parser directly."""

from __future__ import annotations

import contextlib
import copy
import json
import threading
from collections.abc import Iterator
from datetime import UTC, date, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from loaders import db as dbmod
from loaders.polygon.rows import normalise_page
from tests.conftest import query
from tests.test_ingest import run, watch

FIXTURES = Path(__file__).parent / "fixtures" / "polygon"
KEY = "recorded-key"
CHAIN = "/v3/snapshot/options/AAPL"
GO_CURSOR = "YXA9MSZhcz0mbGltaXQ9MSZzb3J0PXRpY2tlcg"  # in the client-go page's next_url
COLUMNS = ("contract_ticker", "expiration_date", "strike_price", "option_type", "implied_volatility",
           "delta", "open_interest", "volume", "bid", "ask", "last", "underlying_price",
           "day_updated_at", "quote_updated_at")
SELECT = ("select contract_ticker, expiration_date, strike_price, option_type, implied_volatility,"
          " delta, open_interest, volume, bid, ask, last, underlying_price, day_updated_at,"
          " quote_updated_at from options_chains order by contract_ticker")


class _Recorded(ThreadingHTTPServer):
    """Answers (path, cursor) with a fixture file's bytes, as they were published."""

    daemon_threads = True

    def __init__(self, pages: dict[tuple[str, str | None], str]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.pages = {k: (FIXTURES / name).read_bytes() for k, name in pages.items()}
        self.seen: list[tuple[str, str | None]] = []

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Recorded

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        split = urlsplit(self.path)
        params = dict(parse_qsl(split.query))
        key = params.get("apiKey") or self.headers.get("Authorization", "").removeprefix("Bearer ")
        where = (unquote(split.path), params.get("cursor"))
        self.server.seen.append(where)
        body = self.server.pages.get(where) if key == KEY else None
        status = 200 if body is not None else 401 if key != KEY else 404
        body = body or json.dumps({"status": "ERROR", "error": f"HTTP {status}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base)
        pass


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SOURCES__POLYGON__BACKOFF_FACTOR", "0.01")
    monkeypatch.setenv("SOURCES__POLYGON__MAX_RETRY_DELAY", "0.05")
    monkeypatch.delenv("DATABASE_URL", raising=False)


@contextlib.contextmanager
def _serve(pages: dict[tuple[str, str | None], str], monkeypatch: pytest.MonkeyPatch) -> Iterator[_Recorded]:
    server = _Recorded(pages)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("POLYGON_API_KEY", KEY)
    monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def _ingest(database: dbmod.Database, db_url: str) -> tuple[int, dict, list[dict[str, Any]]]:
    watch(database, ("recorded", "AAPL"))
    code, summary = run(db_url, "--provider", "polygon")
    rows = query(database, SELECT)
    return code, summary, [dict(zip(COLUMNS, row, strict=True)) for row in rows]


def _ns(value: int) -> datetime:
    return datetime.fromtimestamp(value // 1000 / 1e6, tz=UTC)


def test_client_python_mock_loads_with_its_values(database, db_url, monkeypatch) -> None:
    name = "client-python-options-chain-AAPL.json"
    raw = json.loads((FIXTURES / name).read_text())["results"][0]
    with _serve({(CHAIN, None): name}, monkeypatch) as server:
        code, summary, rows = _ingest(database, db_url)
        assert server.seen == [(CHAIN, None)]
    assert code == 0 and summary["rejected"] == 0
    (row,) = rows
    assert row["contract_ticker"] == "O:AAPL230616C00150000" and row["option_type"] == "C"
    assert row["expiration_date"] == date(2023, 6, 16) and float(row["strike_price"]) == 150
    assert (row["implied_volatility"], row["delta"]) == (raw["implied_volatility"], raw["greeks"]["delta"])
    assert (row["open_interest"], row["volume"]) == (8133, 8)
    assert [float(row[k]) for k in ("bid", "ask", "last", "underlying_price")] == [28.9, 29.25, 29.25, 159.9606]
    assert row["day_updated_at"] == _ns(1651204800000000000) == datetime(2022, 4, 29, 4, tzinfo=UTC)
    assert row["quote_updated_at"] == _ns(1651254260800059648)


def test_client_go_chain_with_empty_greeks_and_millisecond_bar_loads(database, db_url, monkeypatch) -> None:
    pages = {(CHAIN, None): "client-go-options-chain-AAPL-page1.json",
             (CHAIN, GO_CURSOR): "client-go-options-chain-AAPL-page2.json"}
    with _serve(pages, monkeypatch) as server:
        code, summary, rows = _ingest(database, db_url)
        # next_url names api.polygon.io: its path and cursor were followed here, and the `{}` page
        # ended the chain.
        assert server.seen == [(CHAIN, None), (CHAIN, GO_CURSOR)]
    assert code == 0 and summary["rejected"] == 0
    (row,) = rows  # the same contract three times on one page: stored once
    assert row["contract_ticker"] == "O:AAPL230106C00050000" and float(row["strike_price"]) == 50
    assert row["implied_volatility"] is None and row["delta"] is None  # greeks: {}
    assert (row["open_interest"], row["volume"]) == (5, 22)
    assert [float(row[k]) for k in ("bid", "ask", "underlying_price")] == [74.85, 75.05, 124.94]
    assert row["last"] is None  # no last_trade in this response
    assert row["day_updated_at"] is None  # 1672434000000 is milliseconds: not a nanosecond time
    assert row["quote_updated_at"] == _ns(1672775256862312000)


def _base() -> dict[str, Any]:
    return json.loads((FIXTURES / "client-python-options-chain-AAPL.json").read_text())["results"][0]


@pytest.mark.parametrize("stamp", [1672434000000, 1672434000000.0, "1672434000000000000", 2**80, -1, True])
def test_a_timestamp_that_is_not_nanoseconds_is_null_and_the_contract_kept(stamp: Any) -> None:
    contract = _base()
    contract["day"]["last_updated"] = stamp
    contract["last_quote"]["last_updated"] = stamp
    table, rejected = normalise_page([contract], "tid", datetime(2025, 12, 19, 21, tzinfo=UTC))
    assert not rejected and table.num_rows == 1
    assert table.column("day_updated_at").to_pylist() == [None]
    assert table.column("contract_ticker").to_pylist() == ["O:AAPL230616C00150000"]


def test_shapes_no_recording_shows_yet() -> None:
    starter = copy.deepcopy(_base())
    for key in ("last_quote", "last_trade", "break_even_price", "fmv"):
        starter.pop(key, None)
    starter["underlying_asset"] = {"ticker": "AAPL"}
    high_iv = copy.deepcopy(_base())
    high_iv["implied_volatility"] = 10.17
    high_iv["details"]["ticker"] = "O:AAPL230616C00050000"
    other = copy.deepcopy(_base())
    other["details"]["contract_type"] = "other"
    other["details"]["ticker"] = "O:AAPL230616X00150000"
    table, rejected = normalise_page([starter, high_iv, other], "tid", datetime(2025, 12, 19, 21, tzinfo=UTC))
    assert dict(rejected) == {"unknown contract_type": 1}  # counted with its reason, not stored
    rows = table.to_pylist()
    assert [r["contract_ticker"] for r in rows] == ["O:AAPL230616C00150000", "O:AAPL230616C00050000"]
    assert [rows[0][k] for k in ("bid", "ask", "last", "underlying_price")] == [None] * 4
    assert rows[0]["implied_volatility"] == starter["implied_volatility"]
    assert rows[1]["implied_volatility"] == 10.17  # stored as sent; the metrics decide what is valid
