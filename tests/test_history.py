"""Past days with `--provider polygon`: reconstructed from the historical endpoints of the simulator
over HTTP (POLYGON_BASE_URL), into real PostgreSQL, then through `kapman metrics` (issue #14)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import date

import pytest
import requests

from loaders import cli
from loaders.ingest import history as history_ingest
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


def listed_by(market: Market, symbol: str, day: date) -> list[dict]:
    """The reference contracts of `day` from a simulator of its own (the test's servers come and go)."""
    with SimulatorServer(market, api_key=KEY, today=AFTER) as server:
        return listed(server, symbol, day)


def standard(contracts: list[dict]) -> list[dict]:
    return [c for c in contracts if c["shares_per_contract"] == 100 and not c.get("additional_underlyings")]


def stored(database, symbol: str, day: date) -> dict[str, int]:
    """Rows of (symbol, day) by source."""
    return dict(query(database, "select c.source, count(*) from options_chains c join tickers k on k.id = c.ticker_id"
                                " where k.symbol = %s and c.time = %s group by 1", (symbol, snapshot_time(day))))


def test_a_range_is_reconstructed_once_per_day_and_a_rerun_fetches_nothing(database, db_url, history, caplog) -> None:
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
    assert "history progress: 500 requests done, " in caplog.text  # a backfill shows its progress

    rows = count(database, "select count(*) from options_chains")
    history.clear_requests()
    code, again = run(db_url, *RANGE)
    assert code == 0 and again["days_skipped"] == len(DAYS) and history.requests == []
    assert count(database, "select count(*) from options_chains") == rows


def test_today_comes_from_the_snapshot_and_a_reconstruction_never_overwrites_it(database, db_url, market,
                                                                              monkeypatch, caplog) -> None:
    watch(database, ("a", "KO"))
    span = ("--start-date", DAYS[-3].isoformat(), "--end-date", END.isoformat())
    with serve(market, monkeypatch, END) as server:  # today is the range's last day
        code, summary = run(db_url, *span)
        assert code == 0 and summary["days_succeeded"] == 3
        assert not any("date" in r.query for r in server.requests if r.path.startswith("/v3/snapshot/"))
    assert [stored(database, "KO", d) for d in DAYS[-3:]] == [
        {"reconstructed": len(standard(listed_by(market, "KO", DAYS[-3])))},
        {"reconstructed": len(standard(listed_by(market, "KO", DAYS[-2])))},
        {"snapshot": len(market.chain("KO", END))}]
    before = query(database, "select contract_ticker, last, implied_volatility, source from options_chains"
                             " where time = %s order by 1", (snapshot_time(END),))
    with serve(market, monkeypatch, AFTER) as server:  # a day later END is past, and stays the snapshot's
        code, summary = run(db_url, *span, "--force")
        assert not any(f"/{END}" in r.path or r.query.get("as_of") == END.isoformat() for r in server.requests)
    assert code == 0 and [d["outcome"] for d in summary["days"]] == ["succeeded", "succeeded", "skipped"]
    assert f"{END} KO skipped: a live snapshot stored KO's chain of {END}: a reconstruction never overwrites" in caplog.text
    assert query(database, "select contract_ticker, last, implied_volatility, source from options_chains"
                           " where time = %s order by 1", (snapshot_time(END),)) == before


def test_refusals_fail_what_they_cover_and_optional_endpoints_only_log(database, db_url, market, monkeypatch,
                                                                       caplog) -> None:
    watch(database, ("a", "KO"), ("a", "T"))
    span = ("--start-date", DAYS[0].isoformat(), "--end-date", DAYS[1].isoformat())
    with serve(market, monkeypatch, AFTER, not_entitled={"T"}, refuse=("open_interest", "dividends")):
        code, summary = run(db_url, *span)
    outcomes = {(s["day"], s["symbol"]): (s["outcome"], s["error"]) for s in summary["symbols"]}
    assert code == 0 and {o for (_, symbol), (o, _) in outcomes.items() if symbol == "KO"} == {"ok"}
    for day in DAYS[:2]:
        outcome, error = outcomes[(day.isoformat(), "T")]
        assert outcome == "failed" and error.startswith("HTTP 403 from /v3/reference/options/contracts: You are not")
    assert query(database, "select distinct k.symbol from options_chains c join tickers k on k.id = c.ticker_id") \
        == [("KO",)]
    assert count(database, "select count(*) from options_chains where open_interest is not null") == 0
    said = [r.getMessage() for r in caplog.records if "unavailable" in r.getMessage()]
    assert len([m for m in said if m.startswith("history: open interest unavailable (HTTP 403")]) == 1
    assert len([m for m in said if m.startswith("history: dividends unavailable (HTTP 403")]) == 1

    query(database, "delete from ingestion_ledger")
    with serve(market, monkeypatch, AFTER, refuse=("aggregates",)):
        code, summary = run(db_url, *span, "--symbols", "T")
    assert code == 1 and summary["symbols_failed"] == 2
    assert all(s["error"].startswith("HTTP 403 from /v2/aggs: You are not entitled") for s in summary["symbols"])
    assert count(database, "select count(*) from options_chains c join tickers k on k.id = c.ticker_id"
                           " where k.symbol = 'T'") == 0


def test_a_dry_run_counts_the_requests_and_the_time_at_the_plans_limit(database, db_url, history, monkeypatch,
                                                                       caplog) -> None:
    watch(database, ("a", "KO"))
    monkeypatch.setenv("POLYGON_REQUESTS_PER_MINUTE", "300")  # the dry run keeps to it too
    code, _ = run(db_url, *RANGE, "--dry-run")
    contracts = {c["ticker"] for d in DAYS for c in standard(listed(history, "KO", d))}
    needs = len(DAYS) + len(contracts) + 2 + len({t[2:-15] for t in contracts}) + 1
    assert code == 0 and f"the reconstruction needs {needs} requests in all (about" in caplog.text
    assert f"{needs / 300:.0f} minutes at 300 requests/minute" in caplog.text
    # a year of a 2,000-contract chain at the free tier's 5 a minute: days, said as such
    assert history_ingest.duration(252 * 3 + 9_000 + 10, 5) == "about 1.4 days at 5 requests/minute"
    sent = {r.path for r in history.requests}
    assert sent == {"/v3/reference/options/contracts"}  # the reference pages, nothing else
    assert count(database, "select count(*) from options_chains") == 0
    assert count(database, "select count(*) from ingestion_ledger") == 0


def test_the_key_goes_in_the_header_to_the_origin_and_into_no_log_line(database, db_url, history, monkeypatch,
                                                                       capsys) -> None:
    from loaders.logs import setup_logging

    monkeypatch.setattr(cli, "setup_logging", lambda **_: setup_logging(verbose=True, debug=True))
    watch(database, ("a", "KO"))
    code, summary = run(db_url, "--as-of", DAYS[0].isoformat())
    said = capsys.readouterr()
    assert code == 0 and "urllib3.connectionpool" in said.err and "/v2/aggs/ticker/O:KO" in said.err
    assert KEY not in said.err + said.out + repr(summary)
    assert all(r.headers.get("Authorization") == f"Bearer {KEY}" and "apiKey" not in r.query
               for r in history.requests)
    assert KEY not in repr(query(database, "select * from ingestion_ledger"))


def test_metrics_over_reconstructed_days_match_the_snapshots_of_those_days(database, db_url, history, pg_server,
                                                                           template_db, market) -> None:
    days = DAYS[:3]
    span = ("--start-date", days[0].isoformat(), "--end-date", days[-1].isoformat())
    watch(database, *(("a", s) for s in SYMBOLS))
    assert run(db_url, *span)[0] == 0
    assert run_metrics(database, *span) == 0
    rebuilt = documents(database)
    assert set(rebuilt) == {(s, d) for s in SYMBOLS for d in days}
    assert all("reconstructed_chain" in doc["diagnostics"] for doc in rebuilt.values())
    with fresh_database(pg_server, template_db, "kapman_snap") as snapshots:
        watch(snapshots, *(("a", s) for s in SYMBOLS))
        assert run(snapshots.url(), *span, "--provider", "simulator")[0] == 0
        assert run_metrics(snapshots, *span) == 0
        truth = documents(snapshots)
    assert not any("reconstructed_chain" in doc["diagnostics"] for doc in truth.values())
    errors = {(key, metric): abs(rebuilt[key]["metrics"][metric] - doc["metrics"][metric])
              for key, doc in truth.items() for metric in ("atm_iv_30d", "iv_skew")}
    for metric in ("atm_iv_30d", "iv_skew"):  # the README's figures (pytest -s)
        print(metric, "largest difference", max(e for (_, m), e in errors.items() if m == metric))
    assert len(errors) == 2 * len(truth) and max(errors.values()) < 0.01
