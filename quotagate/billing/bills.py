"""Pay-as-you-go bills (SPEC §6): per environment, meter and local day, at list price, exact.

The gateway records pay-as-you-go usage per environment and local day in ``qg:{env}:payg``
(``<day>:<meter>``); a bill line is that quantity times the meter's list price, rounded down to
the fen (a charge). Quantities are the store's integers, so the totals reconcile to the unit
with what the gateway counted.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

from quotagate.billing.pricing import charge
from quotagate.common import calendar as cal
from quotagate.limiter import keys
from quotagate.limiter.entitlements import MBMS_PER_GBS
from quotagate.settings.schema import PlansFile

#: Raw units per priced unit beyond the list price's ``per`` (gbs is counted in MB·ms).
_SCALE = {"gbs": MBMS_PER_GBS}
UNITS = {"calls": "calls", "gbs": "MB·ms", "outbound_bytes": "bytes",
         "storage_traffic_bytes": "bytes", "cdn_origin_bytes": "bytes",
         "capacity_bytes": "byte-days"}


@dataclass(frozen=True)
class BillLine:
    env: str
    day: str
    meter: str
    quantity: int  # in the meter's raw unit
    unit: str
    unit_price: str  # CNY per `per` units (x the scale for gbs)
    per: str
    amount: str  # CNY, rounded down to the fen

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def price_line(plans: PlansFile, env: str, day: dt.date, meter: str, quantity: int
               ) -> BillLine:
    price = plans.payg_prices.get(meter)
    if price is None:  # plans.yaml is refused without one (check_plans): never billed at 0
        raise ValueError(f"no pay-as-you-go price for {meter} in plans.yaml")
    per = Decimal(price.per) * _SCALE.get(meter, 1)
    amount = charge(Decimal(quantity) * Decimal(price.price) / per)
    return BillLine(env, day.isoformat(), meter, quantity, UNITS.get(meter, "units"),
                    price.price, str(per), str(amount))


async def bill(redis: Any, plans: PlansFile, env_ids: list[str], day: dt.date
               ) -> list[BillLine]:
    """The lines of ``day`` (each environment's local day) for these environments."""
    number = cal.day_number(day)
    async with redis.pipeline(transaction=False) as pipe:
        for env in env_ids:
            pipe.hgetall(keys.payg(env))
        tables = await pipe.execute()
    lines = []
    for env, table in zip(env_ids, tables, strict=True):
        for field, value in sorted(table.items()):
            parts = field.decode().split(":")
            if len(parts) != 2 or parts[0] != str(number):  # :shadow / :unbilled are not billed
                continue
            lines.append(price_line(plans, env, day, parts[1], int(value)))
    return lines


async def billable_envs(redis: Any) -> list[str]:
    """Every environment with pay-as-you-go usage in the store, declared or not any more (a
    released environment's usage is kept for its bills)."""
    found = set()
    async for key in redis.scan_iter(match=f"{keys.PREFIX}:{{*}}:payg", count=1000):
        name = key.decode() if isinstance(key, bytes) else key
        found.add(name[len(keys.PREFIX) + 2:name.index("}")])
    return sorted(found)


def total(lines: list[BillLine]) -> Decimal:
    return sum((Decimal(line.amount) for line in lines), Decimal("0.00"))
