"""An independent Python reading of shared/spec/volatility-metrics.md, used only by the tests to
cross-check the SQL models on random chains. Plain loops and floats; no code shared with dbt."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any
from zoneinfo import ZoneInfo

from loaders.trading_calendar import snapshot_time, trading_days

NEW_YORK = ZoneInfo("America/New_York")

METRICS = (
    "average_iv", "iv_rank", "iv_percentile", "iv_rank_30d", "iv_percentile_30d",
    "put_call_ratio_oi", "put_call_ratio_volume", "oi_ratio",
    "atm_iv_30d", "atm_iv_90d", "iv_term_structure", "iv_skew",
)


@dataclass(frozen=True)
class Contract:
    option_type: str  # "C" or "P"
    expiration_date: date
    implied_volatility: float | None
    delta: float | None
    open_interest: int | None
    volume: int | None
    day_updated_at: datetime | None = None  # the day bar's time (Polygon's day.last_updated)


def _activity(value: int | None) -> int:
    """Open interest or volume: null counts as 0 (the spec), and so does a negative one."""
    return max(value or 0, 0)


def _volume(c: Contract, snapshot_at: datetime) -> int:
    """A day bar from a session before the snapshot's (New York dates) counts no volume."""
    if c.day_updated_at is not None and (
            c.day_updated_at.astimezone(NEW_YORK).date() < snapshot_at.astimezone(NEW_YORK).date()):
        return 0
    return _activity(c.volume)


def _iv_valid(c: Contract) -> bool:
    return c.implied_volatility is not None and 0 < c.implied_volatility <= 5


def _iv_at_delta(points: list[tuple[float, float]], target: float) -> float | None:
    """points: (delta, iv) of one expiry and type. Linear in delta, ties averaged, no extrapolation."""
    by_delta: dict[float, list[float]] = {}
    for d, iv in points:
        by_delta.setdefault(d, []).append(iv)
    below = [d for d in by_delta if d <= target]
    above = [d for d in by_delta if d >= target]
    if not below or not above:
        return None
    d_lo, d_hi = max(below), min(above)
    iv_lo = sum(by_delta[d_lo]) / len(by_delta[d_lo])
    iv_hi = sum(by_delta[d_hi]) / len(by_delta[d_hi])
    if d_hi == d_lo:
        return iv_lo
    return iv_lo + (iv_hi - iv_lo) * (target - d_lo) / (d_hi - d_lo)


def _constant_maturity(series: dict[int, float], n: int) -> tuple[float | None, bool]:
    """(value, extrapolated) for a {dte: iv} series at n days."""
    if n in series:
        return series[n], False
    below = [d for d in series if d < n]
    above = [d for d in series if d > n]
    if below and above:
        d1, d2 = max(below), min(above)
        w1 = series[d1] ** 2 * d1 / 365
        w2 = series[d2] ** 2 * d2 / 365
        w = w1 + (w2 - w1) * (n - d1) / (d2 - d1)
        return (math.sqrt(w / (n / 365)) if w > 0 else None), False
    if below:
        return series[max(below)], True
    if above:
        return series[min(above)], True
    return None, False


def chain_metrics(contracts: Sequence[Contract], as_of: date, snapshot_at: datetime) -> dict[str, Any]:
    """Everything but the history metrics, for the options snapshot taken at snapshot_at and used
    on trading date as_of."""
    live = [c for c in contracts if (c.expiration_date - as_of).days >= 0]
    oi = {t: sum(_activity(c.open_interest) for c in live if c.option_type == t) for t in "CP"}
    vol = {t: sum(_volume(c, snapshot_at) for c in live if c.option_type == t) for t in "CP"}
    total_oi, total_vol = oi["C"] + oi["P"], vol["C"] + vol["P"]
    valid = [c for c in live if _iv_valid(c) and (c.expiration_date - as_of).days >= 1]
    weight = sum(_activity(c.open_interest) for c in valid)
    if not valid:
        average = None
    elif weight == 0:
        average = sum(c.implied_volatility for c in valid) / len(valid)
    else:
        average = sum(c.implied_volatility * _activity(c.open_interest) for c in valid) / weight

    series: dict[str, dict[int, float]] = {"atm": {}, "c25": {}, "p25": {}}
    for expiry in sorted({c.expiration_date for c in valid}):
        dte = (expiry - as_of).days
        calls = [(c.delta, c.implied_volatility) for c in valid
                 if c.expiration_date == expiry and c.option_type == "C" and c.delta is not None
                 and 0 < c.delta < 1]
        puts = [(c.delta, c.implied_volatility) for c in valid
                if c.expiration_date == expiry and c.option_type == "P" and c.delta is not None
                and -1 < c.delta < 0]
        c50, p50 = _iv_at_delta(calls, 0.5), _iv_at_delta(puts, -0.5)
        atm_points = [v for v in (c50, p50) if v is not None]
        for name, value in (("atm", sum(atm_points) / len(atm_points) if atm_points else None),
                            ("c25", _iv_at_delta(calls, 0.25)), ("p25", _iv_at_delta(puts, -0.25))):
            if value is not None:
                series[name][dte] = value
    atm30, x_atm30 = _constant_maturity(series["atm"], 30)
    atm90, x_atm90 = _constant_maturity(series["atm"], 90)
    c25, x_c25 = _constant_maturity(series["c25"], 30)
    p25, x_p25 = _constant_maturity(series["p25"], 30)
    diagnostics = [name for name, flag in (
        ("extrapolated_atm_iv_30d", x_atm30), ("extrapolated_atm_iv_90d", x_atm90),
        ("extrapolated_iv_skew_call", x_c25), ("extrapolated_iv_skew_put", x_p25)) if flag]
    return {
        "average_iv": average,
        "put_call_ratio_oi": oi["P"] / oi["C"] if oi["C"] != 0 else None,
        "put_call_ratio_volume": vol["P"] / vol["C"] if vol["C"] != 0 else None,
        "oi_ratio": total_vol / total_oi if total_oi != 0 else None,
        "atm_iv_30d": atm30, "atm_iv_90d": atm90,
        "iv_term_structure": atm90 - atm30 if atm30 is not None and atm90 is not None else None,
        "iv_skew": p25 - c25 if p25 is not None and c25 is not None else None,
        "counts": {
            "contracts": len(live),
            "contracts_with_iv": sum(1 for c in live if _iv_valid(c)),
            "calls": sum(1 for c in live if c.option_type == "C"),
            "puts": sum(1 for c in live if c.option_type == "P"),
            "expiries": len({c.expiration_date for c in live}),
        },
        "diagnostics": diagnostics,
    }


