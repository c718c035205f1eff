"""`kapman report`: the HTML and PNG files from hand-made daily_snapshots rows, rendered in headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from datetime import date, timedelta

import numpy as np
import pytest
from matplotlib import image as mpimg

from loaders import cli
from loaders.report import COLUMNS, RANK_KEYS, file_stem
from loaders.trading_calendar import snapshot_time, trading_days
from tests.conftest import query

SYMBOLS = ("I:SPX", "AAPL")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _metrics_doc(symbol: str, day: date, i: int) -> dict:
    """A volatility_metrics_json document of the spec's shape; the last-but-two AAPL day is missing."""
    if symbol == "AAPL" and i == 27:
        return {"status": "MISSING_OPTIONS", "as_of": day.isoformat(), "options_snapshot_time": None,
                "metrics": dict.fromkeys(("average_iv", "iv_rank", "iv_skew"), None),
                "counts": {}, "diagnostics": ["missing_options_data"], "model_version": "test"}
    base = 0.16 if symbol == "I:SPX" else 0.28
    avg = round(base + 0.03 * math.sin(i / 4), 6)
    history = i >= 20
    return {
        "status": "SUCCESS", "as_of": day.isoformat(),
        "options_snapshot_time": snapshot_time(day).isoformat(),
        "metrics": {
            "average_iv": avg, "iv_rank": round(50 + 45 * math.sin(i / 4), 6) if history else None,
            "iv_percentile": 60.0 if history else None,
            "iv_rank_30d": round(50 + 40 * math.cos(i / 5), 6) if history else None,
            "iv_percentile_30d": 55.0 if history else None,
            "put_call_ratio_oi": 1.31 if symbol == "I:SPX" else 0.74, "put_call_ratio_volume": 1.05,
            "oi_ratio": 0.08, "atm_iv_30d": round(avg - 0.01, 6), "atm_iv_90d": round(avg + 0.004 - 0.002 * (i % 7), 6),
            "iv_term_structure": round(0.014 - 0.002 * (i % 7), 6), "iv_skew": round(0.04 + 0.01 * math.cos(i / 3), 6),
        },
        "counts": {"contracts": 1840, "contracts_with_iv": 1702, "calls": 920, "puts": 920, "expiries": 14},
        "diagnostics": ["insufficient_iv_history"] if not history else [], "model_version": "test",
    }


def _write_documents(database, document) -> list[date]:
    """30 trading days of `document(symbol, day, i)` per symbol in daily_snapshots; the days."""
    days = trading_days(date(2025, 11, 1), date(2025, 12, 31))[:30]
    with database.connect() as conn, conn.cursor() as cur:
        for symbol in SYMBOLS:
            cur.execute("insert into tickers (symbol) values (%s) returning id", (symbol,))
            ticker_id = cur.fetchone()[0]
            for i, day in enumerate(days):
                cur.execute(
                    "insert into daily_snapshots (time, ticker_id, volatility_metrics_json) values (%s, %s, %s)",
                    (snapshot_time(day), ticker_id, json.dumps(document(symbol, day, i))),
                )
    return days


@pytest.fixture
def report_dir(database, db_url, tmp_path):
    """30 trading days of metrics for two tickers, and the report written from them."""
    days = _write_documents(database, _metrics_doc)
    with database.connect() as conn, conn.cursor() as cur:
        for (ticker_id,) in query(database, "select id from tickers"):
            # A row of another system's, without metrics: not in the report.
            cur.execute("insert into daily_snapshots (time, ticker_id) values (%s, %s)",
                        (snapshot_time(days[-1] + timedelta(days=1)), ticker_id))
    out = tmp_path / "report"
    assert cli.main(["report", "--db-url", db_url, "--output", str(out)]) == 0
    return out


