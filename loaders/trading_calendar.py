"""NYSE trading dates and the snapshot identity (`D 23:59:59.999999 UTC`) used everywhere."""

from __future__ import annotations

import os
from datetime import UTC, date, datetime, time, timedelta
from functools import lru_cache
from zoneinfo import ZoneInfo

import holidays

NEW_YORK = ZoneInfo("America/New_York")
# Freezes "today" for every command (tests, replays of a past night): YYYY-MM-DD.
TODAY_VARIABLE = "KAPMAN_TODAY"


@lru_cache(maxsize=64)
def _nyse_holidays(year: int) -> frozenset[date]:
    return frozenset(holidays.financial_holidays("NYSE", years=year))


def is_trading_day(day: date) -> bool:
    """A weekday that is not an NYSE holiday."""
    return day.weekday() < 5 and day not in _nyse_holidays(day.year)


def trading_days(start: date, end: date) -> list[date]:
    """Trading days from start to end inclusive, oldest first."""
    days: list[date] = []
    day = start
    while day <= end:
        if is_trading_day(day):
            days.append(day)
        day += timedelta(days=1)
    return days


def today() -> date:
    """The date in New York now, or the date KAPMAN_TODAY freezes it at."""
    frozen = os.environ.get(TODAY_VARIABLE, "").strip()
    if frozen:
        try:
            return date.fromisoformat(frozen)
        except ValueError:
            raise ValueError(f"{TODAY_VARIABLE} must be YYYY-MM-DD, not {frozen!r}") from None
    return datetime.now(NEW_YORK).date()


def latest_trading_date(now: datetime | None = None) -> date:
    """Today's date in New York if it is a trading day, else the last trading day before it."""
    day = now.astimezone(NEW_YORK).date() if now else today()
    while not is_trading_day(day):
        day -= timedelta(days=1)
    return day


def snapshot_time(day: date) -> datetime:
    """The snapshot identity of trading date D: D 23:59:59.999999 UTC."""
    return datetime.combine(day, time(23, 59, 59, 999999), tzinfo=UTC)