def _rank(value: float | None, history: list[float]) -> tuple[float | None, float | None]:
    if value is None or len(history) < 20:
        return None, None
    lo, hi = min(history), max(history)
    rank = None if hi == lo else min(100.0, max(0.0, (value - lo) / (hi - lo) * 100))
    return rank, 100 * sum(1 for h in history if h < value) / len(history)


def _isoformat(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat()


class Reference:
    """Snapshots per ticker in, the spec's JSON per (ticker, trading date) out."""

    def __init__(self) -> None:
        self.snapshots: dict[str, dict[datetime, list[Contract]]] = {}
        self.reconstructed: set[tuple[str, datetime]] = set()

    def add(self, ticker: str, at: datetime, contracts: list[Contract], source: str = "snapshot") -> None:
        self.snapshots.setdefault(ticker, {})[at] = contracts
        if source == "reconstructed":
            self.reconstructed.add((ticker, at))

    def _latest(self, ticker: str, day: date) -> datetime | None:
        limit = snapshot_time(day)
        times = [t for t in self.snapshots.get(ticker, {}) if t <= limit]
        return max(times) if times else None

    def documents(self, ticker: str, start: date, end: date) -> dict[date, dict[str, Any]]:
        """The JSON of every trading date start..end; history from every earlier trading date."""
        first = min((t.date() for t in self.snapshots.get(ticker, {})), default=start)
        out: dict[date, dict[str, Any]] = {}
        # (value, whether that date's snapshot was reconstructed)
        history: list[tuple[float, bool]] = []
        history_30d: list[tuple[float, bool]] = []
        for day in trading_days(min(first, start), end):
            doc = self._document(ticker, day, history[-252:], history_30d[-252:])
            metrics = doc["metrics"]
            if doc["status"] in ("SUCCESS", "PARTIAL"):
                if doc["_average_iv"] is not None:
                    history.append((doc["_average_iv"], doc["_reconstructed"]))
                if doc["_atm_iv_30d"] is not None:
                    history_30d.append((doc["_atm_iv_30d"], doc["_reconstructed"]))
            del doc["_average_iv"], doc["_atm_iv_30d"], doc["_reconstructed"]
            if day >= start:
                out[day] = doc
            assert set(metrics) == set(METRICS)
        return out

    def _document(self, ticker: str, day: date, history: list[tuple[float, bool]],
                  history_30d: list[tuple[float, bool]]) -> dict[str, Any]:
        at = self._latest(ticker, day)
        if at is None:
            return {"status": "MISSING_OPTIONS", "as_of": day.isoformat(), "options_snapshot_time": None,
                    "metrics": dict.fromkeys(METRICS),
                    "counts": {"contracts": 0, "contracts_with_iv": 0, "calls": 0, "puts": 0, "expiries": 0},
                    "diagnostics": ["missing_options_data"], "_average_iv": None, "_atm_iv_30d": None,
                    "_reconstructed": False}
        raw = chain_metrics(self.snapshots[ticker][at], day, at)
        diagnostics = list(raw.pop("diagnostics"))
        counts = raw.pop("counts")
        iv_rank, iv_percentile = _rank(raw["average_iv"], [v for v, _ in history])
        iv_rank_30d, iv_percentile_30d = _rank(raw["atm_iv_30d"], [v for v, _ in history_30d])
        reconstructed = (ticker, at) in self.reconstructed
        if reconstructed:
            diagnostics.append("reconstructed_chain")
        if (raw["average_iv"] is not None and any(r for _, r in history)) or (
                raw["atm_iv_30d"] is not None and any(r for _, r in history_30d)):
            diagnostics.append("history_includes_reconstructed")
        status = "SUCCESS" if raw["average_iv"] is not None else "PARTIAL"
        if status == "PARTIAL":
            diagnostics.append("missing_average_iv")
        if at.astimezone(UTC).date() < day:
            diagnostics.append("stale_options_snapshot")
        if raw["average_iv"] is not None and len(history) < 20:
            diagnostics.append("insufficient_iv_history")
        if raw["atm_iv_30d"] is not None and len(history_30d) < 20:
            diagnostics.append("insufficient_atm_iv_30d_history")
        metrics = raw | {"iv_rank": iv_rank, "iv_percentile": iv_percentile,
                         "iv_rank_30d": iv_rank_30d, "iv_percentile_30d": iv_percentile_30d}
        return {
            "status": status, "as_of": day.isoformat(), "options_snapshot_time": _isoformat(at),
            "metrics": {k: None if metrics[k] is None else round(metrics[k], 6) for k in METRICS},
            "counts": counts, "diagnostics": sorted(diagnostics),
            "_average_iv": raw["average_iv"], "_atm_iv_30d": raw["atm_iv_30d"],
            "_reconstructed": reconstructed,
        }
