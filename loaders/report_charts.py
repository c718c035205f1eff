"""The report's per-symbol chart: IV levels, IV rank, term structure and skew over time, one PNG."""

from __future__ import annotations

import io
import math
from datetime import date, timedelta
from typing import TYPE_CHECKING, Any

from .report import SERIES_COLOURS, Snapshot, _pct, _pts, _score

if TYPE_CHECKING:
    from matplotlib.axes import Axes

RECONSTRUCTED_SHADE = "#f2c14e"  # amber: the days a reconstruction, not a snapshot, stands behind


def reconstructed_spans(snaps: list[Snapshot]) -> list[tuple[date, date]]:
    """Runs of consecutive reconstructed days as (first, last) pairs, oldest first."""
    spans: list[tuple[date, date]] = []
    run: list[date] = []
    for snap in [*snaps, None]:
        if snap is not None and snap.reconstructed:
            run.append(snap.day)
        elif run:
            spans.append((run[0], run[-1]))
            run = []
    return spans


def _rank_series(ax: Axes, days: list[date], snaps: list[Snapshot], key: str, label: str,
                 colour: str, width: float, marker: str | None) -> None:
    """Solid where the rank's history holds snapshots only, dashed where it holds reconstructed
    days (the dashed run repeats its neighbours' points so that the line stays joined)."""
    values = [s.get(key) for s in snaps]
    mixed = [s.history_reconstructed for s in snaps]
    joined = [m or (i > 0 and mixed[i - 1]) or (i + 1 < len(mixed) and mixed[i + 1]) for i, m in enumerate(mixed)]
    nan = float("nan")
    ax.plot(days, [v if not m else nan for v, m in zip(values, mixed, strict=True)],
            label=None if all(mixed) else label, color=colour, marker=marker, markersize=3, linewidth=width)
    if any(mixed):
        ax.plot(days, [v if j else nan for v, j in zip(values, joined, strict=True)], color=colour,
                marker=marker, markersize=3, linewidth=width, linestyle="--",
                label=None if not all(mixed) else label)


def chart_png(symbol: str, snaps: list[Snapshot], simulated: bool) -> bytes:
    """Four panels over time: IV levels, IV rank, term structure and 25-delta skew."""
    import matplotlib.dates as mdates
    from matplotlib.figure import Figure  # no pyplot: no global state, the Agg canvas is implied

    days = [s.day for s in snaps]
    marker = "o" if len(days) <= 30 else None
    fig = Figure(figsize=(11, 6.4), dpi=96)
    # Fixed margins: a constrained layout would double the time each chart takes.
    fig.subplots_adjust(left=0.065, right=0.985, top=0.895, bottom=0.1, hspace=0.3, wspace=0.17)
    (ax_iv, ax_rank), (ax_term, ax_skew) = fig.subplots(2, 2, sharex=True)

    for key, label in (("average_iv", "average IV (OI-weighted)"), ("atm_iv_30d", "ATM 30d"),
                       ("atm_iv_90d", "ATM 90d")):
        ax_iv.plot(days, [s.get(key) * 100 for s in snaps], label=label, color=SERIES_COLOURS[key],
                   marker=marker, markersize=3, linewidth=1.6)
    ax_iv.set(title="Implied volatility", ylabel="IV (%)")
    ax_iv.legend(loc="best", fontsize=8, frameon=False)

    ax_rank.axhspan(0, 20, color="#2e8b57", alpha=0.07)
    ax_rank.axhspan(80, 100, color="#cf222e", alpha=0.07)
    _rank_series(ax_rank, days, snaps, "iv_rank", "IV rank (average IV)", SERIES_COLOURS["average_iv"], 1.6, marker)
    _rank_series(ax_rank, days, snaps, "iv_rank_30d", "IV rank (ATM 30d)", SERIES_COLOURS["atm_iv_30d"], 1.2, marker)
    ax_rank.set(title="IV rank (252-day range)", ylabel="rank (0-100)", ylim=(-3, 103))
    ax_rank.legend(loc="best", fontsize=8, frameon=False)

    term = [s.get("iv_term_structure") * 100 for s in snaps]
    ax_term.bar(days, term, width=0.8, color=["#2e8b57" if v >= 0 else "#cf222e" for v in term])
    ax_term.axhline(0, color="#444", linewidth=0.8)
    ax_term.set(title="Term structure: ATM 90d − ATM 30d", ylabel="vol points")

    ax_skew.plot(days, [s.get("iv_skew") * 100 for s in snaps], color="#7b3294",
                 marker=marker, markersize=3, linewidth=1.6)
    ax_skew.set(title="25-delta skew at 30d: put IV − call IV", ylabel="vol points")

    _decorate(fig, (ax_iv, ax_rank, ax_term, ax_skew), snaps)
    for ax in (ax_term, ax_skew):
        locator = mdates.AutoDateLocator(minticks=3, maxticks=8)
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))

    last = snaps[-1]
    fig.suptitle(f"{symbol} — {last.day.isoformat()}: {last.status}, average IV {_pct(last.metrics.get('average_iv'))}, "
                 f"IV rank {_score(last.metrics.get('iv_rank'))}, skew {_pts(last.metrics.get('iv_skew'))} pts",
                 fontsize=12, fontweight="bold", y=0.985)
    if simulated:
        fig.text(0.005, 0.995, "SIMULATED DATA", ha="left", va="top", color="#cf222e",
                 fontsize=9, fontweight="bold")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", facecolor="white")
    return buffer.getvalue()


def _decorate(fig: Any, axes: tuple[Axes, ...], snaps: list[Snapshot]) -> None:
    """Grids, "no data" notes, dotted lines on days without metrics, amber bands on reconstructed
    days, and one legend line at the bottom saying what the marks mean."""
    keys = ("average_iv", "iv_rank", "iv_term_structure", "iv_skew")
    spans = reconstructed_spans(snaps)
    gaps = [s.day for s in snaps if s.status != "SUCCESS"]
    half = timedelta(hours=12)
    for ax, key in zip(axes, keys, strict=True):
        ax.grid(True, color="#e5e5e5", linewidth=0.7)
        ax.spines[["top", "right"]].set_visible(False)
        ax.title.set_fontsize(10)
        if all(s.metrics.get(key) is None for s in snaps):
            why = "needs 20 days of history" if key == "iv_rank" else "no data"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="#888")
        for first, last in spans:
            ax.axvspan(first - half, last + half, color=RECONSTRUCTED_SHADE, alpha=0.22, linewidth=0, zorder=0)
        for day in gaps:
            ax.axvline(day, color="#999", linestyle=":", linewidth=1)
    notes = []
    if spans:
        count = sum(s.reconstructed for s in snaps)
        notes.append(f"amber: {count} reconstructed day(s), rebuilt from historical prices, not snapshots")
    if any(s.history_reconstructed and not math.isnan(s.get(key)) for s in snaps for key in ("iv_rank", "iv_rank_30d")):
        notes.append("dashed ranks: ranked against a history that includes reconstructed days")
    if gaps:
        notes.append(f"dotted lines: {len(gaps)} day(s) without metrics (status not SUCCESS)")
    if notes:
        fig.text(0.5, 0.005, ";  ".join(notes), ha="center", va="bottom", color="#666", fontsize=8)
