"""The Polygon dlt source: normalisation, rejects, contract identity, origin pinning, retries (simulator faults)."""

from __future__ import annotations

import copy
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pyarrow as pa
import pytest

from loaders.polygon import (
    ChainClient,
    ChainFetcher,
    PolygonConfiguration,
    ProviderError,
    SymbolFetchError,
    dedupe_pages,
    expiration_slices,
    normalise_page,
    pin_next_url,
    polygon_configuration,
    polygon_source,
)
from loaders.polygon.rows import peek_next_url
from loaders.simulator import Fault

T = datetime(2025, 6, 2, 23, 59, 59, 999999, tzinfo=UTC)
DAY = date(2025, 6, 2)
# The documented example contract (shared/spec/polygon-api.md).
CONTRACT = {
    "break_even_price": 171.075,
    "day": {"change": -0.05, "close": 4.6, "last_updated": 1703192400000000000, "volume": 1322, "vwap": 4.71},
    "details": {"contract_type": "call", "exercise_style": "american", "expiration_date": "2026-01-16",
                "shares_per_contract": 100, "strike_price": 170, "ticker": "O:AAPL260116C00170000"},
    "fmv": 4.61,
    "greeks": {"delta": 0.5412, "gamma": 0.0311, "theta": -0.0825, "vega": 0.1902},
    "implied_volatility": 0.2488,
    "last_quote": {"ask": 4.65, "bid": 4.55, "last_updated": 1703192399000000000, "midpoint": 4.6},
    "last_trade": {"price": 4.6, "sip_timestamp": 1703192398123456789, "size": 2},
    "open_interest": 18234,
    "underlying_asset": {"last_updated": 1703192400000000000, "price": 170.145, "ticker": "AAPL"},
}
FAST = {"max_attempts": 3, "retry_budget": 10, "backoff_factor": 0.01, "max_retry_delay": 0.05, "read_timeout": 2}


def _client(base_url: str, key: str = "test-key", as_of: date | None = DAY, **settings: object) -> ChainClient:
    config = PolygonConfiguration(polygon_api_key=key, polygon_base_url=base_url, **(FAST | settings))
    return ChainClient(config, as_of)


def _rows(results: list, ticker_id: str = "tid") -> tuple[list[dict], dict]:
    table, rejected = normalise_page(results, ticker_id, T)
    return table.to_pylist(), dict(rejected)


def _contract(**changes: object) -> dict:
    contract = copy.deepcopy(CONTRACT)
    for path, value in changes.items():
        *parents, leaf = path.split("__")
        target = contract
        for key in parents:
            target = target[key]
        if value is ...:
            target.pop(leaf, None)
        else:
            target[leaf] = value
    return contract


# --- normalisation ----------------------------------------------------------------------------

def test_every_documented_column_from_the_provider_fields() -> None:
    [row], rejected = _rows([CONTRACT])
    assert rejected == {}
    assert row == {
        "time": T, "ticker_id": "tid", "contract_ticker": "O:AAPL260116C00170000",
        "expiration_date": date(2026, 1, 16), "strike_price": 170.0, "option_type": "C",
        "implied_volatility": 0.2488, "delta": 0.5412, "gamma": 0.0311, "theta": -0.0825, "vega": 0.1902,
        "open_interest": 18234, "volume": 1322, "bid": 4.55, "ask": 4.65, "last": 4.6,
        "underlying_price": 170.145, "underlying_symbol": "AAPL", "exercise_style": "american",
        "shares_per_contract": 100, "break_even_price": 171.075, "fmv": 4.61,
        # Unix nanoseconds -> timestamptz (microseconds kept, as PostgreSQL stores them)
        "quote_updated_at": datetime(2023, 12, 21, 20, 59, 59, tzinfo=UTC),
        "trade_at": datetime(2023, 12, 21, 20, 59, 58, 123456, tzinfo=UTC),
        "day_updated_at": datetime(2023, 12, 21, 21, 0, tzinfo=UTC),
        "source": "snapshot",
    }


