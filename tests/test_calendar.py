"""Pure unit tests: billing-cycle and local-day arithmetic, and the entitlement snapshot."""

from __future__ import annotations

import datetime as dt
import itertools
import json
import zoneinfo
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quotagate.common import calendar as cal
from quotagate.common.calendar import (
    add_months_clamped,
    cycle_of,
    cycle_starts,
    day_number,
    local_day_at,
    local_midnight_ms,
    offset_transitions,
)
from quotagate.limiter.entitlements import (
    GIB,
    ISOLATION_DAYS,
    build_snapshot,
    effective_limits,
    encode,
)
from quotagate.settings.load import parse_yaml
from quotagate.settings.schema import (
    Environment,
    Limits,
    PackGrant,
    PlansFile,
    PromoGrant,
    ResourcePack,
)

D = dt.date
Z = zoneinfo.ZoneInfo
PLANS_FILE = Path(__file__).resolve().parent.parent / "config" / "plans.yaml"


def utc_ms(*args: int) -> int:
    return int(dt.datetime(*args, tzinfo=dt.UTC).timestamp()) * 1000


def true_day(epoch_ms: int, tz: zoneinfo.ZoneInfo) -> int:
    return day_number(dt.datetime.fromtimestamp(epoch_ms // 1000, tz).date())


# --------------------------------------------------------------------------- day numbers


def test_day_number_round_trip() -> None:
    assert day_number(D(1970, 1, 1)) == 0
    assert day_number(D(1970, 1, 2)) == 1
    assert day_number(D(1969, 12, 31)) == -1
    assert day_number(D(2026, 11, 1)) == 20758
    for n in (-1, 0, 1, 20758, 50000):
        assert day_number(cal.date_of(n)) == n


# ---------------------------------------------------------------------- add_months_clamped


@pytest.mark.parametrize(
    ("anchor", "months", "expected"),
    [
        (D(2023, 1, 31), 0, D(2023, 1, 31)),
        (D(2023, 1, 31), 1, D(2023, 2, 28)),
        (D(2024, 1, 31), 1, D(2024, 2, 29)),  # leap year
        (D(2024, 1, 31), 2, D(2024, 3, 31)),  # back to the anchor day: no drift
        (D(2024, 1, 31), 3, D(2024, 4, 30)),
        (D(2024, 1, 31), 13, D(2025, 2, 28)),
        (D(2100, 1, 31), 1, D(2100, 2, 28)),  # century, not a leap year
        (D(2000, 1, 31), 1, D(2000, 2, 29)),  # 400-year leap year
        (D(2024, 2, 29), 12, D(2025, 2, 28)),
        (D(2024, 2, 29), 48, D(2028, 2, 29)),
        (D(2024, 3, 30), 11, D(2025, 2, 28)),
        (D(2022, 11, 1), 1, D(2022, 12, 1)),
        (D(2022, 11, 1), 2, D(2023, 1, 1)),  # year roll-over
        (D(2022, 12, 15), 1, D(2023, 1, 15)),
        (D(2022, 12, 15), 12, D(2023, 12, 15)),
        (D(2023, 1, 31), -1, D(2022, 12, 31)),
        (D(2023, 3, 31), -1, D(2023, 2, 28)),
    ],
)
def test_add_months_clamped(anchor: dt.date, months: int, expected: dt.date) -> None:
    assert add_months_clamped(anchor, months) == expected


def test_add_months_clamped_anchor_31_through_a_leap_year() -> None:
    got = [add_months_clamped(D(2023, 12, 31), m) for m in range(14)]
    assert got == [
        D(2023, 12, 31), D(2024, 1, 31), D(2024, 2, 29), D(2024, 3, 31), D(2024, 4, 30),
        D(2024, 5, 31), D(2024, 6, 30), D(2024, 7, 31), D(2024, 8, 31), D(2024, 9, 30),
        D(2024, 10, 31), D(2024, 11, 30), D(2024, 12, 31), D(2025, 1, 31),
    ]


# ------------------------------------------------------------------------------- cycles


@pytest.mark.parametrize(
    ("anchor", "today", "expected"),
    [
        (D(2026, 11, 1), D(2026, 11, 1), (D(2026, 11, 1), D(2026, 12, 1))),  # anchor day
        (D(2026, 11, 1), D(2026, 11, 30), (D(2026, 11, 1), D(2026, 12, 1))),
        (D(2026, 11, 1), D(2026, 12, 1), (D(2026, 12, 1), D(2027, 1, 1))),
        (D(2026, 11, 1), D(2026, 12, 31), (D(2026, 12, 1), D(2027, 1, 1))),
        (D(2026, 11, 1), D(2027, 1, 1), (D(2027, 1, 1), D(2027, 2, 1))),
        (D(2026, 11, 15), D(2026, 12, 14), (D(2026, 11, 15), D(2026, 12, 15))),
        (D(2026, 11, 15), D(2026, 12, 15), (D(2026, 12, 15), D(2027, 1, 15))),
        (D(2026, 11, 15), D(2027, 1, 1), (D(2026, 12, 15), D(2027, 1, 15))),
        # anchor 31, leap year
        (D(2024, 1, 31), D(2024, 2, 28), (D(2024, 1, 31), D(2024, 2, 29))),
        (D(2024, 1, 31), D(2024, 2, 29), (D(2024, 2, 29), D(2024, 3, 31))),
        (D(2024, 1, 31), D(2024, 3, 1), (D(2024, 2, 29), D(2024, 3, 31))),
        (D(2024, 1, 31), D(2024, 3, 30), (D(2024, 2, 29), D(2024, 3, 31))),
        (D(2024, 1, 31), D(2024, 3, 31), (D(2024, 3, 31), D(2024, 4, 30))),
        (D(2024, 1, 31), D(2024, 4, 30), (D(2024, 4, 30), D(2024, 5, 31))),
        # anchor 31, common year
        (D(2023, 1, 31), D(2023, 2, 27), (D(2023, 1, 31), D(2023, 2, 28))),
        (D(2023, 1, 31), D(2023, 2, 28), (D(2023, 2, 28), D(2023, 3, 31))),
        # anchor 29 Feb
        (D(2024, 2, 29), D(2025, 2, 28), (D(2025, 2, 28), D(2025, 3, 29))),
        (D(2024, 2, 29), D(2025, 3, 28), (D(2025, 2, 28), D(2025, 3, 29))),
        (D(2024, 2, 29), D(2025, 3, 29), (D(2025, 3, 29), D(2025, 4, 29))),
    ],
)
def test_cycle_of(anchor: dt.date, today: dt.date, expected: tuple[dt.date, dt.date]) -> None:
    assert cycle_of(anchor, today) == expected


def test_cycle_starts() -> None:
    starts = cycle_starts(D(2026, 11, 1), D(2027, 11, 1))
    assert len(starts) == 13
    assert starts[0] == D(2026, 11, 1) and starts[-1] == D(2027, 11, 1)
    assert starts[2] == D(2027, 1, 1)
    # up to and including the first start on or after `until`
    assert cycle_starts(D(2026, 11, 1), D(2027, 11, 2))[-1] == D(2027, 12, 1)
    assert cycle_starts(D(2026, 11, 1), D(2026, 11, 1)) == [D(2026, 11, 1)]
    assert cycle_starts(D(2026, 11, 1), D(2026, 11, 2)) == [D(2026, 11, 1), D(2026, 12, 1)]
    assert cycle_starts(D(2024, 1, 31), D(2024, 5, 1)) == [
        D(2024, 1, 31), D(2024, 2, 29), D(2024, 3, 31), D(2024, 4, 30), D(2024, 5, 31),
    ]


dates = st.dates(min_value=D(2000, 1, 1), max_value=D(2060, 12, 31))


@given(anchor=dates, delta=st.integers(0, 2000))
def test_cycle_of_properties(anchor: dt.date, delta: int) -> None:
    today = anchor + dt.timedelta(days=delta)
    start, end = cycle_of(anchor, today)
    assert start <= today < end
    assert anchor <= start
    starts = cycle_starts(anchor, today)
    # the cycle is two consecutive starts from cycle_starts
    i = starts.index(start)
    assert add_months_clamped(anchor, i) == start
    assert add_months_clamped(anchor, i + 1) == end
    # a cycle is 28..31 days long
    assert 28 <= (end - start).days <= 31


@given(anchor=dates, until_delta=st.integers(0, 1500))
def test_cycle_starts_agree_with_cycle_of(anchor: dt.date, until_delta: int) -> None:
    starts = cycle_starts(anchor, anchor + dt.timedelta(days=until_delta))
    assert starts[-1] >= anchor + dt.timedelta(days=until_delta)
    assert len(starts) == 1 or starts[-2] < anchor + dt.timedelta(days=until_delta)
    for s, e in itertools.pairwise(starts):
        assert cycle_of(anchor, s) == (s, e)
        assert cycle_of(anchor, e - dt.timedelta(days=1)) == (s, e)


# ------------------------------------------------------------------- offset transitions


def test_offset_transitions_shanghai_has_one_entry() -> None:
    assert offset_transitions(Z("Asia/Shanghai"), D(2026, 1, 1), D(2030, 12, 31)) == [
        [0, 8 * 3600]
    ]
    assert offset_transitions(Z("UTC"), D(2026, 1, 1), D(2026, 12, 31)) == [[0, 0]]


# Known 2026 rule instants (US: 2nd Sun Mar 02:00 / 1st Sun Nov 02:00 local; EU: last Sun
# Mar / Oct 01:00 UTC; Australia: 1st Sun Apr / 1st Sun Oct).
@pytest.mark.parametrize(
    ("zone", "expected"),
    [
        ("America/New_York", [
            [0, -5 * 3600],
            [utc_ms(2026, 3, 8, 7), -4 * 3600],
            [utc_ms(2026, 11, 1, 6), -5 * 3600],
        ]),
        ("Europe/London", [
            [0, 0],
            [utc_ms(2026, 3, 29, 1), 3600],
            [utc_ms(2026, 10, 25, 1), 0],
        ]),
        ("Europe/Berlin", [
            [0, 3600],
            [utc_ms(2026, 3, 29, 1), 7200],
            [utc_ms(2026, 10, 25, 1), 3600],
        ]),
        ("Australia/Sydney", [
            [0, 11 * 3600],
            [utc_ms(2026, 4, 4, 16), 10 * 3600],
            [utc_ms(2026, 10, 3, 16), 11 * 3600],
        ]),
        ("Australia/Lord_Howe", [  # half-hour DST
            [0, 11 * 3600],
            [utc_ms(2026, 4, 4, 15), 10 * 3600 + 1800],
            [utc_ms(2026, 10, 3, 15, 30), 11 * 3600],
        ]),
    ],
)
def test_offset_transitions_exact_instants(zone: str, expected: list[list[int]]) -> None:
    assert offset_transitions(Z(zone), D(2026, 1, 1), D(2026, 12, 31)) == expected


def test_offset_transitions_window_edges() -> None:
    ny = Z("America/New_York")
    # Starting after the spring change: the first entry already carries EDT.
    assert offset_transitions(ny, D(2026, 3, 10), D(2026, 6, 1)) == [[0, -4 * 3600]]
    # The window reaches one local day before `first`: a change on that day is in the table.
    assert offset_transitions(ny, D(2026, 3, 9), D(2026, 6, 1)) == [
        [0, -5 * 3600], [utc_ms(2026, 3, 8, 7), -4 * 3600],
    ]
    # ... and up to the end of `last` (local midnight after it).
    assert offset_transitions(ny, D(2026, 1, 1), D(2026, 3, 8)) == [
        [0, -5 * 3600], [utc_ms(2026, 3, 8, 7), -4 * 3600],
    ]
    assert offset_transitions(ny, D(2026, 1, 1), D(2026, 3, 7)) == [[0, -5 * 3600]]
    # Several years: two changes a year, alternating.
    table = offset_transitions(ny, D(2026, 6, 1), D(2028, 6, 1))
    assert [row[1] for row in table] == [-4 * 3600, -5 * 3600, -4 * 3600, -5 * 3600, -4 * 3600]
    assert [row[0] for row in table] == sorted(row[0] for row in table)


# ------------------------------------------------------------------------- local_day_at

ZONES = [
    "UTC",
    "Asia/Shanghai",
    "Asia/Kolkata",
    "Asia/Kathmandu",
    "Asia/Tehran",
    "America/New_York",
    "America/St_Johns",
    "America/Sao_Paulo",  # DST used to start at midnight (midnight skipped)
    "America/Havana",  # DST changes at midnight
    "America/Santiago",
    "Europe/London",
    "Europe/Dublin",  # negative DST in tzdata
    "Africa/Casablanca",  # DST suspended for Ramadan
    "Australia/Sydney",
    "Australia/Lord_Howe",
    "Pacific/Chatham",
    "Pacific/Apia",  # skipped 2011-12-30 entirely
    "Pacific/Kiritimati",
    "Pacific/Pago_Pago",
    "Antarctica/Troll",  # two-hour DST
]


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("Asia/Shanghai", D(2026, 11, 1)),
        ("America/New_York", D(2026, 3, 8)),  # day of the spring change
        ("America/New_York", D(2026, 3, 9)),  # first midnight in EDT
        ("America/New_York", D(2026, 11, 1)),
        ("America/New_York", D(2026, 11, 2)),  # first midnight back in EST
        ("Europe/London", D(2026, 3, 29)),
        ("Europe/London", D(2026, 3, 30)),
        ("Europe/London", D(2026, 10, 25)),
        ("Europe/London", D(2026, 10, 26)),
        ("Australia/Lord_Howe", D(2026, 4, 5)),
        ("Australia/Lord_Howe", D(2026, 10, 5)),
        ("America/Sao_Paulo", D(2018, 11, 4)),  # midnight did not exist: 00:00 -> 01:00
        ("America/Sao_Paulo", D(2019, 2, 17)),  # midnight twice (fall back 00:00 -> 23:00)
        ("America/Havana", D(2026, 3, 8)),
        ("America/Havana", D(2026, 11, 1)),
        ("Pacific/Apia", D(2011, 12, 31)),  # the day after the skipped 30th
        ("Pacific/Chatham", D(2026, 4, 5)),
    ],
)
def test_local_day_at_midnight(zone: str, day: dt.date) -> None:
    tz = Z(zone)
    table = offset_transitions(tz, day - dt.timedelta(days=3), day + dt.timedelta(days=3))
    midnight = local_midnight_ms(day, tz)
    assert true_day(midnight, tz) == day_number(day)  # sanity: the midnight is on that day
    for t in (midnight, midnight + 999, midnight - 1000, midnight - 1):
        assert local_day_at(t, table) == true_day(t, tz), (zone, day, t - midnight)
    assert local_day_at(midnight, table) == day_number(day)
    # the day before (two before at Apia, which skipped 2011-12-30)
    assert local_day_at(midnight - 1, table) == day_number(day) - (2 if zone == "Pacific/Apia"
                                                                   else 1)


