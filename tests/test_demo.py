"""`kapman demo`: a short end-to-end run in a fresh working directory (embedded database, simulator)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import pytest

from loaders.demo import DEMO_SYMBOLS, NOTICE, demo_dates
from loaders.trading_calendar import is_trading_day, latest_trading_date


@pytest.mark.parametrize("days", [1, 3, 60, 400])
def test_demo_dates_are_the_last_n_trading_days(days: int) -> None:
    dates = demo_dates(days, end=date(2025, 12, 26))
    assert len(dates) == days and dates[-1] == date(2025, 12, 26)
    assert all(is_trading_day(d) for d in dates) and dates == sorted(set(dates))


def test_demo_runs_end_to_end_and_says_the_data_is_simulated(tmp_path) -> None:
    """One run covers both ways in: its first day reconstructed (`--history 1`), the others from
    snapshots; the report and the closing lines say which was which."""
    # The demo always uses its own embedded database and its own simulator: a DATABASE_URL and a
    # Polygon origin of the user's are left alone (port 9: nothing listens, a request would fail).
    env = os.environ | {"DATABASE_URL": "postgresql://nobody:secret@127.0.0.1:9/not_used",
                        "POLYGON_BASE_URL": "http://127.0.0.1:9", "POLYGON_API_KEY": "the-users-key",
                        "SOURCES__POLYGON__POLYGON_BASE_URL": "http://127.0.0.1:9"}
    done = subprocess.run(
        [sys.executable, "-m", "loaders.cli", "demo", "--days", "3", "--history", "1"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    out = done.stdout.strip()
    assert out.startswith(NOTICE) and out.endswith(NOTICE), out
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines() if line.split()[:1] and line.split()[0] in DEMO_SYMBOLS}
    assert rows == dict.fromkeys(DEMO_SYMBOLS, "SUCCESS"), out
    report = tmp_path / "report" / "report.html"
    assert str(report.resolve()) in out
    page = report.read_text(encoding="utf-8")
    assert "SIMULATED DATA" in page and all(symbol in page for symbol in DEMO_SYMBOLS)
    assert (tmp_path / "report" / "I_SPX.png").exists()
    assert (tmp_path / ".kapman" / "demo" / "watchlist-demo.txt").exists()
    assert "[5/5]" in done.stderr and "127.0.0.1:9" not in done.stderr
    # What it says it reconstructed is what options_chains.source holds, day by day.
    first, *rest = demo_dates(3, end=latest_trading_date())
    said = {line.split(":")[0]: line for line in out.splitlines() if "contract rows" in line}
    assert said.keys() == {f"1 trading day(s), {first.isoformat()}", f"2 trading day(s), {rest[0]} to {rest[1]}"}
    assert "reconstructed from historical prices" in said[f"1 trading day(s), {first.isoformat()}"]
    assert "from option-chain snapshots" in said[f"2 trading day(s), {rest[0]} to {rest[1]}"]
    assert f"Reconstructed: {len(DEMO_SYMBOLS)} symbol-days on 1 trading day ({first.isoformat()})" in page


def test_history_must_leave_the_latest_day_to_a_snapshot(tmp_path) -> None:
    done = subprocess.run([sys.executable, "-m", "loaders.cli", "demo", "--days", "3", "--history", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "--history 3 must be less than --days 3" in done.stderr
    assert not (tmp_path / ".kapman").exists()  # refused before anything started


def test_the_reconstruction_step_points_every_setting_at_the_simulator_and_restores_them(monkeypatch) -> None:
    import requests

    from loaders import demo
    from loaders.polygon import polygon_configuration

    monkeypatch.setenv("SOURCES__POLYGON__POLYGON_BASE_URL", "https://api.polygon.io")
    monkeypatch.setenv("POLYGON_API_KEY", "the-users-real-key")
    monkeypatch.setenv("POLYGON_REQUESTS_PER_MINUTE", "5")
    before = dict(os.environ)
    with demo._simulated_polygon():
        config = polygon_configuration()
        assert config.polygon_base_url.startswith("http://127.0.0.1:")
        assert config.polygon_api_key and config.polygon_api_key != "the-users-real-key"
        assert config.request_limit is None
        answer = requests.get(f"{config.polygon_base_url}/v3/reference/options/contracts",
                              params={"underlying_ticker": "AAPL", "as_of": "2025-12-18", "limit": 5},
                              headers={"Authorization": f"Bearer {config.polygon_api_key}"}, timeout=30)
        assert answer.status_code == 200 and len(answer.json()["results"]) == 5
    assert dict(os.environ) == before