def test_report_is_self_contained_with_a_table_and_charts(report_dir, database) -> None:
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I), "loads something from the network"
    assert '<table class="metrics">' in page and "Latest metrics (2025-12-15)" in page
    for symbol in SYMBOLS:
        assert f">{symbol}</a>" in page and f">{symbol}</h2>" in page
    assert page.count('src="data:image/png;base64,') == len(SYMBOLS)
    assert "MISSING_OPTIONS" not in page.split("<tbody>")[1].split("</tbody>")[0]  # latest rows only
    assert "SIMULATED DATA" not in page  # nothing says so
    last_spx = _metrics_doc("I:SPX", date(2025, 12, 15), 29)["metrics"]
    assert f"<td>{last_spx['average_iv'] * 100:.1f}%</td>" in page
    assert f"<td>{last_spx['iv_skew'] * 100:+.2f}</td>" in page
    for symbol in SYMBOLS:
        png = report_dir / f"{file_stem(symbol)}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert mpimg.imread(png).shape[1] > 800
    assert (report_dir / "I_SPX.png").exists()


def test_empty_database_gives_a_clear_empty_report(database, db_url, tmp_path) -> None:
    out = tmp_path / "empty"
    assert cli.main(["report", "--db-url", db_url, "--output", str(out)]) == 0
    page = (out / "report.html").read_text(encoding="utf-8")
    assert "No volatility metrics in the database yet" in page
    assert list(out.glob("*.png")) == []


def test_simulated_data_is_flagged(database, db_url, tmp_path) -> None:
    watchlist = tmp_path / "watchlist-demo.txt"
    watchlist.write_text("AAPL\n")
    assert cli.main(["watchlists", "load", str(watchlist), "--db-url", db_url]) == 0
    assert query(database, "select count(*) from watchlists") == [(1,)]
    out = tmp_path / "sim"
    assert cli.main(["report", "--db-url", db_url, "--output", str(out)]) == 0
    assert "SIMULATED DATA" in (out / "report.html").read_text(encoding="utf-8")


def test_file_stems_are_safe_and_unique() -> None:
    taken: set[str] = set()
    assert [file_stem(s, taken) for s in ("I:SPX", "BRK.B", "I_SPX", "../x")] == ["I_SPX", "BRK.B", "I_SPX-2", "_x"]


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no chromium on PATH: `make browser` installs Debian's chromium")
def test_report_renders_in_headless_chromium(report_dir, tmp_path) -> None:
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
         "--window-size=1280,2000", (report_dir / "report.html").resolve().as_uri()],
        check=True, capture_output=True, timeout=120,
    )
    pixels = mpimg.imread(shot)[..., :3]
    assert pixels.shape[:2] == (2000, 1280)
    non_white = (pixels < 0.95).any(axis=-1).mean()
    assert non_white > 0.05, f"the page looks blank ({non_white:.1%} non-white pixels)"
    assert float(np.std(pixels)) > 0.05


# --- reconstructed days (issue 14) ------------------------------------------------------------------

AMBER = np.array([0xF2, 0xC1, 0x4E]) / 255  # report_charts.RECONSTRUCTED_SHADE
RANK_COLUMNS = sum(key in RANK_KEYS for _, key, _, _ in COLUMNS)  # iv_rank, iv_percentile, iv_rank_30d


def _reconstructed_doc(symbol: str, day: date, i: int, reconstructed_until: int) -> dict:
    """_metrics_doc with the diagnostics the metrics give a reconstructed chain, and a rank over a
    history that holds one."""
    doc = _metrics_doc(symbol, day, i)
    if doc["status"] == "SUCCESS":
        marks = ["reconstructed_chain"] if i < reconstructed_until else []
        if doc["metrics"]["iv_rank"] is not None:
            marks.append("history_includes_reconstructed")
        doc["diagnostics"] = sorted(doc["diagnostics"] + marks)
    return doc


@pytest.fixture
def reconstructed_dir(database, db_url, tmp_path):
    """I:SPX: its first 10 of 30 days reconstructed; AAPL: every day, its latest too."""
    until = {"I:SPX": 10, "AAPL": 30}
    days = _write_documents(database, lambda symbol, day, i: _reconstructed_doc(symbol, day, i, until[symbol]))
    out = tmp_path / "reconstructed"
    assert cli.main(["report", "--db-url", db_url, "--output", str(out)]) == 0
    return out, days


