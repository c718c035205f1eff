"""What a run did: per (day, symbol) outcomes, their log lines and the run summary."""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any

from ..logs import SUMMARY

log = logging.getLogger("kapman.ingest")


class IngestError(RuntimeError):
    """The run cannot go on (no key, provider unauthorised or unreachable): exit 1, one line."""


@dataclass
class SymbolOutcome:
    day: date
    symbol: str
    outcome: str  # ok | failed | skipped
    pages: int = 0
    contracts: int = 0
    rows_written: int = 0
    rejected: int = 0
    error: str | None = None
    elapsed_s: float = 0.0
    with_iv: int | None = None  # a reconstructed chain's contracts with an IV ...
    not_inverted: dict[str, int] | None = None  # ... and those without one, by reason


@dataclass
class DayOutcome:
    day: date
    snapshot_time: datetime
    outcome: str = "skipped"  # succeeded | failed | skipped
    error: str | None = None
    symbols: list[SymbolOutcome] = field(default_factory=list)

    def count(self, outcome: str) -> int:
        return sum(1 for s in self.symbols if s.outcome == outcome)

    def close(self) -> None:
        """Every symbol is finished: the day's outcome, and its END line."""
        attempted = [s for s in self.symbols if s.outcome != "skipped"]
        self.outcome = "succeeded" if any(s.outcome == "ok" for s in attempted) else "failed"
        if self.outcome == "failed":
            refused = [s for s in attempted if (s.error or "").startswith("HTTP 403")]
            # every symbol refused (403): the plan covers none of them, which is systemic
            self.error = (f"every symbol was refused: {refused[0].error}" if attempted and len(refused) == len(attempted)
                          else "every symbol failed")
        log.info("day %s END %s: ok=%d failed=%d skipped=%d rows_written=%d", self.day, self.outcome,
                 self.count("ok"), self.count("failed"), self.count("skipped"),
                 sum(s.rows_written for s in self.symbols))


def symbol_line(outcome: SymbolOutcome, reasons: dict[str, int] | None = None) -> None:
    """The symbol's line: INFO when it loaded, ERROR with its error when it failed."""
    detail = ""
    if reasons:
        detail = " (" + ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items())) + ")"
    text = (f"{outcome.day} {outcome.symbol} {outcome.outcome.upper()} pages={outcome.pages} "
            f"contracts={outcome.contracts} rows_written={outcome.rows_written} "
            f"rejected={outcome.rejected}{detail}{_iv_detail(outcome)} elapsed={outcome.elapsed_s:.2f}s")
    if outcome.error:
        log.error("%s error=%s", text, outcome.error)
    else:
        log.info("%s", text)


def _iv_detail(outcome: SymbolOutcome) -> str:
    """A reconstructed chain's IV counts for its line ("" for a snapshot's)."""
    if outcome.with_iv is None:
        return ""
    reasons = outcome.not_inverted or {}
    detail = ", ".join(f"{why}: {n}" for why, n in sorted(reasons.items()))
    return f" reconstructed with_iv={outcome.with_iv} not_inverted={sum(reasons.values())}" + (f" ({detail})" if detail else "")


def summary(args: argparse.Namespace, days: list[DayOutcome], started: datetime, duration: float,
            exit_code: int, error: str | None, parse_cpu_s: float) -> dict[str, Any]:
    """The run summary (`--summary-json`), one entry per (day, symbol)."""
    symbols = [s for d in days for s in d.symbols]
    return {
        "command": "ingest",
        "provider": args.provider,
        "mode": ("range" if args.start_date else "single-day") + (" ad-hoc" if args.symbols else ""),
        "started_at": started.isoformat(),
        "duration_s": round(duration, 3),
        "exit_code": exit_code,
        "error": error,
        "days_attempted": sum(1 for d in days if d.outcome != "skipped"),
        "days_succeeded": sum(1 for d in days if d.outcome == "succeeded"),
        "days_failed": sum(1 for d in days if d.outcome == "failed"),
        "days_skipped": sum(1 for d in days if d.outcome == "skipped"),
        "symbols_ok": sum(1 for s in symbols if s.outcome == "ok"),
        "symbols_failed": sum(1 for s in symbols if s.outcome == "failed"),
        "symbols_skipped": sum(1 for s in symbols if s.outcome == "skipped"),
        "rows_written": sum(s.rows_written for s in symbols),
        "rejected": sum(s.rejected for s in symbols),
        "days": [
            {"date": d.day.isoformat(), "snapshot_time": d.snapshot_time.isoformat(), "outcome": d.outcome,
             "error": d.error, "symbols_ok": d.count("ok"), "symbols_failed": d.count("failed"),
             "symbols_skipped": d.count("skipped"), "rows_written": sum(s.rows_written for s in d.symbols)}
            for d in days
        ],
        "symbols": [asdict(s) | {"day": s.day.isoformat()} for s in symbols],
        # the parser processes' CPU (forked children: their parent's rusage includes it once they end)
        "parse_process_cpu_s": round(parse_cpu_s, 3),
    }


def report(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """The END line, and the summary as JSON if asked for."""
    log.log(
        SUMMARY,
        "ingest END %s: days attempted=%d succeeded=%d failed=%d skipped=%d; symbols ok=%d failed=%d "
        "skipped=%d; rows_written=%d rejected=%d; %.1fs",
        "failed" if result["exit_code"] else "finished", result["days_attempted"], result["days_succeeded"],
        result["days_failed"], result["days_skipped"], result["symbols_ok"], result["symbols_failed"],
        result["symbols_skipped"], result["rows_written"], result["rejected"], result["duration_s"],
    )
    if args.summary_json:
        path = Path(args.summary_json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")
