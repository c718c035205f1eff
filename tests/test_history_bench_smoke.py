"""bench/history_bench.py at smoke size: both ingestions, the inversion rate and the metrics
comparison run, print their figures and write the `history` section. Figures are not asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from loaders import db as dbmod

PROJECT_DIR = Path(__file__).resolve().parent.parent


def test_history_bench_quick_prints_figures_and_writes_its_section(pg_server: dbmod.Database, tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    results.write_text("# Benchmark results\n\nhand-written notes stay\n\n<!-- bench:ingest -->\nkept\n<!-- /bench:ingest -->\n")
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "bench" / "history_bench.py"), "--quick", "--results", str(results)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
        env=os.environ | {"DATABASE_URL": pg_server.url()},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for figure in ("simulator     5 (symbol, day)s", "polygon       5 (symbol, day)s", "reconstructed / snapshots =",
                   "requests (aggregates", "inversions/s", "reconstruct_day AAPL", "atm_iv_30d   over 2 days",
                   "load average at the end"):
        assert figure in out, f"{figure!r} not printed:\n{out}"
    text = results.read_text()
    assert "hand-written notes stay" in text and "<!-- bench:ingest -->\nkept\n" in text
    section = text.split("<!-- bench:history -->")[1].split("<!-- /bench:history -->")[0]
    assert "| `--provider polygon` (reconstruction) | 5 |" in section
    assert "| `--provider simulator` (snapshots) | 5 |" in section
    assert "reconstruction / snapshots:" in section and "contracts/s**" in section
    # At smoke size no date has 20 days of history: the rank is said to be unmeasured, not missed.
    assert "| iv_rank_30d | 0 | - | - | not measured" in section
