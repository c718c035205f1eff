"""`kapman metrics`: publishing, re-runs, --fill-missing, per-ticker errors, logging, exit codes."""

from __future__ import annotations

import json
import logging
from datetime import date, timedelta

import pytest

from loaders import db as dbmod
from loaders import metrics
from tests.conftest import query
from tests.metrics_reference import Contract
from tests.metrics_support import (  # noqa: F401  (fixtures)
    add_watchlist,
    dbt_artifacts_in_tmp,
    documents,
    insert_chain,
    run_metrics,
)

D = date(2025, 12, 19)
S = "2025-12-19 23:59:59.999999+00"


def _chain(iv: float) -> list[Contract]:
    return [Contract("C", D + timedelta(days=30), iv, 0.5, 10, 2),
            Contract("P", D + timedelta(days=30), iv + 0.02, -0.5, 20, 1)]


def _snapshot_rows(database: dbmod.Database) -> dict[str, tuple]:
    rows = query(database, "select t.symbol, d.volatility_metrics_json::text, d.metrics_model_version,"
                      " d.metrics_updated_at, d.analyst_note from daily_snapshots d"
                      " join tickers t on t.id = d.ticker_id")
    return {r[0]: r[1:] for r in rows}


def test_publishes_every_ticker_logs_start_end_and_reruns_byte_identical(database, tmp_path, caplog) -> None:
    insert_chain(database, "AAA", D, _chain(0.3))
    insert_chain(database, "BBB", D, _chain(0.4))
    add_watchlist(database, ["CCC"])  # no options data at all
    add_watchlist(database, ["DDD"], watchlist="other")
    with database.connect() as conn, conn.cursor() as cur:
        # Another system's column and row: never touched.
        cur.execute("alter table daily_snapshots add column analyst_note text")
        cur.execute("insert into daily_snapshots (time, ticker_id, analyst_note)"
                    " select %s, id, 'keep me' from tickers where symbol = 'AAA'", (S,))
    summary = tmp_path / "summary.json"
    with caplog.at_level(logging.INFO):
        assert run_metrics(database, "--date", "2025-12-19", "--summary-json", str(summary)) == 0
    assert "START metrics dates=2025-12-19..2025-12-19" in caplog.text and "tickers=4" in caplog.text
    assert "END metrics processed=4 success=2 missing_options=2 partial=0 errors=0" in caplog.text
    assert "CCC 2025-12-19: no options snapshot" in caplog.text  # an expected gap, at INFO
    assert json.loads(summary.read_text())["success"] == 2

    first = _snapshot_rows(database)
    assert set(first) == {"AAA", "BBB", "CCC", "DDD"}
    assert first["AAA"][3] == "keep me"
    version = metrics.model_version()
    assert all(row[1] == version and json.loads(row[0])["model_version"] == version for row in first.values())
    assert json.loads(first["CCC"][0])["status"] == "MISSING_OPTIONS"

    caplog.clear()
    assert run_metrics(database, "--date", "2025-12-19", "--quiet") == 0
    assert _snapshot_rows(database) == first  # same bytes, same metrics_updated_at: nothing rewritten
    assert "START" in caplog.text and "END" in caplog.text and "no options snapshot" not in caplog.text


def test_fill_missing_only_fills_missing_json(database) -> None:
    insert_chain(database, "AAA", D, _chain(0.3))
    insert_chain(database, "BBB", D, _chain(0.4))
    insert_chain(database, "CCC", D, _chain(0.5))
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("insert into daily_snapshots (time, ticker_id, volatility_metrics_json, metrics_model_version)"
                    " select %s, id, case symbol when 'AAA' then '{\"status\": \"OLD\"}'::jsonb"
                    " when 'BBB' then 'null'::jsonb end, 'someone else' from tickers"
                    " where symbol in ('AAA', 'BBB')", (S,))
    assert run_metrics(database, "--date", "2025-12-19", "--fill-missing") == 0
    rows = {s: (json.loads(j) if j else None, v) for s, j, v in query(
        database, "select t.symbol, d.volatility_metrics_json::text, d.metrics_model_version"
        " from daily_snapshots d join tickers t on t.id = d.ticker_id")}
    assert rows["AAA"] == ({"status": "OLD"}, "someone else")  # existing JSON untouched
    assert rows["BBB"][0]["status"] == "SUCCESS" and rows["CCC"][0]["status"] == "SUCCESS"
    assert rows["BBB"][0]["metrics"]["average_iv"] == pytest.approx((0.4 * 10 + 0.42 * 20) / 30, abs=1e-6)


