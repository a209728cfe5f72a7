"""Plan-change prices of SPEC §11, in exact decimal.

- Upgrade: fee = (new - old monthly price) x days until expiry / (365/12) x discount.
- Downgrade: refund = (paid - used days / total days x paid) - remaining days / (365/12) x new
  monthly price; nothing when that is <= 0. Used and total days count both ends.
- A charge is rounded down to the fen, a refund up (in the customer's favour); each part of a
  downgrade is rounded on its own (the refund up, the new plan's cost down), as the seed
  example does: 1,548.39 back - 157.80 for the new plan = 1,390.59.
"""

from __future__ import annotations

import datetime as dt
import decimal
from dataclasses import dataclass
from decimal import ROUND_DOWN, ROUND_UP, Decimal

FEN = Decimal("0.01")
_CONTEXT = decimal.Context(prec=40)


def per_month_days(amount: Decimal, days: int) -> Decimal:
    """amount x days / (365/12), computed as amount x days x 12 / 365: one division, last,
    so no rounded 365/12 ever enters a price (100 CNY over 73 days is exactly 240)."""
    with decimal.localcontext(_CONTEXT):
        return amount * days * 12 / 365


def charge(amount: Decimal) -> Decimal:
    """What the customer pays: rounded down to the fen."""
    return amount.quantize(FEN, rounding=ROUND_DOWN, context=_CONTEXT)


def refund(amount: Decimal) -> Decimal:
    """What the customer gets back: rounded up to the fen."""
    return amount.quantize(FEN, rounding=ROUND_UP, context=_CONTEXT)


@dataclass(frozen=True)
class Quote:
    """The price of a plan change: ``amount`` >= 0 is paid (upgrade) or refunded (downgrade)."""

    change: str  # "upgrade" | "downgrade" (| "change": a gateway version of the same price)
    amount: Decimal
    days_left: int
    #: The figures the amount is made of, as strings (for the API and the CLI).
    parts: dict[str, str]


def upgrade_fee(old_price: Decimal, new_price: Decimal, today: dt.date, expires: dt.date,
                discount: Decimal = Decimal(1)) -> Quote:
    days = max(0, (expires - today).days)
    with decimal.localcontext(_CONTEXT):
        fee = per_month_days(new_price - old_price, days) * discount
    amount = charge(max(fee, Decimal(0)))
    return Quote("upgrade", amount, days, {
        "monthly_difference": str(new_price - old_price), "days_until_expiry": str(days),
        "discount": str(discount), "fee": str(amount)})


def downgrade_refund(paid: Decimal, period_start: dt.date, expires: dt.date, today: dt.date,
                     new_price: Decimal) -> Quote:
    total_days = (expires - period_start).days + 1
    used_days = min(total_days, max(0, (today - period_start).days + 1))
    remaining = max(0, (expires - today).days)
    with decimal.localcontext(_CONTEXT):
        back = refund(paid - Decimal(used_days) / Decimal(total_days) * paid)
        new_cost = charge(per_month_days(new_price, remaining))
    amount = back - new_cost
    if amount <= 0:
        amount = Decimal("0.00")
    return Quote("downgrade", amount, remaining, {
        "paid": str(paid), "used_days": str(used_days), "total_days": str(total_days),
        "unused_value": str(back), "remaining_days": str(remaining),
        "new_plan_cost": str(new_cost), "refund": str(amount)})