def test_local_midnight_ms() -> None:
    assert local_midnight_ms(D(2026, 11, 1), Z("Asia/Shanghai")) == utc_ms(2026, 10, 31, 16)
    assert local_midnight_ms(D(2026, 3, 9), Z("America/New_York")) == utc_ms(2026, 3, 9, 4)
    assert local_midnight_ms(D(2026, 3, 8), Z("America/New_York")) == utc_ms(2026, 3, 8, 5)
    # A skipped midnight maps to the first instant of the day (the change itself).
    assert local_midnight_ms(D(2018, 11, 4), Z("America/Sao_Paulo")) == utc_ms(2018, 11, 4, 3)


@settings(deadline=None, max_examples=300)
@given(
    zone=st.sampled_from(ZONES),
    first=st.dates(min_value=D(2005, 1, 1), max_value=D(2040, 12, 31)),
    span=st.integers(0, 800),
    where=st.floats(0, 1, exclude_max=True),
)
def test_local_day_at_matches_zoneinfo(
    zone: str, first: dt.date, span: int, where: float
) -> None:
    tz = Z(zone)
    last = first + dt.timedelta(days=span)
    table = offset_transitions(tz, first, last)
    lo = local_midnight_ms(first, tz)
    hi = local_midnight_ms(last + dt.timedelta(days=1), tz)
    t = lo + int((hi - lo) * where)
    assert local_day_at(t, table) == true_day(t, tz)


