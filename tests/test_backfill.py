"""Range backfill: date expansion, argparse rules, failed days, the ledger's
skip/retry, the live provider's days (past ones reconstructed, later ones refused), overlapping ranges."""

from __future__ import annotations

import argparse
import logging
from datetime import date, timedelta

import pytest

from loaders import cli, ingest
from loaders.polygon import ChainClient, ChainResult
from loaders.trading_calendar import snapshot_time, trading_days
from tests.conftest import FROZEN_TODAY, query
from tests.test_ingest import _workdir, count, live, run, watch  # noqa: F401 (fixtures)

TODAY = FROZEN_TODAY  # a trading day: the frozen today of tests/conftest.py


def _args(**kwargs: object) -> argparse.Namespace:
    return argparse.Namespace(**({"as_of": None, "start_date": None, "end_date": None} | kwargs))


def test_dates_expand_to_trading_days_oldest_first(caplog) -> None:
    caplog.set_level(logging.INFO)
    days = ingest.resolve_days(_args(start_date=date(2025, 12, 22), end_date=date(2026, 1, 5)))
    assert days == trading_days(date(2025, 12, 22), date(2026, 1, 5)) and len(days) == 9
    assert date(2025, 12, 25) not in days and days == sorted(days)
    assert "9 trading days resolved (6 weekend/holiday days skipped)" in caplog.text
    assert ingest.resolve_days(_args()) == [TODAY]
    assert ingest.resolve_days(_args(as_of=date(2025, 6, 2))) == [date(2025, 6, 2)]
    with pytest.raises(ingest.IngestError, match="not an NYSE trading day"):
        ingest.resolve_days(_args(as_of=date(2025, 12, 25)))


@pytest.mark.parametrize("argv", [
    ["--as-of", "2025-06-02", "--start-date", "2025-06-02", "--end-date", "2025-06-03"],
    ["--as-of", "2025-06-02", "--end-date", "2025-06-03"],
    ["--start-date", "2025-06-02"], ["--end-date", "2025-06-02"],
    ["--start-date", "2025-06-03", "--end-date", "2025-06-02"],
    ["--start-date", "2025-06-02", "--end-date", "2025-06-03", "--snapshot-time", "2025-06-02T20:00:00Z"],
])
def test_invalid_date_combinations_are_usage_errors(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["ingest", *argv])
    assert exc.value.code == 2 and "error:" in capsys.readouterr().err


def test_a_failed_day_neither_stops_the_range_nor_fails_it(database, db_url, monkeypatch) -> None:
    watch(database, ("a", "F"), ("a", "KO"))
    failing = {date(2025, 6, 6)}  # every fetch of these days fails
    fetch = ChainClient.fetch

    def fetch_or_fail(client, symbol, ticker_id, snapshot, expirations=None):
        if date.fromisoformat(client.extra_params["date"]) in failing:
            return ChainResult(symbol, ticker_id, snapshot_time=snapshot, error="HTTP 503 after retries")
        return fetch(client, symbol, ticker_id, snapshot, expirations)

    monkeypatch.setattr(ChainClient, "fetch", fetch_or_fail)
    code, summary = run(db_url, "--provider", "simulator", "--start-date", "2025-06-05", "--end-date", "2025-06-10")
    days = [date(2025, 6, 5), date(2025, 6, 6), date(2025, 6, 9), date(2025, 6, 10)]
    assert code == 0  # a failed day does not stop the range, nor fail it
    assert [(d["date"], d["outcome"], d["error"]) for d in summary["days"]] == [
        (day.isoformat(), "failed" if day in failing else "succeeded", "every symbol failed" if day in failing else None)
        for day in days]
    assert (summary["days_attempted"], summary["days_succeeded"], summary["days_failed"]) == (4, 3, 1)
    assert query(database, "select distinct time from options_chains order by 1") == \
        [(snapshot_time(d),) for d in days if d not in failing]
    failing.add(date(2025, 6, 5))
    code, summary = run(db_url, "--provider", "simulator", "--start-date", "2025-06-05", "--end-date", "2025-06-06",
                        "--force")
    assert code == 1 and summary["days_failed"] == 2  # every day failed: the run fails


