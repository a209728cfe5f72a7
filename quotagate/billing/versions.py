"""Gateway versions (SPEC §15): what a version costs, until when it runs, what it caps today.

A grant (``environments.yaml`` ``gateway``) was bought on ``purchased`` for ``months`` in all;
it runs to ``purchased`` + ``months`` (calendar months, clamped to the month's last day),
exclusive. Renewal by hand adds a term before that day. With ``auto_renew`` it renews itself on
that day by ``term_of`` months, and again at each end after: the enforcement (the snapshot's
``gw``) never lapses, and the scheduler tells each renewal (``gateway-renewed``, with its
price) for billing. Without it, from that day the environment has the lowest version's caps.

A running version can be changed for another at once, its expiry kept (``change_quote``): a
higher one costs the plan upgrade's fee of SPEC §11 — (new - old monthly price) x days until
expiry / (365/12) x discount, rounded down — and a lower one refunds its mirror, (old - new)
x the same days / (365/12) x discount, rounded up. Prepaid by the month, a version has no
usage to weigh, so the refund is the unused time's difference in price; the same discount on
both ways keeps an upgrade and the downgrade back from paying out more than was paid.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

from quotagate.billing.pricing import Quote, per_month_days, refund, upgrade_fee
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


def change_quote(old: GatewayVersion, new: GatewayVersion, today: dt.date, ends: dt.date,
                 discount: Decimal = Decimal(1)) -> Quote:
    """The price of changing a running version for ``new`` until ``ends`` (exclusive): an
    upgrade's fee when ``new`` costs more a month, else the downgrade's refund."""
    old_price, new_price = Decimal(old.price), Decimal(new.price)
    if new_price > old_price:
        return upgrade_fee(old_price, new_price, today, ends, discount)
    days = max(0, (ends - today).days)
    with decimal.localcontext(decimal.Context(prec=40)):
        back = refund(per_month_days(old_price - new_price, days) * discount)
    return Quote("downgrade", back, days, {
        "monthly_difference": str(new_price - old_price), "days_until_expiry": str(days),
        "discount": str(discount), "refund": str(back)})


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