@settings(deadline=None, max_examples=200)
@given(
    zone=st.sampled_from(ZONES),
    first=st.dates(min_value=D(2005, 1, 1), max_value=D(2040, 12, 31)),
    span=st.integers(0, 800),
    where=st.floats(0, 1, exclude_max=True),
)
def test_local_day_at_every_local_midnight_in_window(
    zone: str, first: dt.date, span: int, where: float
) -> None:
    """The boundary itself: midnight is the new day, one ms before is the old one."""
    tz = Z(zone)
    last = first + dt.timedelta(days=span)
    table = offset_transitions(tz, first, last)
    day = first + dt.timedelta(days=int(span * where))
    midnight = local_midnight_ms(day, tz)
    if true_day(midnight, tz) != day_number(day):  # a day the zone skipped (Apia 2011-12-30)
        return
    assert local_day_at(midnight, table) == day_number(day)
    assert local_day_at(midnight - 1, table) == true_day(midnight - 1, tz)


# ---------------------------------------------------------------------- build_snapshot


@pytest.fixture(scope="module")
def plans() -> PlansFile:
    return parse_yaml(PLANS_FILE, PlansFile)


def _env(**kw: object) -> Environment:
    base: dict[str, object] = {
        "plan": "standard", "anchor": D(2026, 11, 1), "expires": D(2027, 11, 1),
    }
    base.update(kw)
    return Environment(**base)  # type: ignore[arg-type]


