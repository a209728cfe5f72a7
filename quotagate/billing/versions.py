"""Gateway versions (SPEC §15): what a version costs, until when it runs, what it caps today.

A grant (``environments.yaml`` ``gateway``) was bought on ``purchased`` for ``months`` in all;
it runs to ``purchased`` + ``months`` (calendar months, clamped to the month's last day),
exclusive. Renewal by hand adds a term before that day. With ``auto_renew`` it renews itself on
that day by ``term_of`` months, and again at each end after: the enforcement (the snapshot's
``gw``) never lapses, and the scheduler tells each renewal (``gateway-renewed``, with its
price) for billing. Without it, from that day the environment has the lowest version's caps.

A running version can be changed for another at once, its expiry kept (``change_quote``):
the difference in monthly price times the months prepaid, for the share of the prepaid days
still to run — paid for a dearer version (rounded down to the fen), refunded for a cheaper one
(rounded up). Prorated by the calendar days actually bought, not by 365/12-day months: a change
on the day of purchase moves exactly the difference of the two prices, and a refund never
exceeds the difference prepaid. At list price, as versions are bought and renewed (the
environment's ``discount`` is the plan's).
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from quotagate.billing.pricing import Quote, charge, refund
from quotagate.common.calendar import add_months_clamped
from quotagate.limiter.entitlements import lowest_version
from quotagate.settings.schema import (
    BYTES_PER_MBPS,
    GATEWAY_TERMS,
    GatewayGrant,
    GatewayVersion,
    PlansFile,
)

#: The most renewals ``renewals`` walks (100 years of monthly ones).
MAX_RENEWALS = 1200


def price(version: GatewayVersion, months: int) -> Decimal:
    """Prepaid: the monthly price times the months, exact (no discount for longer terms)."""
    return Decimal(version.price) * months


def change_quote(old: GatewayVersion, new: GatewayVersion, today: dt.date, start: dt.date,
                 ends: dt.date, months: int) -> Quote:
    """The price of changing a running version for ``new`` today, for the ``months`` prepaid
    from ``start`` to ``ends`` (exclusive): "upgrade" (paid), "downgrade" (refunded), or
    "change" between versions of one price (nothing either way)."""
    difference = Decimal(new.price) - Decimal(old.price)
    span = (ends - start).days
    left = max(0, min(span, (ends - today).days))
    with decimal.localcontext(decimal.Context(prec=40)):
        exact = abs(difference) * months * left / span
    if difference > 0:
        change, amount = "upgrade", charge(exact)
    elif difference < 0:
        change, amount = "downgrade", refund(exact)
    else:
        change, amount = "change", Decimal("0.00")
    return Quote(change, amount, left, {
        "monthly_difference": str(difference), "months_prepaid": str(months),
        "days_prepaid": str(span), "days_left": str(left), "amount": str(amount)})


def term_of(grant: GatewayGrant) -> int:
    """What an automatic renewal buys: ``renew_months``, else the grant's months if that is a
    term sold, else one month."""
    if grant.renew_months is not None:
        return grant.renew_months
    return grant.months if grant.months in GATEWAY_TERMS else 1


def expiry(grant: GatewayGrant, months: int | None = None) -> dt.date:
    return add_months_clamped(grant.purchased, grant.months if months is None else months)


def renewals(grant: GatewayGrant, today: dt.date) -> Iterator[tuple[dt.date, dt.date]]:
    """Automatic renewals due by ``today``: (the day it renewed, the new expiry)."""
    if not grant.auto_renew:
        return
    months, term = grant.months, term_of(grant)
    for _ in range(MAX_RENEWALS):
        ends = expiry(grant, months)
        if ends > today:
            return
        months += term
        yield ends, expiry(grant, months)


def months_bought(grant: GatewayGrant, today: dt.date) -> int:
    """The months bought by ``today``: the grant's and its automatic renewals so far."""
    return grant.months + sum(1 for _ in renewals(grant, today)) * term_of(grant)


@dataclass(frozen=True)
class Status:
    version: str
    #: "active", "expired" (the lowest version's caps apply) or "pending" (bought for later).
    state: str
    #: The end of the period that runs now (after automatic renewals), exclusive.
    expires: dt.date
    #: The version whose caps apply today ("" while pending: none).
    in_effect: str
    qps: int
    mbps: int

    def as_dict(self, grant: GatewayGrant, plans: PlansFile) -> dict[str, object]:
        bought = plans.gateway_versions[grant.version]
        return {"version": self.version, "state": self.state,
                "purchased": grant.purchased.isoformat(), "months": grant.months,
                "expires": self.expires.isoformat(), "auto_renew": grant.auto_renew,
                "renew_months": term_of(grant) if grant.auto_renew else None,
                "monthly_price": f"{Decimal(bought.price):.2f}", "in_effect": self.in_effect,
                "qps": self.qps, "mbps": self.mbps,
                "bytes_per_second": self.mbps * BYTES_PER_MBPS}


def status(grant: GatewayGrant, plans: PlansFile, today: dt.date) -> Status:
    bought = plans.gateway_versions[grant.version]
    ends = max([expiry(grant), *(new for _, new in renewals(grant, today))])
    if today < grant.purchased:
        return Status(grant.version, "pending", ends, "", 0, 0)
    if today < ends:
        return Status(grant.version, "active", ends, grant.version, bought.qps, bought.mbps)
    low = lowest_version(plans)
    name = next(n for n, v in plans.gateway_versions.items() if v is low)
    return Status(grant.version, "expired", ends, name, low.qps, low.mbps)
