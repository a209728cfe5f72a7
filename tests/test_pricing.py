"""SPEC §11 plan-change prices, exact to the fen: the seed's two examples and more."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from quotagate.billing.pricing import charge, downgrade_refund, refund, upgrade_fee
from quotagate.billing.versions import change_quote
from quotagate.settings.schema import GatewayVersion

D = dt.date


def test_seed_upgrade_example() -> None:
    # 100 -> 1,000 CNY/month on 2022-12-15, expiry 2023-02-01: 48 days -> 1,420.27
    q = upgrade_fee(Decimal(100), Decimal(1000), D(2022, 12, 15), D(2023, 2, 1))
    assert q.days_left == 48
    assert q.amount == Decimal("1420.27")
    assert str(q.amount) == "1420.27"


def test_seed_downgrade_example() -> None:
    # 3 months at 1,000 bought 2022-11-01 (expiry 2023-02-01), downgraded to 100 on 2022-12-15:
    # used 45 of 93 days -> 1,548.39 back, 48 days of the new plan cost 157.80 -> 1,390.59
    q = downgrade_refund(Decimal(3000), D(2022, 11, 1), D(2023, 2, 1), D(2022, 12, 15),
                         Decimal(100))
    assert q.parts["used_days"] == "45" and q.parts["total_days"] == "93"
    assert q.parts["unused_value"] == "1548.39"
    assert q.parts["new_plan_cost"] == "157.80"
    assert q.amount == Decimal("1390.59")


def test_rounding_favours_the_customer() -> None:
    assert charge(Decimal("1.239999")) == Decimal("1.23")
    assert refund(Decimal("1.230001")) == Decimal("1.24")
    assert refund(Decimal("1.23")) == Decimal("1.23") == charge(Decimal("1.23"))


@pytest.mark.parametrize(("old", "new", "today", "expires", "discount", "expected"), [
    # 19.9 -> 199 over 30 days: 179.1 x 30 x 12 / 365 = 176.646... -> 176.64
    ("19.9", "199", D(2024, 2, 1), D(2024, 3, 2), "1", "176.64"),
    # leap February counted: 2024-02-01 -> 2024-03-01 is 29 days
    ("199", "999", D(2024, 2, 1), D(2024, 3, 1), "1", "762.73"),
    # with a discount of 0.8
    ("199", "999", D(2024, 2, 1), D(2024, 3, 1), "0.8", "610.19"),
    # multiples of 73 days are whole numbers of (365/12)-day months: exact, not 1 fen short
    ("0", "100", D(2023, 1, 1), D(2024, 1, 1), "1", "1200.00"),
    ("0", "100", D(2023, 1, 1), D(2023, 3, 15), "1", "240.00"),
    # on the expiry day: nothing left to pay
    ("100", "1000", D(2023, 2, 1), D(2023, 2, 1), "1", "0.00"),
])
def test_upgrade_fees(old, new, today, expires, discount, expected) -> None:
    q = upgrade_fee(Decimal(old), Decimal(new), today, expires, Decimal(discount))
    assert q.amount == Decimal(expected)


def test_downgrade_worth_nothing_refunds_nothing() -> None:
    # Almost the whole period used, new plan dearer per remaining day than what is left.
    q = downgrade_refund(Decimal(199), D(2024, 1, 1), D(2024, 2, 1), D(2024, 1, 31),
                         Decimal(999))
    assert q.amount == Decimal("0.00")


def test_downgrade_on_the_first_day() -> None:
    # 12 months of enterprise (11,988) bought 2024-01-01, downgraded the same day to standard.
    q = downgrade_refund(Decimal(11988), D(2024, 1, 1), D(2025, 1, 1), D(2024, 1, 1),
                         Decimal(199))
    # used 1 of 367 days: 11988 x 366/367 = 11955.335... -> 11955.34 up;
    # 366 days of standard: 366 x 199 x 12 / 365 = 2394.54... -> 2394.54 down
    assert q.parts["unused_value"] == "11955.34"
    assert q.parts["new_plan_cost"] == "2394.54"
    assert q.amount == Decimal("9560.80")


def test_downgrade_new_plan_cost_exact_on_73_days() -> None:
    # 73 days of a 100 CNY plan cost exactly 240.00 (not 239.99).
    q = downgrade_refund(Decimal(1200), D(2023, 1, 1), D(2024, 1, 1), D(2023, 10, 20),
                         Decimal(100))
    assert q.parts["remaining_days"] == "73" and q.parts["new_plan_cost"] == "240.00"


def test_a_gateway_version_change_is_prorated_by_the_days_bought() -> None:
    """starter (8,999) <-> test (899): 8,100 a month of difference. Bought 2026-01-01 for a
    month (31 days): changed that day, exactly 8,100; on 01-18 (14 days left), 8,100 x 14 / 31
    = 3,658.0645...: 3,658.06 to pay up, 3,658.07 back down. Three months from 07-01 (92 days)
    changed that day: 24,300 back, the difference prepaid, not 24,499.73 by 365/12-day months."""
    test = GatewayVersion(qps=100, mbps=1, price="899")
    starter = GatewayVersion(qps=1000, mbps=20, price="8999")
    start, ends = dt.date(2026, 1, 1), dt.date(2026, 2, 1)
    down = change_quote(starter, test, start, start, ends, 1)
    assert (down.change, down.amount, down.days_left) == ("downgrade", Decimal("8100.00"), 31)
    up = change_quote(test, starter, dt.date(2026, 1, 18), start, ends, 1)
    assert (up.change, up.amount, up.days_left) == ("upgrade", Decimal("3658.06"), 14)
    assert change_quote(starter, test, dt.date(2026, 1, 18), start, ends, 1).amount == \
        Decimal("3658.07")
    quarter = change_quote(starter, test, dt.date(2026, 7, 1), dt.date(2026, 7, 1),
                           dt.date(2026, 10, 1), 3)
    assert quarter.amount == Decimal("24300.00")
    assert change_quote(starter, test, ends, start, ends, 1).amount == Decimal("0.00")
    same = change_quote(test, GatewayVersion(qps=200, mbps=2, price="899"), start, start, ends, 1)
    assert (same.change, same.amount) == ("change", Decimal("0.00"))
