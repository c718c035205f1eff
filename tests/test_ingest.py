"""`kapman ingest` end to end: real PostgreSQL, the simulator over HTTP (as the polygon provider via
POLYGON_BASE_URL, or a child process with --provider simulator), and the `dlt pipeline run` plugin."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime
from pathlib import Path

import pytest

from loaders import cli, ingest
from loaders import db as dbmod
from loaders.ingest.providers import SimulatedSnapshots
from loaders.simulator import Fault, Market, SimulatorServer
from loaders.trading_calendar import TODAY_VARIABLE, latest_trading_date, snapshot_time
from tests.conftest import FROZEN_TODAY, PROJECT_DIR, query

TODAY = FROZEN_TODAY  # a trading day: the frozen today of tests/conftest.py
KEY = "pk-leakcheck-7f3a9c21e5"


@pytest.fixture(autouse=True)
def _workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, market: Market) -> None:
    """dlt's pipelines dir (.kapman/dlt) per test; fast retries through dlt's config; the in-process
    simulator (--provider simulator) on the same market as the `market` fixture."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KAPMAN_SIMULATOR_SEED", str(market.seed))
    monkeypatch.setenv("SOURCES__POLYGON__BACKOFF_FACTOR", "0.01")
    monkeypatch.setenv("SOURCES__POLYGON__MAX_RETRY_DELAY", "0.05")
    for name in ("POLYGON_API_KEY", "POLYGON_BASE_URL", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def live(market: Market, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorServer]:
    """The simulator standing in for the live API: the polygon provider pointed at it."""
    with SimulatorServer(market, api_key="test-key", today=TODAY) as server:
        monkeypatch.setenv("POLYGON_API_KEY", "test-key")
        monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
        yield server


def watch(database: dbmod.Database, *entries: tuple[str, str] | tuple[str, str, bool]) -> None:
    for watchlist_id, symbol, *active in entries:
        query(database, "insert into watchlists (watchlist_id, symbol, active) values (%s, %s, %s)",
              (watchlist_id, symbol, active[0] if active else True))


def run(db_url: str, *argv: str) -> tuple[int, dict]:
    summary = Path(f"summary-{datetime.now().timestamp()}.json")
    code = cli.main(["ingest", "--db-url", db_url, "--summary-json", str(summary), *argv])
    return code, json.loads(summary.read_text()) if summary.exists() else {}


def pages(market: Market, symbol: str, day: date = TODAY) -> int:
    """Requests a whole chain takes at 250 contracts a page (the simulator decides, not the calendar)."""
    return max(1, -(-len(market.chain(symbol, day)) // 250))


def per_symbol(summary: dict) -> dict[str, str]:
    return {s["symbol"]: s["outcome"] for s in summary["symbols"]}


def count(database: dbmod.Database, sql: str, params: tuple = ()) -> int:
    return query(database, sql, params)[0][0]


# --- symbol selection -------------------------------------------------------------------------

def test_symbols_from_every_active_watchlist_deduplicated_sorted_and_narrowed(database, caplog) -> None:
    watch(database, ("core", " msft "), ("core", "AAPL"), ("tech", "msft"), ("tech", "I:SPX"),
          ("tech", "BRK.B"), ("old", "NVDA", False), ("tech", "AAPL; drop table x"), ("tech", "../../etc"))
    with database.connect() as conn:
        assert ingest.select_symbols(conn, None) == ["AAPL", "BRK.B", "I:SPX", "MSFT"]
        assert ingest.select_symbols(conn, ["msft", "NVDA", "I:SPX"]) == ["I:SPX", "MSFT"]
    assert "AAPL; DROP TABLE X" in caplog.text and "not on any active watchlist, skipped: NVDA" in caplog.text
    with database.connect() as conn:
        ids = ingest.ensure_tickers(conn, ["AAPL", "I:SPX"])
    assert sorted(ids) == ["AAPL", "I:SPX"] and count(database, "select count(*) from tickers") == 2


# --- end to end ---------------------------------------------------------------------------------

def test_the_default_day_on_the_real_clock(database, db_url, market, monkeypatch) -> None:
    """The one test on the wall clock: whatever today is, the default run stores the current trading
    date's chain under its snapshot identity."""
    monkeypatch.delenv(TODAY_VARIABLE)
    watch(database, ("a", "KO"))
    code, summary = run(db_url, "--provider", "simulator")
    day = latest_trading_date()
    assert code == 0 and summary["days"][0]["date"] == day.isoformat() and per_symbol(summary) == {"KO": "ok"}
    assert query(database, "select distinct time from options_chains") == [(snapshot_time(day),)]
    assert count(database, "select count(*) from options_chains") == len(market.chain("KO", day))



def test_several_symbols_end_to_end_with_pagination(database, db_url, live, market) -> None:
    watch(database, ("a", " ko "), ("a", "F"), ("b", "KO"), ("b", "I:VIX"), ("b", "PFE", False))
    code, summary = run(db_url)
    assert code == 0 and per_symbol(summary) == {"F": "ok", "I:VIX": "ok", "KO": "ok"}
    t = snapshot_time(TODAY)
    for symbol in ("F", "I:VIX", "KO"):
        chain = market.chain(symbol, TODAY)
        stored = count(database, "select count(*) from options_chains c join tickers k on k.id = c.ticker_id"
                                 " where k.symbol = %s and c.time = %s", (symbol, t))
        entry = next(s for s in summary["symbols"] if s["symbol"] == symbol)
        assert stored == len(chain) == entry["contracts"] == entry["rows_written"]
        assert entry["pages"] == pages(market, symbol)
    # one contract, every column against the provider's JSON
    contract = market.chain("I:VIX", TODAY)[3]
    row = query(database, "select strike_price, option_type, expiration_date, delta, bid, underlying_price,"
                          " underlying_symbol, quote_updated_at from options_chains where contract_ticker = %s",
                (contract["details"]["ticker"],))[0]
    assert float(row[0]) == contract["details"]["strike_price"] and row[1] == contract["details"]["contract_type"][0].upper()
    assert row[2].isoformat() == contract["details"]["expiration_date"]
    assert row[3] == (contract.get("greeks") or {}).get("delta")
    assert float(row[5]) == contract["underlying_asset"]["value"] and row[6] == "I:VIX"
    # VIX and VIXW share (expiration, strike, type): both stored, keyed by contract ticker
    assert count(database, "select count(*) from (select 1 from options_chains group by expiration_date,"
                           " strike_price, option_type having count(*) > 1) d") > 0
    assert query(database, "select status, count(*), sum(rows_written) from ingestion_ledger group by 1") == \
        [("completed", 3, summary["rows_written"])]
    assert count(database, "select count(*) from option_contracts where active") == summary["rows_written"]
    sent = live.requests
    # the key as the official clients send it: a header on every page, never in the URL
    assert all(r.headers.get("Authorization") == "Bearer test-key" for r in sent)
    assert all("apiKey" not in r.query and "date" not in r.query for r in sent)
    assert any(r.path == "/v3/snapshot/options/I:VIX" for r in sent)  # index symbols raw in the path
    assert summary["parse_process_cpu_s"] > 0  # the pages were parsed in the worker processes


def test_pages_are_parsed_in_worker_processes_or_in_the_fetch_threads_alike(database, db_url, live, market,
                                                                           monkeypatch) -> None:
    watch(database, ("a", "KO"))
    code, pooled = run(db_url)
    assert code == 0 and pooled["parse_process_cpu_s"] > 0
    stored = query(database, "select * from options_chains order by contract_ticker")
    monkeypatch.setattr(ingest, "PARSE_PROCESSES", 0)
    query(database, "delete from options_chains")
    code, threaded = run(db_url, "--force")
    assert code == 0 and threaded["parse_process_cpu_s"] == 0
    again = query(database, "select * from options_chains order by contract_ticker")
    # the same rows (load ids and insert times aside)
    assert [r[:25] for r in again] == [r[:25] for r in stored] and len(again) == len(market.chain("KO", TODAY))


def test_the_copy_chunk_patch_is_active(database, db_url, live, market, monkeypatch) -> None:
    """The one patch of a library kept (ingest.pipeline.large_copy_chunks): dlt's csv COPY goes
    through our cursor, in large chunks. Fails the day dlt opens its connections or COPYs otherwise."""
    from dlt.destinations.impl.postgres.sql_client import Psycopg2SqlClient

    from loaders.ingest import pipeline

    asked: list[int] = []
    copy_expert = pipeline.CopyCursor.copy_expert

    def spy(self, sql, file, size=pipeline.COPY_CHUNK_BYTES) -> None:
        asked.append(size)
        copy_expert(self, sql, file, size)

    monkeypatch.setattr(pipeline.CopyCursor, "copy_expert", spy)
    watch(database, ("a", "KO"))
    assert run(db_url)[0] == 0
    assert getattr(Psycopg2SqlClient.open_connection, "large_copy_chunks", False)
    assert asked, "dlt's COPY did not go through CopyCursor: large_copy_chunks has no effect any more"
    assert count(database, "select count(*) from options_chains") == len(market.chain("KO", TODAY))


def test_instants_are_exact_whatever_the_database_time_zone(database, db_url, live, market) -> None:
    # The load files carry UTC timestamps without an offset; the pipeline pins its sessions to UTC.
    query(database, f'alter database "{database.dbname}" set timezone to \'America/New_York\'')
    watch(database, ("a", "KO"))
    assert run(db_url)[0] == 0
    assert query(database, "select distinct time from options_chains") == [(snapshot_time(TODAY),)]
    contract = next(c for c in market.chain("KO", TODAY) if (c.get("last_quote") or {}).get("last_updated"))
    stored = query(database, "select quote_updated_at from options_chains where contract_ticker = %s",
                   (contract["details"]["ticker"],))[0][0]
    assert stored.timestamp() * 10**9 == pytest.approx(contract["last_quote"]["last_updated"], abs=1000)


def test_a_large_chain_is_fetched_in_parallel_slices_once_its_size_is_known(database, db_url, live, market,
                                                                          monkeypatch) -> None:
    monkeypatch.setenv("SOURCES__POLYGON__SLICE_CONTRACTS", "500")
    watch(database, ("a", "AAPL"), ("a", "KO"))
    chain = market.chain("AAPL", TODAY)
    assert run(db_url)[0] == 0  # nothing stored yet: one pagination per symbol
    assert not any("expiration_date.gte" in r.query or "expiration_date.lte" in r.query for r in live.requests)
    live.clear_requests()
    code, summary = run(db_url, "--force")  # the stored chain says AAPL is large
    assert code == 0 and per_symbol(summary) == {"AAPL": "ok", "KO": "ok"}
    aapl = [r.query for r in live.requests if "cursor" not in r.query and r.path.endswith("/AAPL")]
    assert len(aapl) == -(-len(chain) // 500) and sum("expiration_date.gte" not in q for q in aapl) == 1
    entry = next(s for s in summary["symbols"] if s["symbol"] == "AAPL")
    assert entry["contracts"] == len(chain) and entry["rows_written"] == 0  # the same rows, unchanged
    assert count(database, "select count(*) from options_chains c join tickers k on k.id = c.ticker_id"
                           " where k.symbol = 'AAPL'") == len(chain)
    assert count(database, "select count(*) from option_contracts where active") == \
        count(database, "select count(*) from options_chains")


def test_rerun_is_idempotent_rows_written_is_honest_new_snapshot_appends(database, db_url, live) -> None:
    watch(database, ("a", "F"), ("a", "KO"))
    code, first = run(db_url)
    total = count(database, "select count(*) from options_chains")
    assert code == 0 and first["rows_written"] == total > 0
    # a single day is fetched again whatever the ledger says: nothing changed, nothing written
    code, again = run(db_url)
    assert code == 0 and again["symbols_ok"] == 2 and again["symbols_skipped"] == 0 and again["rows_written"] == 0
    code, forced = run(db_url, "--force")
    assert code == 0 and forced["symbols_ok"] == 2 and forced["rows_written"] == 0
    assert count(database, "select count(*) from options_chains") == total
    # one row drifted, one row lost: exactly those two are written back
    victim = query(database, "select contract_ticker, bid from options_chains where bid is not null limit 1")[0]
    query(database, "update options_chains set bid = bid + 1 where contract_ticker = %s", (victim[0],))
    query(database, "delete from options_chains where contract_ticker = (select min(contract_ticker) from options_chains"
                    " where contract_ticker <> %s)", (victim[0],))
    code, repaired = run(db_url)
    assert repaired["rows_written"] == 2 and count(database, "select count(*) from options_chains") == total
    assert query(database, "select bid from options_chains where contract_ticker = %s", (victim[0],)) == [(victim[1],)]
    # a new snapshot time appends
    code, other = run(db_url, "--snapshot-time", f"{TODAY.isoformat()}T20:00:00+00:00")
    assert code == 0 and other["rows_written"] == total
    assert query(database, "select count(*), count(distinct time) from options_chains") == [(2 * total, 2)]
    assert count(database, "select count(*) from (select 1 from options_chains group by time, contract_ticker"
                           " having count(*) > 1) d") == 0


def test_one_symbol_failing_while_others_load_then_retried(database, db_url, live, caplog) -> None:
    watch(database, ("a", "F"), ("a", "KO"), ("a", "T"))
    assert run(db_url)[0] == 0
    ko_before = query(database, "select count(*), max(last_seen_at) from option_contracts c join tickers k"
                                " on k.id = c.ticker_id where k.symbol = 'KO' and c.active")
    live.set_fault("KO", Fault(non_json=True))
    live.set_fault("T", Fault(status_5xx_times=100))
    code, summary = run(db_url, "--force", "--snapshot-time", f"{TODAY.isoformat()}T21:00:00+00:00")
    assert code == 0 and per_symbol(summary) == {"F": "ok", "KO": "failed", "T": "failed"}
    errors = {s["symbol"]: s["error"] for s in summary["symbols"]}
    assert "not JSON" in errors["KO"] and "HTTP 503 after retries" in errors["T"]
    assert "KO FAILED" in caplog.text and "error=unreadable response" in caplog.text
    assert query(database, "select symbol, status from ingestion_ledger where snapshot_time <> %s order by 1",
                 (snapshot_time(TODAY),)) == [("F", "completed"), ("KO", "failed"), ("T", "failed")]
    # the failed symbol's lifecycle is untouched
    assert query(database, "select count(*), max(last_seen_at) from option_contracts c join tickers k"
                           " on k.id = c.ticker_id where k.symbol = 'KO' and c.active") == ko_before
    live.clear_faults()
    code, retried = run(db_url, "--snapshot-time", f"{TODAY.isoformat()}T21:00:00+00:00")
    assert code == 0 and per_symbol(retried) == {"F": "ok", "KO": "ok", "T": "ok"}
    assert (retried["rows_written"], query(database, "select distinct status from ingestion_ledger")) == (
        count(database, "select count(*) from options_chains c join tickers k on k.id = c.ticker_id"
                        " where k.symbol in ('KO', 'T') and c.time <> %s", (snapshot_time(TODAY),)), [("completed",)])
    live.set_fault("*", Fault(non_json=True))
    code, all_failed = run(db_url, "--force")
    assert code == 1 and all_failed["symbols_failed"] == 3


class _Drifted(Market):
    """The same market after the provider's figures changed: every third contract's open interest
    moves (the chain's contracts are the same)."""

    def chain_json(self, symbol: str, as_of: date, plan: str = "full") -> list[bytes]:
        contracts = [json.loads(raw) for raw in super().chain_json(symbol, as_of, plan)]
        for contract in contracts[::3]:
            contract["open_interest"] = (contract.get("open_interest") or 0) + 7
        return [json.dumps(c).encode() for c in contracts]


def test_a_single_day_rerun_after_the_provider_changed_updates_in_place(database, db_url, market,
                                                                        monkeypatch) -> None:
    watch(database, ("a", "F"), ("a", "KO"))
    monkeypatch.setenv("POLYGON_API_KEY", "test-key")
    with SimulatorServer(market, api_key="test-key", today=TODAY) as server:
        monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
        code, first = run(db_url)
    total = count(database, "select count(*) from options_chains")
    assert code == 0 and first["rows_written"] == total
    drifted = _Drifted(market.seed)
    with SimulatorServer(drifted, api_key="test-key", today=TODAY) as server:
        monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
        code, again = run(db_url)  # the same day, no --force: fetched again, changes written in place
        assert len(server.requests) == pages(market, "F") + pages(market, "KO")
    changed = sum(len(market.chain(s, TODAY)[::3]) for s in ("F", "KO"))
    assert code == 0 and per_symbol(again) == {"F": "ok", "KO": "ok"} and again["rows_written"] == changed
    assert count(database, "select count(*) from options_chains") == total
    served = {c["details"]["ticker"]: c.get("open_interest") for s in ("F", "KO")
              for c in map(json.loads, drifted.chain_json(s, TODAY))}
    assert dict(query(database, "select contract_ticker, open_interest from options_chains")) == served


def test_a_range_rerun_fetches_nothing_already_completed(database, db_url, monkeypatch) -> None:
    from loaders import simulator as simulator_package

    servers: list[SimulatorServer] = []

    class Counted(SimulatorServer):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            servers.append(self)

    monkeypatch.setattr(simulator_package, "SimulatorServer", Counted)
    monkeypatch.setattr(SimulatedSnapshots, "in_process", True)
    watch(database, ("a", "F"), ("a", "KO"))
    span = ("--provider", "simulator", "--start-date", "2025-06-04", "--end-date", "2025-06-06")
    code, first = run(db_url, *span)
    rows = count(database, "select count(*) from options_chains")
    assert code == 0 and first["symbols_ok"] == 6 and servers[0].requests
    code, again = run(db_url, *span)
    assert code == 0 and again["error"] is None  # nothing to do is no failure
    assert (again["days_skipped"], again["symbols_skipped"], again["rows_written"]) == (3, 6, 0)
    assert servers[1].requests == []  # nothing completed was fetched again
    assert count(database, "select count(*) from options_chains") == rows


def test_soft_deactivation_and_reactivation_across_runs(database, db_url, market) -> None:
    watch(database, ("a", "KO"))
    d1, d2 = date(2025, 6, 13), date(2025, 6, 23)  # the June 20 expiry goes in between
    first, second = ({c["details"]["ticker"] for c in market.chain("KO", d)} for d in (d1, d2))
    gone, new = first - second, second - first
    assert gone and new
    assert run(db_url, "--provider", "simulator", "--as-of", d1.isoformat())[0] == 0
    assert run(db_url, "--provider", "simulator", "--as-of", d2.isoformat())[0] == 0
    state = dict(((t, (a, d)) for t, a, d in query(database, "select contract_ticker, active, deactivated_at"
                                                               " from option_contracts")))
    assert {t for t, (active, _) in state.items() if not active} == gone
    assert all(state[t][1] == snapshot_time(d2) for t in gone)
    assert count(database, "select count(*) from option_contracts where active") == len(second)
    # the older snapshot again changes nothing: the newer one said those contracts had gone
    assert run(db_url, "--provider", "simulator", "--as-of", d1.isoformat(), "--force")[0] == 0
    assert count(database, "select count(*) from option_contracts where not active") == len(gone)
    # a contract marked gone that the chain shows again is reactivated; nothing is ever deleted
    back = sorted(second)[0]
    query(database, "update option_contracts set active = false, deactivated_at = %s where contract_ticker = %s",
          (snapshot_time(d2), back))
    assert run(db_url, "--provider", "simulator", "--as-of", d2.isoformat(), "--force")[0] == 0
    assert query(database, "select active, deactivated_at from option_contracts where contract_ticker = %s",
                 (back,)) == [(True, None)]
    assert count(database, "select count(*) from option_contracts") == len(first | second)


# --- run-level failures -------------------------------------------------------------------------

def test_401_aborts_and_a_missing_key_refuses_to_start(database, db_url, live, monkeypatch, caplog) -> None:
    watch(database, ("a", "F"), ("a", "KO"))
    monkeypatch.setenv("POLYGON_API_KEY", "not-the-key")
    code, summary = run(db_url, "--concurrency", "1")
    assert code == 1 and "HTTP 401" in summary["error"] and "Unknown API Key" in summary["error"]
    assert live.requests[0].headers.get("Authorization") == "Bearer not-the-key"
    assert count(database, "select count(*) from options_chains") == 0
    assert len(live.requests) == 1  # never retried, nothing else started
    assert "not-the-key" not in caplog.text and "Traceback" not in caplog.text
    monkeypatch.delenv("POLYGON_API_KEY")
    code, summary = run(db_url)
    assert code == 1 and "POLYGON_API_KEY is not set" in summary["error"]


def test_unreachable_provider_fails_the_run(database, db_url, monkeypatch) -> None:
    watch(database, ("a", "F"))
    monkeypatch.setenv("POLYGON_API_KEY", "k" * 8)
    monkeypatch.setenv("POLYGON_BASE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SOURCES__POLYGON__MAX_ATTEMPTS", "2")
    code, summary = run(db_url)
    assert code == 1 and "unreachable" in summary["error"]


def test_an_unreachable_database_fails_the_run(caplog) -> None:
    assert cli.main(["ingest", "--provider", "simulator", "--db-url", "postgresql://u:p@127.0.0.1:9/x"]) == 1
    assert "cannot connect to database 'x'" in caplog.text and "Traceback" not in caplog.text


def test_a_second_run_exits_3_at_once_having_written_nothing(database, db_url, caplog) -> None:
    watch(database, ("a", "F"))
    with database.connect(autocommit=True) as other, dbmod.advisory_lock(other, "ingest") as held:
        assert held
        assert cli.main(["ingest", "--provider", "simulator", "--db-url", db_url]) == 3
    assert "'ingest' lock" in caplog.text and "held by backend pid" in caplog.text
    assert count(database, "select count(*) from tickers") == 0
    assert count(database, "select count(*) from ingestion_ledger") == 0


def test_dry_run_writes_nothing(database, db_url, caplog) -> None:
    watch(database, ("a", "F"), ("a", "KO"))
    assert cli.main(["ingest", "--provider", "simulator", "--dry-run", "--db-url", db_url,
                     "--start-date", "2025-06-02", "--end-date", "2025-06-06"]) == 0
    assert "dry run: 2025-06-06" in caplog.text and "F, KO" in caplog.text
    assert count(database, "select count(*) from tickers") == 0
    assert not Path(".kapman").exists()


def test_the_key_appears_in_no_log_line_trace_or_file(database, db_url, market, monkeypatch, caplog, capsys,
                                                      tmp_path) -> None:
    watch(database, ("a", "F"), ("a", "KO"), ("a", "T"))
    with SimulatorServer(market, api_key=KEY, today=TODAY) as server:
        monkeypatch.setenv("POLYGON_API_KEY", KEY)
        monkeypatch.setenv("POLYGON_BASE_URL", server.base_url)
        server.set_fault("KO", Fault(foreign_next_url="http://127.0.0.2:9"))
        server.set_fault("T", Fault(status_5xx_times=100))
        code, summary = run(db_url, "--verbose")
        assert code == 0 and summary["symbols_failed"] == 1
        assert all(r.headers.get("Authorization") == f"Bearer {KEY}" for r in server.requests)  # it did go there
        assert not any(KEY in r.path or "apiKey" in r.query for r in server.requests)  # never in a URL
        monkeypatch.setenv("POLYGON_BASE_URL", "http://127.0.0.1:9")  # connection errors carry URLs
        monkeypatch.setenv("SOURCES__POLYGON__MAX_ATTEMPTS", "1")
        assert run(db_url, "--verbose", "--force")[0] == 1
    out = capsys.readouterr()
    # every record but the simulator's own access log (it plays the provider, which sees the key)
    ours = [f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records if not r.name.startswith("loaders.simulator")]
    assert len(ours) > 15 and KEY not in " ".join(ours) + out.out + out.err
    leaks = [p for p in tmp_path.rglob("*") if p.is_file() and KEY.encode() in p.read_bytes()]
    assert list(tmp_path.glob(".kapman/dlt/options_chains/*")) and leaks == []
    dump = query(database, "select string_agg(t::text, ' ') from (select * from ingestion_ledger) t")[0][0]
    dump += str(query(database, "select * from _dlt_pipeline_state")) + str(query(database, "select * from _dlt_loads"))
    assert KEY not in dump


# --- the dlt CLI plugin -------------------------------------------------------------------------

def _dlt(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "dlt"), *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)})


def test_dlt_pipeline_run_is_kapman_ingest(database, db_url, tmp_path) -> None:
    helped = _dlt("pipeline", "run", "--help", cwd=PROJECT_DIR)
    assert helped.returncode == 0
    for flag in ("--as-of", "--start-date", "--snapshot-time", "--symbols", "--concurrency", "--force",
                 "--provider", "--db-url", "--heartbeat", "--summary-json", "--dry-run", "--quiet"):
        assert flag in helped.stdout
    watch(database, ("a", "F"), ("a", "KO"))
    done = _dlt("pipeline", "options_chains", "run", "--provider", "simulator", "--as-of", "2025-06-02",
                "--symbols", "F", "--db-url", db_url, "--summary-json", "s.json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ingest END finished" in done.stderr and json.loads((tmp_path / "s.json").read_text())["symbols_ok"] == 1
    assert query(database, "select distinct k.symbol from options_chains c join tickers k on k.id = c.ticker_id") == \
        [("F",)]
    usage = _dlt("pipeline", "run", "--as-of", "2025-06-02", "--start-date", "2025-06-02", cwd=tmp_path)
    assert usage.returncode == 2 and "--as-of cannot be combined" in usage.stderr