def test_every_optional_field_missing_is_null() -> None:
    bare = {"details": {"contract_type": "put", "expiration_date": "2026-01-16", "strike_price": 165.5,
                        "ticker": "O:AAPL260116P00165500"}}
    nulls = {"details": {**bare["details"], "exercise_style": None, "shares_per_contract": None},
             "greeks": None, "implied_volatility": None, "last_quote": None, "last_trade": None,
             "fmv": None, "open_interest": None, "day": {"volume": None}, "underlying_asset": {}}
    rows, rejected = _rows([bare, nulls])
    assert rejected == {}
    for row in rows:
        assert (row["option_type"], row["strike_price"]) == ("P", 165.5)
        optional = {k: v for k, v in row.items()
                    if k not in ("time", "ticker_id", "contract_ticker", "expiration_date", "strike_price", "option_type",
                                 "source")}
        assert set(optional.values()) == {None}, optional


def test_index_underlying_price_comes_from_value() -> None:
    index = _contract(underlying_asset__price=..., underlying_asset__value=5880.25, underlying_asset__ticker="I:SPX")
    [row], _ = _rows([index])
    assert (row["underlying_price"], row["underlying_symbol"]) == (5880.25, "I:SPX")


@pytest.mark.parametrize(("change", "reason"), [
    ({"details__ticker": ...}, "missing ticker"),
    ({"details__ticker": ""}, "missing ticker"),
    ({"details__expiration_date": ...}, "missing expiration_date"),
    ({"details__expiration_date": "2026-13-01"}, "unparseable expiration_date"),
    ({"details__strike_price": ...}, "missing strike_price"),
    ({"details__strike_price": "abc"}, "unparseable strike_price"),
    ({"details__strike_price": -5}, "unparseable strike_price"),
    ({"details__contract_type": "straddle"}, "unknown contract_type"),
    ({"details__contract_type": ...}, "missing contract_type"),
    ({"details": ...}, "missing ticker"),
    ({"greeks__delta": "n/a"}, "unparseable delta"),
    ({"open_interest": 1.5}, "unparseable open_interest"),
    ({"open_interest": 2**70}, "unparseable open_interest"),
    ({"last_quote": [1, 2]}, "unparseable last_quote"),
    ({"implied_volatility": float("nan")}, "unparseable implied_volatility"),
])
def test_bad_contracts_are_rejected_and_counted_the_others_load(change: dict, reason: str) -> None:
    good = _contract(details__ticker="O:AAPL260116C00175000")
    rows, rejected = _rows([_contract(**change), good, "not a contract"])
    assert [r["contract_ticker"] for r in rows] == ["O:AAPL260116C00175000"]
    assert rejected == {reason: 1, "not an object": 1}


@pytest.mark.parametrize("stamp", [1703192400000, 1703192400000000, 1703192400.5, "1703192400000000000",
                                   "yesterday", 2**80, -1, True])
def test_a_timestamp_that_is_not_plausible_nanoseconds_is_null_the_contract_kept(stamp: object) -> None:
    contract = _contract(day__last_updated=stamp, last_quote__last_updated=stamp, last_trade__sip_timestamp=stamp)
    [row], rejected = _rows([contract])
    assert rejected == {} and row["contract_ticker"] == "O:AAPL260116C00170000"
    assert (row["day_updated_at"], row["quote_updated_at"], row["trade_at"]) == (None, None, None)
    assert row["volume"] == 1322  # the rest of the day bar is kept


def test_contract_identity_is_the_ticker_spx_and_spxw_share_the_rest() -> None:
    spx = _contract(details__ticker="O:SPX260116C05900000", details__strike_price=5900)
    spxw = _contract(details__ticker="O:SPXW260116C05900000", details__strike_price=5900)
    table, _ = normalise_page([spx, spxw], "tid", T)
    pages, dropped = dedupe_pages([table])
    assert dropped == 0 and pages[0].num_rows == 2
    assert sorted(pages[0].column("contract_ticker").to_pylist()) == ["O:SPX260116C05900000", "O:SPXW260116C05900000"]


