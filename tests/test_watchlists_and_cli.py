"""Watchlist files, the trading calendar and argparse rules."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from loaders import cli
from loaders.trading_calendar import latest_trading_date, snapshot_time, trading_days
from tests.conftest import query


def test_watchlist_load_upper_cases_trims_and_deactivates(database, db_url, tmp_path) -> None:
    path = tmp_path / "core.txt"
    path.write_text("# my names\n aapl \nMSFT # big\n\nmsft\nspy\n")
    assert cli.main(["watchlists", "load", str(path), "--db-url", db_url]) == 0
    rows = query(database, "select symbol, active from watchlists where watchlist_id = 'core' order by 1")
    assert rows == [("AAPL", True), ("MSFT", True), ("SPY", True)]
    path.write_text("AAPL\nNVDA\n")
    assert cli.main(["watchlists", "load", str(path), "--db-url", db_url]) == 0
    assert cli.main(["watchlists", "load", str(path), "--db-url", db_url]) == 0  # idempotent
    rows = query(database, "select symbol, active from watchlists where watchlist_id = 'core' order by 1")
    assert rows == [("AAPL", True), ("MSFT", False), ("NVDA", True), ("SPY", False)]
    path.write_text("AAPL\nNVDA\nMSFT\n")
    cli.main(["watchlists", "load", str(path), "--db-url", db_url])
    assert query(database, "select active from watchlists where symbol = 'MSFT'") == [(True,)]


def test_unreadable_watchlist_is_named_and_loads_nothing(database, db_url, tmp_path, caplog) -> None:
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("AAPL\n")
    bad.write_bytes(b"AAPL\n\xff\xfe broken\n")
    missing = tmp_path / "missing.txt"
    assert cli.main(["watchlists", "load", str(good), str(bad), str(missing), "--db-url", db_url]) == 1
    assert query(database, "select distinct watchlist_id from watchlists") == [("good",)]
    assert "bad.txt" in caplog.text and "missing.txt" in caplog.text


def test_trading_days_skip_weekends_and_holidays() -> None:
    days = trading_days(date(2025, 12, 22), date(2026, 1, 5))
    assert date(2025, 12, 25) not in days and date(2026, 1, 1) not in days
    assert date(2025, 12, 27) not in days  # Saturday
    assert days == sorted(days) and len(days) == 9
    assert latest_trading_date(datetime(2025, 12, 28, 15, tzinfo=UTC)) == date(2025, 12, 26)
    # 01:00 UTC on a Tuesday is still Monday evening in New York.
    assert latest_trading_date(datetime(2025, 12, 23, 1, tzinfo=UTC)) == date(2025, 12, 22)
    assert snapshot_time(date(2025, 12, 19)).isoformat() == "2025-12-19T23:59:59.999999+00:00"


@pytest.mark.parametrize("argv", [
    ["ingest", "--as-of", "2025-01-02", "--start-date", "2025-01-02", "--end-date", "2025-01-03"],
    ["ingest", "--start-date", "2025-01-02"],
    ["ingest", "--start-date", "2025-01-03", "--end-date", "2025-01-02"],
    ["ingest", "--start-date", "2025-01-02", "--end-date", "2025-01-03", "--snapshot-time", "2025-01-02T20:00:00Z"],
    ["ingest", "--concurrency", "0"], ["ingest", "--concurrency", "33"], ["ingest", "--as-of", "2025-13-01"],
    ["ingest", "--provider", "bloomberg"], ["ingest", "--snapshot-time", "2025-01-02T20:00:00"],
    ["metrics", "--start-date", "2025-01-02"], ["metrics", "--quiet", "--debug"],
    ["frobnicate"],
])
def test_bad_flags_are_usage_errors(argv, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
