"""SLI arithmetic: time windows, how rollup resolutions tile them, budgets and burn rates.

Pure functions, no database: `selectors` turns the ranges computed here into queries.

A window [start, end) counts the rollup buckets whose start lies in it, so the bucket
holding `end` (still filling, when `end` is now) is in and the one holding `start` is
out: nothing before the window's start edge leaks in, and a window that has just begun
(a new calendar month, an SLO created now) holds no events, so its budget is exactly 100%.
Edges are exact to 10 s while 10 s rollups are kept, to 1 min while minute rollups are,
and to the hour beyond.
"""

from __future__ import annotations

import calendar
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from controlplane.slo.choices import ROLLING_DAYS, AlertName, Window
from controlplane.telemetry.choices import RETENTION, Resolution

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
FINEST_FIRST = sorted(Resolution.values)  # 10, 60, 3600
BASE_WINDOW = timedelta(days=30)


@dataclass(frozen=True)
class Counts:
    """Exact good/total events, as the workers counted them against the SLO's threshold."""

    good: int = 0
    total: int = 0

    @property
    def bad(self) -> int:
        return self.total - self.good

    def achieved(self) -> float | None:
        return None if self.total == 0 else self.good / self.total

    def budget_remaining(self, objective: float) -> float:
        """1 - bad / allowed bad, where allowed bad = (1 - objective) * total.

        No events: nothing spent, exactly 1.0. Negative once the budget is overspent.
        """
        if self.total == 0:
            return 1.0
        return 1.0 - self.bad / ((1.0 - objective) * self.total)

    def burn_rate(self, objective: float) -> float:
        """How many times faster than allowed the budget burns: (bad/total) / (1 - objective)."""
        if self.total == 0:
            return 0.0
        return (self.bad / self.total) / (1.0 - objective)


# --- Time ---------------------------------------------------------------------------------


def _seconds(moment: datetime) -> int:
    return int((moment - EPOCH) // timedelta(seconds=1))


def floor_to(moment: datetime, step_s: int) -> datetime:
    return EPOCH + timedelta(seconds=_seconds(moment) // step_s * step_s)


def ceil_to(moment: datetime, step_s: int) -> datetime:
    floored = floor_to(moment, step_s)
    return floored if floored == moment else floored + timedelta(seconds=step_s)


def window_start(window: str, now: datetime) -> datetime:
    """Where the SLO's window that ends at `now` begins."""
    if window == Window.CALENDAR_MONTH:
        utc = now.astimezone(UTC)
        return datetime(utc.year, utc.month, 1, tzinfo=UTC)
    return now - timedelta(days=ROLLING_DAYS[Window(window)])


def window_length(window: str, now: datetime) -> timedelta:
    """The full length of the window: a calendar month is as long as the month holding `now`."""
    if window == Window.CALENDAR_MONTH:
        utc = now.astimezone(UTC)
        return timedelta(days=calendar.monthrange(utc.year, utc.month)[1])
    return timedelta(days=ROLLING_DAYS[Window(window)])


def window_label(window: str) -> str:
    return "month" if window == Window.CALENDAR_MONTH else f"{ROLLING_DAYS[Window(window)]}d"


def duration_label(length: timedelta) -> str:
    """`1h`, `5m`, `70s`, `1d`, `16h48m`: the largest units that say it exactly."""
    seconds = int(length.total_seconds())
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size:
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts) or "0s"


# --- Tiling -------------------------------------------------------------------------------


Range = tuple[int, datetime, datetime]
"""(resolution seconds, first bucket start, end): buckets with lo <= start < hi."""


def _finest_kept(moment: datetime, now: datetime) -> int:
    for resolution in FINEST_FIRST:
        if moment >= now - RETENTION[resolution]:
            return resolution
    return FINEST_FIRST[-1]


def tile(start: datetime, end: datetime, now: datetime) -> list[Range]:
    """The fewest rollup ranges that cover [start, end) exactly: the coarsest resolution
    for the aligned middle, finer ones at the edges, as fine as is still kept there."""
    lo = ceil_to(start, _finest_kept(start, now))
    hi = ceil_to(end, _finest_kept(end, now))
    ranges: list[Range] = []

    def cover(a: datetime, b: datetime, coarse_to_fine: list[int]) -> None:
        if a >= b:
            return
        resolution, finer = coarse_to_fine[0], coarse_to_fine[1:]
        first, last = ceil_to(a, resolution), floor_to(b, resolution)
        if not finer:  # edges are aligned to the finest kept resolution, so this is exact
            ranges.append((resolution, a, b))
            return
        if first < last:
            ranges.append((resolution, first, last))
            cover(a, first, finer)
            cover(last, b, finer)
        else:
            cover(a, b, finer)

    cover(lo, hi, FINEST_FIRST[::-1])
    return sorted(ranges, key=lambda r: (r[1], r[0]))


# --- Burn-rate alert rules -------------------------------------------------------------------


@dataclass(frozen=True)
class BurnRule:
    """Multi-window, multi-burn-rate (SRE workbook ch. 5): fire when both windows burn at
    `factor` or more; the short window makes the alert resolve soon after the burn stops."""

    alertname: str
    severity: str
    factor: float
    long: timedelta
    short: timedelta


RULES_30D = (
    BurnRule(AlertName.BURN_RATE_PAGE, "page", 14.4, timedelta(hours=1), timedelta(minutes=5)),
    BurnRule(AlertName.BURN_RATE_PAGE, "page", 6.0, timedelta(hours=6), timedelta(minutes=30)),
    BurnRule(AlertName.BURN_RATE_TICKET, "ticket", 3.0, timedelta(days=1), timedelta(hours=2)),
    BurnRule(AlertName.BURN_RATE_TICKET, "ticket", 1.0, timedelta(days=3), timedelta(hours=6)),
)


def _scale(length: timedelta, ratio: float) -> timedelta:
    """Scaled, rounded to the 10 s rollup grid, at least one bucket."""
    return timedelta(seconds=max(10, round(length.total_seconds() * ratio / 10) * 10))


def burn_rules(window: str, now: datetime) -> list[BurnRule]:
    """The workbook's windows are for a 30-day SLO; other windows scale them by their length
    over 30 days, keeping the factors. Each rule then still fires when the same share of
    the whole budget is spent within its long window (2% in 1 h of 30 d, 2% in 14 min of
    7 d), and a factor of 1 over the last long window still means "on track to spend it all"."""
    ratio = window_length(window, now) / BASE_WINDOW
    return [
        BurnRule(r.alertname, r.severity, r.factor, _scale(r.long, ratio), _scale(r.short, ratio))
        for r in RULES_30D
    ]