def test_a_contract_repeated_across_pages_is_kept_once_later_page_wins() -> None:
    first, _ = normalise_page([_contract(last_quote__bid=1.0), _contract(details__ticker="O:X")], "tid", T)
    second, _ = normalise_page([_contract(last_quote__bid=2.0)], "tid", T)
    taken: set[str] = {"O:X"}  # already emitted by another symbol of the same load
    pages, dropped = dedupe_pages([first, second], taken)
    rows = pa.concat_tables(pages).to_pylist()
    assert dropped == 2 and [(r["contract_ticker"], r["bid"]) for r in rows] == [("O:AAPL260116C00170000", 2.0)]



def test_a_chain_without_repeats_loses_only_what_another_symbol_emitted() -> None:
    table, _ = normalise_page([_contract(), _contract(details__ticker="O:X"), _contract(details__ticker="O:Y")],
                              "tid", T)
    taken: set[str] = {"O:Y"}
    pages, dropped = dedupe_pages([table], taken)
    assert dropped == 1 and pages[0].column("contract_ticker").to_pylist() == ["O:AAPL260116C00170000", "O:X"]
    assert taken == {"O:AAPL260116C00170000", "O:X", "O:Y"}
    pages, dropped = dedupe_pages([table], set())
    assert dropped == 0 and pages == [table]

# --- origin pinning ---------------------------------------------------------------------------

def test_next_url_stays_on_the_configured_origin() -> None:
    base = "http://127.0.0.1:8080"
    assert pin_next_url("http://127.0.0.1:8080/v3/snapshot/options/AAPL?cursor=abc", base) == \
        "http://127.0.0.1:8080/v3/snapshot/options/AAPL?cursor=abc"
    # another origin (api.polygon.io behind a proxy, or anything else) is rewritten, never followed
    assert pin_next_url("https://api.polygon.io/v3/snapshot/options/AAPL?cursor=abc&apiKey=theirs", base) == \
        "http://127.0.0.1:8080/v3/snapshot/options/AAPL?cursor=abc"
    assert pin_next_url("https://evil.example/v3/snapshot/options/I:SPX?cursor=x", "https://proxy.local/polygon/") == \
        "https://proxy.local/polygon/v3/snapshot/options/I:SPX?cursor=x"
    for refused in ("https://evil.example/collect?cursor=abc", "ftp://127.0.0.1:8080/v3/snapshot/options/AAPL"):
        with pytest.raises(SymbolFetchError):
            pin_next_url(refused, base)


# --- over HTTP with the simulator ---------------------------------------------------------------

def tickers(result) -> list[str]:
    return [t for table in result.tables for t in table.column("contract_ticker").to_pylist()]


def _fetch(simulator, symbol: str, key: str = "test-key", **settings: object):
    return _client(simulator.base_url, key, **settings).fetch(symbol, "tid", T)


def test_full_chain_through_next_url_key_only_in_the_header(simulator, market) -> None:
    result = _fetch(simulator, "KO")
    expected = market.chain("KO", DAY)
    assert result.ok and result.pages == 3 and result.contracts == len(expected) == len(set(tickers(result)))
    sent = simulator.requests
    # as the official clients send it: `Authorization: Bearer` on every page, never in a URL
    assert [r.headers.get("Authorization") for r in sent] == ["Bearer test-key"] * 3
    assert not any("apiKey" in r.query or "test-key" in r.path for r in sent)
    assert sent[0].query["limit"] == "250" and sent[0].query["date"] == "2025-06-02"
    assert all("cursor" in r.query and "limit" not in r.query for r in sent[1:])


def test_index_symbols_go_raw_in_the_path_others_percent_encoded(simulator, market) -> None:
    assert _fetch(simulator, "I:SPX").contracts == len(market.chain("I:SPX", DAY))
    _fetch(simulator, "BRK.B")
    paths = {r.path for r in simulator.requests}
    assert "/v3/snapshot/options/I:SPX" in paths and "/v3/snapshot/options/BRK.B" in paths
    assert not any("%3A" in p for p in paths)


def test_foreign_next_url_is_rewritten_onto_the_configured_origin(simulator, market) -> None:
    simulator.set_fault("KO", Fault(foreign_next_url="http://127.0.0.2:9"))
    result = _fetch(simulator, "KO")
    assert result.ok and result.pages == 3 and result.contracts == len(market.chain("KO", DAY))