def test_effective_limits_plan_only(plans: PlansFile) -> None:
    limits = effective_limits(plans.plans["standard"], Limits())
    assert limits == {
        "qps": 500,
        "calls": 8_000_000,
        "gbs": 600_000 * 1024 * 1000,  # MB·ms
        "outbound_bytes": 20 * GIB,
        "storage_traffic_bytes": 300 * GIB,
        "cdn_origin_bytes": 120 * GIB,
        "capacity_bytes": 100 * GIB,
        "ai_tokens": 100_000,
        "sms": 0,
        "realtime": 500,
        "function_concurrency": 1_000,
    }
    assert GIB == 1_073_741_824


def test_effective_limits_overrides(plans: PlansFile) -> None:
    limits = effective_limits(
        plans.plans["enterprise_premium"],
        Limits(qps=3000, calls=0, capacity_gb=7, outbound_gb=1, realtime=9, ai_tokens=5,
               function_concurrency=4000),
    )
    assert limits["qps"] == 3000
    assert limits["calls"] == 0  # 0 is an override, not "unset"
    assert limits["capacity_bytes"] == 7 * GIB
    assert limits["outbound_bytes"] == GIB
    assert limits["realtime"] == 9 and limits["ai_tokens"] == 5
    assert limits["function_concurrency"] == 4000
    # not overridden: the plan's
    assert limits["gbs"] == 15_000_000 * 1_024_000
    assert limits["storage_traffic_bytes"] == 4000 * GIB
    assert limits["cdn_origin_bytes"] == 2000 * GIB