def _amber_share(png) -> float:
    pixels = mpimg.imread(png)[..., :3]
    # The band is the amber at alpha 0.22 over white: a pale amber, whatever the series over it.
    pale = 1 - 0.22 * (1 - AMBER)
    return float((np.abs(pixels - pale).max(axis=-1) < 0.02).mean())


def test_reconstructed_days_are_marked_in_the_table_the_charts_and_a_legend(reconstructed_dir, database,
                                                                          tmp_path) -> None:
    out, days = reconstructed_dir
    page = (out / "report.html").read_text(encoding="utf-8")
    body = page.split("<tbody>")[1].split("</tbody>")[0]
    spx_row, aapl_row = (next(r for r in body.split("<tr")[1:] if f">{s}</a>" in r) for s in SYMBOLS)
    # AAPL's latest day was reconstructed: an amber row with a tag; I:SPX's was a snapshot.
    assert aapl_row.startswith(' class="reconstructed"') and ">reconstructed</span>" in aapl_row
    assert "reconstructed</span>" not in spx_row and not spx_row.startswith(' class="reconstructed"')
    # Both rank against reconstructed days: every rank and percentile cell carries the mark.
    for row in (spx_row, aapl_row):
        assert row.count('<span class="mark"') == RANK_COLUMNS
    assert "the day&#x27;s chain was reconstructed" in page or "the day's chain was reconstructed" in page
    assert "a rank or percentile over a history that includes reconstructed days" in page
    marked = sum("reconstructed_chain" in _reconstructed_doc(s, d, i, n)["diagnostics"]
                 for s, n in (("I:SPX", 10), ("AAPL", 30)) for i, d in enumerate(days))
    assert marked == 39  # AAPL's day without options has no chain to reconstruct
    note = (f"Reconstructed: {marked} symbol-days on 29 trading days ({days[0].isoformat()} to "
            f"{days[-1].isoformat()})")
    assert note in page
    # The charts: an amber band over the reconstructed days, none on a report without any.
    assert _amber_share(out / "I_SPX.png") > 0.01
    assert _amber_share(out / "AAPL.png") > 3 * _amber_share(out / "I_SPX.png")
    # The same rows without the diagnostics: no band, no mark, no note.
    with database.connect() as conn, conn.cursor() as cur:
        cur.execute("update daily_snapshots set volatility_metrics_json = volatility_metrics_json"
                    " || jsonb_build_object('diagnostics', '[]'::jsonb)")
    plain_dir = tmp_path / "plain"
    assert cli.main(["report", "--db-url", database.url(), "--output", str(plain_dir)]) == 0
    assert _amber_share(plain_dir / "I_SPX.png") < 0.001 and _amber_share(plain_dir / "AAPL.png") < 0.001
    plain = (plain_dir / "report.html").read_text(encoding="utf-8")
    assert "reconstructed" not in plain.split("</style>")[1] and 'class="mark"' not in plain


def test_the_terminal_table_marks_reconstructed_days_and_ranks(reconstructed_dir, database) -> None:
    from loaders.report import load_history, text_table

    latest = {symbol: snaps[-1] for symbol, snaps in load_history(database).items()}
    table = text_table(latest)
    lines = {line.split()[0]: line for line in table.splitlines() if line.split()[:1] and line.split()[0] in SYMBOLS}
    assert lines["AAPL"].split()[2:4] == [latest["AAPL"].day.isoformat(), "R"]
    assert latest["I:SPX"].day.isoformat() + " R" not in lines["I:SPX"]
    assert lines["I:SPX"].count("*") == RANK_COLUMNS and lines["AAPL"].count("*") == RANK_COLUMNS
    assert "R = the day's chain was reconstructed" in table and "* = ranked against" in table