def test_one_tickers_failure_does_not_stop_the_batch(database, caplog) -> None:
    insert_chain(database, "AAA", D, _chain(0.3))
    insert_chain(database, "BAD", D, _chain(0.4))
    insert_chain(database, "CCC", D, _chain(0.5))
    with database.connect() as conn, conn.cursor() as cur:
        # Another system's rule rejects BAD's document; an ERROR document is still accepted.
        cur.execute("""
            create function reject_bad() returns trigger language plpgsql as $$
            begin
                if new.ticker_id = (select id from tickers where symbol = 'BAD')
                   and new.volatility_metrics_json->>'status' <> 'ERROR' then
                    raise exception 'rejected by a downstream rule';
                end if;
                return new;
            end $$;
            create trigger reject_bad before insert or update on daily_snapshots
                for each row execute function reject_bad();
        """)
    assert run_metrics(database, "--date", "2025-12-19") == 0
    published = documents(database)
    assert published[("AAA", D)]["status"] == "SUCCESS" and published[("CCC", D)]["status"] == "SUCCESS"
    bad = published[("BAD", D)]
    assert bad["status"] == "ERROR" and set(bad["metrics"].values()) == {None}
    assert bad["diagnostics"] == ["error:rejected by a downstream rule"]
    assert "errors=1" in caplog.text


def test_range_logs_heartbeats_and_debug_detail(database, caplog) -> None:
    for symbol in ("AAA", "BBB", "CCC"):
        insert_chain(database, symbol, D, _chain(0.3))
    with caplog.at_level(logging.DEBUG):
        assert run_metrics(database, "--start-date", "2025-12-15", "--end-date", "2025-12-19",
                           "--heartbeat", "4", "--debug") == 0
    assert caplog.text.count("HEARTBEAT") == 3  # 15 ticker-dates, every 4th (not the last)
    assert "AAA 2025-12-19 SUCCESS atm_iv_30d=0.3" in caplog.text
    assert "END metrics processed=15 success=3 missing_options=12" in caplog.text


def test_no_trading_date_in_range_finishes_with_nothing_to_do(database, caplog) -> None:
    add_watchlist(database, ["AAA"])
    assert run_metrics(database, "--date", "2025-12-20") == 0  # a Saturday
    assert "no trading dates" in caplog.text and "processed=0" in caplog.text


def test_lock_held_exits_3(database) -> None:
    add_watchlist(database, ["AAA"])
    with database.connect(autocommit=True) as conn, dbmod.advisory_lock(conn, "metrics") as got:
        assert got
        assert run_metrics(database, "--date", "2025-12-19") == 3
    assert documents(database) == {}


def test_unreachable_database_exits_1(tmp_path, caplog) -> None:
    url = f"postgresql://postgres:x@{str(tmp_path).replace('/', '%2F')}:5432/nothing"
    assert metrics_main(["--db-url", url, "--date", "2025-12-19"]) == 1
    assert "cannot connect" in caplog.text


def test_dbt_failure_exits_1_and_publishes_nothing(database, caplog) -> None:
    insert_chain(database, "AAA", D, _chain(0.3))
    assert run_metrics(database, "--date", "2025-12-18") == 0
    # A row no valid run can produce breaks a data test of the mart: dbt fails, nothing is published.
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("update analytics.volatility_metrics set iv_rank = 150")
    assert run_metrics(database, "--date", "2025-12-19") == 1
    assert "dbt build failed" in caplog.text and "within_range" in caplog.text
    assert ("AAA", D) not in documents(database)


def metrics_main(argv: list[str]) -> int:
    from loaders import cli

    return cli.main(["metrics", *argv])
