"""Billing-cycle and local-day arithmetic (SPEC §4, §5, §10, §11). Pure functions, no clock.

The decision script knows no time zones. Everything calendrical is reduced here to
*local day numbers* (days since 1970-01-01 in the environment's time zone) plus a short table
of UTC-offset transitions, so the script finds "today" with one addition and one division.
"""

from __future__ import annotations

import calendar as _cal
import datetime as dt
import functools
import zoneinfo

EPOCH_ORDINAL = dt.date(1970, 1, 1).toordinal()


def day_number(day: dt.date) -> int:
    """Days since 1970-01-01 of a calendar date."""
    return day.toordinal() - EPOCH_ORDINAL


def date_of(day: int) -> dt.date:
    return dt.date.fromordinal(day + EPOCH_ORDINAL)


def add_months_clamped(anchor: dt.date, months: int) -> dt.date:
    """The anchor day ``months`` later; a month without that day gives its last day."""
    index = anchor.month - 1 + months
    year, month = anchor.year + index // 12, index % 12 + 1
    return dt.date(year, month, min(anchor.day, _cal.monthrange(year, month)[1]))


def local_midnight_ms(day: dt.date, tz: zoneinfo.ZoneInfo) -> int:
    """Epoch ms of 00:00 of ``day`` in ``tz`` (a skipped midnight maps to the first instant)."""
    naive = dt.datetime(day.year, day.month, day.day)
    aware = naive.replace(tzinfo=tz)
    # A midnight inside a DST gap does not exist; zoneinfo resolves it forward by the gap.
    return int(aware.timestamp() * 1000)


def cycle_starts(anchor: dt.date, until: dt.date) -> list[dt.date]:
    """Cycle start dates from ``anchor`` up to and including the first one on or after ``until``."""
    starts = [anchor]
    months = 0
    while starts[-1] < until:
        months += 1
        starts.append(add_months_clamped(anchor, months))
    return starts


def cycle_of(anchor: dt.date, today: dt.date) -> tuple[dt.date, dt.date]:
    """The [start, end) dates of the billing cycle that contains ``today`` (on/after anchor)."""
    months = (today.year - anchor.year) * 12 + today.month - anchor.month
    start = add_months_clamped(anchor, months)
    if start > today:
        months -= 1
        start = add_months_clamped(anchor, months)
    return start, add_months_clamped(anchor, months + 1)


def _offset_s(epoch_s: float, tz: zoneinfo.ZoneInfo) -> int:
    offset = dt.datetime.fromtimestamp(epoch_s, tz).utcoffset()
    assert offset is not None
    return int(offset.total_seconds())


def offset_transitions(tz: zoneinfo.ZoneInfo, first: dt.date, last: dt.date) -> list[list[int]]:
    """``[[from_epoch_ms, utc_offset_s], …]`` covering ``first``..``last``, exact to the second.

    The first entry starts at epoch 0 with the offset in force at ``first``; each further entry
    is an instant where the offset changes.
    """
    start_ms = local_midnight_ms(first - dt.timedelta(days=1), tz)
    end_ms = local_midnight_ms(last + dt.timedelta(days=1), tz)
    changes = _zone_changes(str(tz.key), first.year - 1, last.year + 1)
    table = [[0, _offset_s(start_ms / 1000, tz)]]
    table += [list(c) for c in changes if start_ms < c[0] <= end_ms]
    return table


@functools.lru_cache(maxsize=256)
def _zone_changes(key: str, first_year: int, last_year: int) -> tuple[tuple[int, int], ...]:
    """Every offset change of a zone in whole years, found by bisection (cached per zone)."""
    tz = zoneinfo.ZoneInfo(key)
    t = int(dt.datetime(first_year, 1, 1, tzinfo=dt.UTC).timestamp())
    end_s = int(dt.datetime(last_year + 1, 1, 1, tzinfo=dt.UTC).timestamp())
    current = _offset_s(t, tz)
    changes: list[tuple[int, int]] = []
    step = 6 * 3600  # no zone changes its offset twice within six hours
    while t < end_s:
        nxt = min(t + step, end_s)
        offset = _offset_s(nxt, tz)
        if offset != current:
            lo, hi = t, nxt  # offset(lo) == current, offset(hi) != current
            while hi - lo > 1:
                mid = (lo + hi) // 2
                if _offset_s(mid, tz) == current:
                    lo = mid
                else:
                    hi = mid
            changes.append((hi * 1000, offset))
            current = offset
        t = nxt
    return tuple(changes)


def local_day_at(epoch_ms: int, transitions: list[list[int]]) -> int:
    """The same computation the decision script does: local day number at an instant."""
    offset = transitions[0][1]
    for from_ms, off in transitions:
        if from_ms <= epoch_ms:
            offset = off
        else:
            break
    return (epoch_ms // 1000 + offset) // 86400