def test_completed_pairs_are_skipped_failed_and_partial_ones_retried(database, db_url, caplog) -> None:
    watch(database, ("a", "F"), ("a", "KO"))
    span = ["--provider", "simulator", "--start-date", "2025-06-05", "--end-date", "2025-06-06"]
    code, first = run(db_url, *span)
    assert code == 0 and first["symbols_ok"] == 4
    query(database, "update ingestion_ledger set status = 'failed' where symbol = 'KO' and snapshot_time = %s",
          (snapshot_time(date(2025, 6, 6)),))
    query(database, "update ingestion_ledger set status = 'running' where symbol = 'F' and snapshot_time = %s",
          (snapshot_time(date(2025, 6, 5)),))
    caplog.clear()
    code, again = run(db_url, *span, "--verbose")
    assert code == 0 and (again["symbols_ok"], again["symbols_skipped"]) == (2, 2)
    assert {(s["day"], s["symbol"]) for s in again["symbols"] if s["outcome"] == "ok"} == \
        {("2025-06-06", "KO"), ("2025-06-05", "F")}
    assert "2025-06-05 KO skipped: the ledger says" in caplog.text
    assert any(r.levelno == logging.DEBUG and "skipped: the ledger says" in r.getMessage() for r in caplog.records)
    assert again["rows_written"] == 0  # same chains: nothing changed
    code, forced = run(db_url, *span, "--force")
    assert code == 0 and forced["symbols_ok"] == 4 and forced["days_skipped"] == 0
    assert count(database, "select count(*) from ingestion_ledger where status = 'completed'") == 4


def test_the_live_provider_reconstructs_past_days_and_refuses_later_ones(database, db_url, live, caplog) -> None:  # noqa: F811
    watch(database, ("a", "F"))
    past = trading_days(TODAY - timedelta(days=10), TODAY)[-3:]
    later = trading_days(TODAY + timedelta(days=1), TODAY + timedelta(days=10))[:2]
    code, summary = run(db_url, "--start-date", past[0].isoformat(), "--end-date", later[-1].isoformat())
    assert code == 0 and [d["outcome"] for d in summary["days"]] == ["succeeded"] * 3 + ["failed"] * 2
    assert f"{later[0]} is after the current trading date {TODAY}" in caplog.text
    # today from the live snapshot, the days before it rebuilt from history (tests/test_history.py)
    assert query(database, "select time, source from options_chains group by 1, 2 order by 1") == \
        [(snapshot_time(past[0]), "reconstructed"), (snapshot_time(past[1]), "reconstructed"),
         (snapshot_time(TODAY), "snapshot")]
    assert not any("date" in r.query for r in live.requests)  # the live snapshot has no date


def test_overlapping_ranges_give_one_snapshot_per_trading_day_and_no_duplicates(database, db_url, capsys,
                                                                               monkeypatch) -> None:
    monkeypatch.setattr(ingest.flow, "LOAD_BATCH_SYMBOLS", 1)  # two loads a day, each fetched ahead of its load
    watch(database, ("a", "F"), ("a", "KO"))
    code, first = run(db_url, "--provider", "simulator", "--start-date", "2025-06-04", "--end-date", "2025-06-06",
                      "--heartbeat", "1")
    assert code == 0 and first["days_succeeded"] == 3
    assert "HEARTBEAT 1/6 symbols" in capsys.readouterr().err
    code, second = run(db_url, "--provider", "simulator", "--start-date", "2025-06-05", "--end-date", "2025-06-10",
                       "--quiet")
    assert code == 0 and (second["days_skipped"], second["days_succeeded"]) == (2, 2)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(" SUMMARY " in line or " ERROR " in line for line in lines)  # --quiet
    times = query(database, "select distinct time from options_chains order by 1")
    assert [t for (t,) in times] == [snapshot_time(d) for d in trading_days(date(2025, 6, 4), date(2025, 6, 10))]
    assert count(database, "select count(*) from (select 1 from options_chains group by time, contract_ticker"
                           " having count(*) > 1) d") == 0
    assert (second["symbols_ok"], second["symbols_skipped"]) == (4, 4)
