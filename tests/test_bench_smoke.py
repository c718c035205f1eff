"""`make bench` at smoke size: every benchmark runs, prints its figures and writes its section of
the results file. Figures are not asserted (benchmarks are scripts, never timed tests)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from loaders import db as dbmod

PROJECT_DIR = Path(__file__).resolve().parent.parent


def test_bench_quick_prints_figures_and_writes_results(pg_server: dbmod.Database, tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    results.write_text("# Benchmark results\n\nhand-written notes stay\n")
    done = subprocess.run(
        [sys.executable, str(PROJECT_DIR / "bench" / "run.py"), "--quick", "--results", str(results)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env=os.environ | {"DATABASE_URL": pg_server.url()},
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    for figure in ("kapman ingest", "plain loader", "rows/s", "peak RSS", "project / plain =",
                   "history   1 days: one new date in", "full rebuild", "contracts/s per core"):
        assert figure in out, f"{figure!r} not printed:\n{out}"
    text = results.read_text()
    assert "hand-written notes stay" in text
    for section in ("ingest", "metrics", "simulator"):
        assert f"<!-- bench:{section} -->" in text and f"<!-- /bench:{section} -->" in text
    assert "| kapman ingest |" in text and "| plain loader |" in text and "EXPLAIN" in text


def test_results_sections_are_replaced_not_appended(tmp_path: Path) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", PROJECT_DIR / "bench" / "run.py")
    assert spec and spec.loader
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    results = tmp_path / "results.md"
    bench_run.write_results(results, {"ingest": "first\n", "metrics": "m\n"})
    results.write_text(results.read_text() + "\nnotes\n")
    bench_run.write_results(results, {"ingest": "second\n"})
    text = results.read_text()
    assert text.count("<!-- bench:ingest -->") == 1 and "second" in text and "first" not in text
    assert "m\n" in text and "notes" in text