def test_repeated_contract_across_pages_is_stored_once(simulator, market) -> None:
    simulator.set_fault("KO", Fault(repeat_contract_across_pages=True))
    result = _fetch(simulator, "KO")
    assert result.ok and result.contracts > len(market.chain("KO", DAY))  # as fetched
    [table] = list(polygon_source([result]).resources["options_chains"])  # the source dedupes once
    assert table.num_rows == len(set(table.column("contract_ticker").to_pylist())) == len(market.chain("KO", DAY))
    assert result.contracts == table.num_rows


def test_429_honours_retry_after_then_succeeds(simulator) -> None:
    simulator.set_fault("F", Fault(status_429_times=1, retry_after_s=1))
    started = time.monotonic()
    result = _fetch(simulator, "F", max_attempts=3, max_retry_delay=2)
    assert result.ok and time.monotonic() - started >= 1.0
    assert len(simulator.requests) == 3  # the 429, then both pages


def test_5xx_is_retried_and_bounded(simulator) -> None:
    simulator.set_fault("F", Fault(status_5xx_times=2))
    assert _fetch(simulator, "F").ok
    simulator.clear_requests()
    simulator.set_fault("F", Fault(status_5xx_times=100))
    result = _fetch(simulator, "F")
    assert not result.ok and "HTTP 503" in result.error and len(simulator.requests) == FAST["max_attempts"]


def test_retry_budget_is_per_symbol(simulator) -> None:
    simulator.set_fault("KO", Fault(status_5xx_times=3))
    # 5 attempts per request would get through; the symbol's budget of 2 retries does not
    result = _fetch(simulator, "KO", max_attempts=5, retry_budget=2)
    assert not result.ok and len(simulator.requests) == 3


def test_timeouts_and_broken_bodies_are_retried_then_fail_the_symbol(simulator) -> None:
    simulator.set_fault("F", Fault(truncate_body=True, times=1))
    assert _fetch(simulator, "F").ok
    simulator.set_fault("F", Fault(hang_s=1.0))
    result = _fetch(simulator, "F", max_attempts=2, read_timeout=0.2)
    assert not result.ok and "timed out" in result.error


@pytest.mark.parametrize("fault", [Fault(non_json=True), Fault(html_200=True), Fault(results_not_list=True),
                                   Fault(next_url_loop=True)])
def test_bad_data_fails_the_symbol_without_retrying(simulator, fault: Fault) -> None:
    simulator.set_fault("KO", fault)
    result = _fetch(simulator, "KO")
    assert not result.ok and result.error
    assert len(simulator.requests) <= 2


def test_401_is_not_retried_and_stops_everything(simulator) -> None:
    with pytest.raises(ProviderError, match="HTTP 401") as exc:
        _fetch(simulator, "F", key="wrong-key")
    assert len(simulator.requests) == 1 and "wrong-key" not in str(exc.value)


def test_403_is_not_retried_and_fails_that_symbol_with_the_providers_message(simulator) -> None:
    simulator.not_entitled = frozenset({"F"})
    result = _fetch(simulator, "F")
    assert not result.ok and not result.fatal and result.tables == []
    assert result.error.startswith("HTTP 403 not entitled: You are not entitled to this data")
    assert len(simulator.requests) == 1


def test_unreachable_provider_stops_everything() -> None:
    client = _client("http://127.0.0.1:9", "secret-key", max_attempts=2)
    with pytest.raises(ProviderError, match="unreachable") as exc:
        client.fetch("F", "tid", T)
    assert "secret-key" not in str(exc.value)