def test_snapshot_shipped_environment(plans: PlansFile) -> None:
    env = _env(
        limits=Limits(qps=800),
        packs=(PackGrant(id="p1", pack="calls-10m", purchased=D(2026, 11, 20)),),
        promos=(PromoGrant(id="d1", pack="db-3k", start=D(2026, 11, 26), days=2),),
    )
    snap = build_snapshot(env, plans, "Asia/Shanghai")
    assert snap["v"] == 3
    assert snap["plan"] == "standard"
    assert snap["mode"] == "" and snap["overage"] == 0
    assert snap["qps"] == 800
    assert snap["quota"] == {
        "calls": 8_000_000, "gbs": 600_000 * 1_024_000, "storage_traffic_bytes": 300 * GIB,
        "outbound_bytes": 20 * GIB, "cdn_origin_bytes": 120 * GIB, "ai_tokens": 100_000,
        "capacity_bytes": 100 * GIB,
    }
    assert snap["caps"] == {"rt": 500, "fc": 1000}
    assert snap["timezone"] == "Asia/Shanghai"
    assert snap["tz"] == [[0, 28800]]
    assert snap["anchor_day"] == day_number(D(2026, 11, 1))
    assert snap["expire_day"] == day_number(D(2027, 11, 1))
    assert snap["release_day"] == snap["expire_day"] + 15 == day_number(D(2027, 11, 16))
    assert ISOLATION_DAYS == 15
    assert len(snap["cycles"]) == 13
    assert snap["cycles"][0] == day_number(D(2026, 11, 1))
    assert snap["cycles"][-1] == day_number(D(2027, 11, 1))
    purchased = day_number(D(2026, 11, 20))
    assert snap["packs"] == [
        {"id": "p1", "meter": "calls", "amount": 10_000_000, "from": purchased,
         "to": purchased + 30},
    ]
    start = day_number(D(2026, 11, 26))
    assert snap["promos"] == [
        {"id": "d1", "pack": "db-3k", "from": start, "to": start + 2,
         "qps": 10_000, "fc": 0, "rt": 10_000, "db": 1},
    ]
    assert snap["sms_calls"] == 2000