def test_source_fetches_in_parallel_and_isolates_a_failing_symbol(simulator, monkeypatch) -> None:
    monkeypatch.setenv("SOURCES__POLYGON__BACKOFF_FACTOR", "0.01")  # dlt config injection
    monkeypatch.setenv("SOURCES__POLYGON__POLYGON_API_KEY", "test-key")
    monkeypatch.setenv("SOURCES__POLYGON__POLYGON_BASE_URL", simulator.base_url)
    simulator.set_fault("*", Fault(latency_s=0.3))
    simulator.set_fault("T", Fault(non_json=True))
    config = polygon_configuration()
    assert (config.backoff_factor, config.polygon_base_url) == (0.01, simulator.base_url)
    seen = []
    started = time.monotonic()
    with ChainFetcher(4) as fetcher:
        futures = fetcher.submit(ChainClient(config, DAY), {"F": "f", "KO": "k", "T": "t", "PFE": "p"}, T)
        chains = (seen.append(f.result()) or f.result() for f in as_completed(futures))
        tables = list(polygon_source(chains).resources["options_chains"])
    elapsed = time.monotonic() - started
    # One after another would take 0.3 s per request; in parallel the longest chain (3 pages of KO)
    # sets the pace. The margin is for a busy machine.
    sequential = 0.3 * len(simulator.requests)
    assert sequential >= 2.4 and elapsed < 0.7 * sequential
    outcomes = {r.symbol: r.ok for r in seen}
    assert outcomes == {"F": True, "KO": True, "T": False, "PFE": True}
    assert {t for table in tables for t in table.column("ticker_id").to_pylist()} == {"f", "k", "p"}


def test_redirects_are_refused_never_followed_with_the_key() -> None:
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    seen: list[str] = []

    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            self.send_response(301)
            self.send_header("Location", "http://127.0.0.2:9/v3/snapshot/options/F" + self.path[self.path.index("?"):])
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        result = _client(f"http://127.0.0.1:{server.server_port}", "secret-key", None).fetch("F", "tid", T)
    finally:
        server.shutdown()
    assert not result.ok and "refused HTTP 301 redirect to http://127.0.0.2:9" in result.error
    assert len(seen) == 1 and "secret-key" not in result.error


# --- pages parsed in processes while the next one is fetched ----------------------------------------

@pytest.fixture(scope="module")
def parser() -> Iterator[ProcessPoolExecutor]:
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("forkserver")) as pool:
        yield pool


@pytest.mark.parametrize(("body", "expected"), [
    (b'{"results":[],"status":"OK","next_url":"https://api.polygon.io/v3/x?cursor=YWJj"}',
     "https://api.polygon.io/v3/x?cursor=YWJj"),
    (b'{"results":[{"details":{"ticker":"O:A"}}],"next_url":"https://h/a?cursor=1","z":"\\"next_url\\":\\"x"}',
     "https://h/a?cursor=1"),  # an escaped look-alike inside a string is no key
    (b'{"results": [], "next_url": "https://h/a?cursor=1"}', None),  # not compact: the parse decides
    (b'{"results":[],"next_url":"https://h/a?cursor=\\u0031"}', None),  # an escape: the parse decides
    (b'{"results":[],"status":"OK"}', None),
    (b'not json at all', None),
])
def test_next_url_is_read_off_the_raw_page_only_in_its_compact_form(body: bytes, expected: str | None) -> None:
    assert peek_next_url(body) == expected


def test_with_parser_processes_a_chain_is_the_one_parsed_in_the_fetch_thread(simulator, parser) -> None:
    config = PolygonConfiguration(polygon_api_key="test-key", polygon_base_url=simulator.base_url, **FAST)
    in_thread = ChainClient(config, DAY).fetch("KO", "tid", T)
    pooled = ChainClient(config, DAY, parser=parser).fetch("KO", "tid", T)
    assert pooled.ok and pooled.pages == in_thread.pages == 3 and pooled.parse_cpu_s > 0
    assert pa.concat_tables(pooled.tables).equals(pa.concat_tables(in_thread.tables))
    simulator.clear_requests()
    simulator.set_fault("KO", Fault(non_json=True, on_pages={2}))
    broken = ChainClient(config, DAY, parser=parser).fetch("KO", "tid", T)
    assert not broken.ok and "not JSON" in broken.error and len(simulator.requests) == 2


def _serve_pages(pages: list[bytes]) -> tuple[Any, list[str]]:
    """A server answering the n-th request with pages[n] (the last one after that)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen: list[str] = []

    class Pages(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            seen.append(self.path)
            body = pages[min(len(seen), len(pages)) - 1].replace(b"BASE", self.server.base.encode())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    server.base = f"http://127.0.0.1:{server.server_port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, seen


@pytest.mark.parametrize(("first", "error"), [
    # bad data on a page whose next_url was already followed: the chain stops at the next page
    (b'{"results":{"message":"unavailable"},"next_url":"BASE/v3/snapshot/options/KO?cursor=2"}',
     "no list of results"),
    # a raw body naming another next_url than its JSON (a nested key after the real one)
    (b'{"results":[],"next_url":"BASE/v3/snapshot/options/KO?cursor=2","x":{"next_url":"BASE/v3/snapshot/options/KO?cursor=9"}}',
     "next_url 'http://127.0.0.1"),
])
def test_a_page_read_ahead_of_its_parse_still_fails_the_symbol_on_what_the_parse_finds(parser, first: bytes,
                                                                                          error: str) -> None:
    server, seen = _serve_pages([first, b'{"results":[],"status":"OK"}'])
    try:
        config = PolygonConfiguration(polygon_api_key="k", polygon_base_url=server.base, **FAST)
        result = ChainClient(config, DAY, parser=parser).fetch("KO", "tid", T)
    finally:
        server.shutdown()
    assert not result.ok and error in result.error and result.tables == []
    assert len(seen) == 2


# --- a large chain as parallel expiration-range slices ---------------------------------------------

def test_expiration_slices_balance_contracts_and_cover_every_date() -> None:
    counts = [(date(2025, 6, 2 + i), n) for i, n in enumerate([900, 900, 300, 300, 300, 300, 600, 400])]
    slices = expiration_slices(counts, 1000)  # 4,000 contracts: 4 slices
    assert len(slices) == 4 and slices[0][0] is None and slices[-1][1] is None
    for (_, hi), (lo, _) in zip(slices, slices[1:], strict=False):
        assert lo == hi + timedelta(days=1)  # adjacent: no date falls between two slices
    sizes = [sum(n for d, n in counts if (lo is None or d >= lo) and (hi is None or d <= hi)) for lo, hi in slices]
    assert sum(sizes) == 4000 and max(sizes) <= 1200
    assert expiration_slices(counts, 5000) == [] and expiration_slices(counts, 0) == []
    assert expiration_slices([(date(2025, 6, 2), 9000)], 1000) == []  # one expiration cannot be split


def test_a_sliced_chain_is_the_whole_chain_fetched_in_parallel(simulator, market) -> None:
    chain = market.chain("I:SPX", DAY)
    counts = sorted(Counter(date.fromisoformat(c["details"]["expiration_date"]) for c in chain).items())
    slices = expiration_slices(counts, 2500)
    assert len(slices) >= 6
    simulator.set_fault("*", Fault(latency_s=0.02))
    client = _client(simulator.base_url)
    with ChainFetcher(8) as fetcher:
        [whole] = [f.result() for f in fetcher.submit(client, {"I:SPX": "tid"}, T, slices={"I:SPX": slices})]
    assert whole.ok and whole.contracts == len(chain) == len(set(tickers(whole)))
    assert sorted(tickers(whole)) == sorted(c["details"]["ticker"] for c in chain)
    assert whole.pages > len(chain) // 250
    # The slices start together, not one after another: their first requests arrive first.
    sent = simulator.requests
    firsts = [r.query for r in sent if "cursor" not in r.query]
    assert len(firsts) == len(slices) and all(q["date"] == DAY.isoformat() for q in firsts)
    assert all("cursor" not in r.query for r in sent[:len(slices) - 1])
    assert sum("expiration_date.gte" not in q for q in firsts) == 1  # the first slice is open below
    assert sum("expiration_date.lte" not in q for q in firsts) == 1  # the last one above


def test_a_failing_slice_fails_the_whole_symbol_and_loads_none_of_it(simulator) -> None:
    simulator.set_fault("I:SPX", Fault(non_json=True, on_pages={3}, times=1))
    slices = [(None, date(2025, 7, 1)), (date(2025, 7, 2), None)]
    client = _client(simulator.base_url)
    with ChainFetcher(4) as fetcher:
        [result] = [f.result() for f in fetcher.submit(client, {"I:SPX": "tid"}, T, slices={"I:SPX": slices})]
    assert not result.ok and "not JSON" in result.error and result.tables == [] and result.contracts == 0
    assert not result.fatal and result.pages > 0