def test_snapshot_packs_sorted_earliest_expiry_first(plans: PlansFile) -> None:
    custom = PlansFile(
        plans=plans.plans,
        resource_packs={
            **plans.resource_packs,
            "calls-week": ResourcePack(meter="calls", amount=1000, price="1", days=7),
        },
        promo_packs=plans.promo_packs,
    )
    env = _env(packs=(
        PackGrant(id="late", pack="calls-50m", purchased=D(2026, 12, 10)),  # to: 01-09
        PackGrant(id="raw", meter="sms", amount=5, purchased=D(2026, 11, 10)),  # to: 12-10
        PackGrant(id="week", pack="calls-week", purchased=D(2026, 12, 1)),  # to: 12-08
        PackGrant(id="b-tie", pack="capacity-100g", purchased=D(2026, 11, 10)),  # to: 12-10
        PackGrant(id="a-tie", pack="sms-1k", purchased=D(2026, 11, 10)),  # to: 12-10
    ))
    snap = build_snapshot(env, custom, "Asia/Shanghai")
    assert [p["id"] for p in snap["packs"]] == ["week", "a-tie", "b-tie", "raw", "late"]
    by_id = {p["id"]: p for p in snap["packs"]}
    assert by_id["week"]["to"] - by_id["week"]["from"] == 7
    assert by_id["raw"] == {"id": "raw", "meter": "sms", "amount": 5,
                            "from": day_number(D(2026, 11, 10)),
                            "to": day_number(D(2026, 12, 10))}  # explicit packs: 30 days
    assert by_id["b-tie"]["meter"] == "capacity_bytes"
    assert by_id["b-tie"]["amount"] == 100 * GIB
    assert by_id["late"]["to"] == day_number(D(2027, 1, 9))
    assert all(a["to"] <= b["to"] for a, b in itertools.pairwise(snap["packs"]))


def test_snapshot_promos(plans: PlansFile) -> None:
    env = _env(promos=(
        PromoGrant(id="f", pack="fn-500g", start=D(2026, 12, 31), days=3),
        PromoGrant(id="d", pack="db-18k", start=D(2026, 11, 1)),
    ))
    snap = build_snapshot(env, plans, "Asia/Shanghai")
    f, d = snap["promos"]
    assert f == {"id": "f", "pack": "fn-500g", "from": day_number(D(2026, 12, 31)),
                 "to": day_number(D(2027, 1, 3)), "qps": 10_000, "fc": 2000, "rt": 0, "db": 0}
    assert d["from"] == day_number(D(2026, 11, 1)) and d["to"] == d["from"] + 1  # default 1 day
    assert (d["qps"], d["rt"], d["db"]) == (40_000, 500_000, 1)


def test_snapshot_env_timezone_mode_overage(plans: PlansFile) -> None:
    env = _env(anchor=D(2026, 1, 15), expires=D(2026, 7, 15), timezone="America/New_York",
               mode="shadow", overage=True)
    snap = build_snapshot(env, plans, "Asia/Shanghai")
    assert snap["timezone"] == "America/New_York"
    assert snap["mode"] == "shadow" and snap["overage"] == 1
    # transitions from the anchor to the release day (2026-07-30): only the spring change
    assert snap["tz"] == [[0, -5 * 3600], [utc_ms(2026, 3, 8, 7), -4 * 3600]]
    assert snap["release_day"] == day_number(D(2026, 7, 30))
    # cycles start on the anchor day of each month (local days; the script finds midnight)
    assert snap["cycles"] == [day_number(D(2026, m, 15)) for m in range(1, 8)]
    # the gateway default applies when the env names no zone
    assert build_snapshot(_env(), plans, "Europe/London")["timezone"] == "Europe/London"


def test_snapshot_release_day_covers_the_transition_table(plans: PlansFile) -> None:
    env = _env(anchor=D(2026, 1, 1), expires=D(2026, 10, 20), timezone="Europe/London")
    snap = build_snapshot(env, plans, "UTC")
    # release = 2026-11-04, after the October change: the table must include it
    assert snap["release_day"] == day_number(D(2026, 11, 4))
    assert snap["tz"][-1] == [utc_ms(2026, 10, 25, 1), 0]


def test_encode_is_compact_sorted_and_round_trips(plans: PlansFile) -> None:
    snap = build_snapshot(_env(limits=Limits(qps=800)), plans, "Asia/Shanghai")
    text = encode(snap)
    assert json.loads(text) == snap
    assert ", " not in text and ": " not in text
    assert text.startswith('{"anchor_day":')
    assert encode(json.loads(text)) == text
