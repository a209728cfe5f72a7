"""Usage of one environment, per meter, read from the store: plan quota, used from the plan,
each pack's remaining and expiry, pay-as-you-go so far this cycle, what each day of the cycle
used (plan, packs and beyond; counted by the scripts), the cycle, the QPS limit in
force (and which cap decides it: the plan, a promo pack or the gateway version) and the open
slots."""

from __future__ import annotations

import datetime as dt
from typing import Any

from quotagate.billing import versions
from quotagate.common import calendar as cal
from quotagate.control.envs import Environments, Record
from quotagate.limiter import keys
from quotagate.limiter.entitlements import CHARGED_METERS, MBMS_PER_GBS, effective_limits

#: Units of each meter in reports (gbs is counted in MB·ms and shown in GBs too).
UNITS = {"calls": "calls", "gbs": "MB·ms", "outbound_bytes": "bytes",
         "storage_traffic_bytes": "bytes", "cdn_origin_bytes": "bytes", "ai_tokens": "tokens",
         "sms": "messages", "capacity_bytes": "bytes"}


async def usage_report(envs: Environments, record: Record) -> dict[str, Any]:
    env_id, env = record.env_id, record.env
    config = envs.config
    plan = config.plans.plans[env.plan]
    limits = effective_limits(plan, env.limits)
    today = envs.today(env)
    start, end = cal.cycle_of(env.anchor, min(today, env.expires - dt.timedelta(days=1)))
    cycle, first, last = cal.day_number(start), cal.day_number(start), cal.day_number(end)
    async with envs.redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(keys.usage(env_id))
        pipe.hgetall(keys.pack_usage(env_id))
        pipe.hgetall(keys.payg(env_id))
        pipe.hgetall(keys.slots(env_id))
        pipe.hgetall(keys.days(env_id))
        usage, pack_used, payg, slots, per_day = await pipe.execute()

    def num(mapping: dict[bytes, bytes], field: str) -> int:
        return int(mapping.get(field.encode(), 0))

    meters: dict[str, Any] = {}
    for meter in (*CHARGED_METERS, "sms", "capacity_bytes"):
        packs: list[dict[str, Any]] = []
        for grant in env.packs:
            p_meter: str | None
            if grant.pack:
                spec = config.plans.resource_packs[grant.pack]
                p_meter, amount, days = spec.meter, spec.amount, spec.days
            else:
                p_meter, amount, days = grant.meter, grant.amount or 0, 30
            if p_meter != meter:
                continue
            expires = grant.purchased + dt.timedelta(days=days)
            used = num(pack_used, grant.id)
            packs.append({"id": grant.id, "amount": amount, "used": used,
                          "remaining": max(0, amount - used) if today < expires else 0,
                          "purchased": grant.purchased.isoformat(),
                          "expires": expires.isoformat(), "valid": grant.purchased <= today
                          < expires})
        payg_cycle = sum(int(v) for f, v in payg.items()
                         if f.decode().endswith(f":{meter}")
                         and first <= int(f.decode().split(":")[0]) < last)
        quota = limits.get(meter, 0)
        used_plan = num(usage, f"{cycle}:{meter}")
        entry: dict[str, Any] = {
            "unit": UNITS[meter], "quota": quota, "used": used_plan,
            "plan_remaining": max(0, quota - used_plan), "packs": packs,
            "payg": payg_cycle,
            "remaining": max(0, quota - used_plan) + sum(p["remaining"] for p in packs
                                                         if p["valid"]),
        }
        if meter == "gbs":
            entry["used_gbs"] = str(used_plan / MBMS_PER_GBS)
        if meter != "capacity_bytes":  # (a gauge: no day's use to count)
            entry["days"] = [{"date": cal.date_of(day).isoformat(),
                              "used": num(per_day, f"{day}:{meter}")}
                             for day in range(first, min(cal.day_number(today), last - 1) + 1)]
        meters[meter] = entry

    # Capacity is a gauge: "used" is the size last reported; packs add room, none is spent.
    capacity = meters["capacity_bytes"]
    room = limits["capacity_bytes"] + sum(p["amount"] for p in capacity["packs"] if p["valid"])
    current = num(usage, "gauge:capacity_bytes")
    for p in capacity["packs"]:
        p["used"], p["remaining"] = 0, p["amount"] if p["valid"] else 0
    capacity.update(used=current, current=current, plan_remaining=max(0, capacity["quota"]
                    - current), with_packs=room, remaining=max(0, room - current))

    qps, qps_by = limits["qps"], "plan"
    rt_cap, fc_cap = limits["realtime"], limits["function_concurrency"]
    for promo in env.promos:
        promo_spec = config.plans.promo_packs[promo.pack]
        if promo.start <= today < promo.start + dt.timedelta(days=promo.days):
            if (promo_spec.qps or 0) > qps:
                qps, qps_by = promo_spec.qps or 0, "promo"
            rt_cap = max(rt_cap, promo_spec.realtime or 0)
            fc_cap = max(fc_cap, promo_spec.function_concurrency or 0)
    # The gateway version caps what plan and promos allow (SPEC §15), as decide.lua does: the
    # lower of the two, from the day it was bought; the lowest version's once it has expired.
    version = versions.status(env.gateway, config.plans, today) if env.gateway else None
    if version is not None and version.in_effect and version.qps < qps:
        qps, qps_by = version.qps, "gateway-version"
    functions = {f.decode()[4:]: int(v) for f, v in slots.items()
                 if f.startswith(b"=fn:")}
    return {
        "env": env_id, "owner": record.owner, "plan": env.plan, "overage": env.overage,
        # The enforcement in effect, and whether it is the environment's own or the gateway's.
        "mode": env.mode or config.gateway.enforcement,
        "mode_by": "environment" if env.mode else "gateway",
        "today": today.isoformat(),
        "cycle": {"start": start.isoformat(), "end": end.isoformat()},
        "expires": env.expires.isoformat(),
        "qps_limit": qps,
        "qps_limit_by": qps_by,
        "realtime": {"open": num(slots, "=rt:"), "cap": rt_cap},
        "function_concurrency": {"in_flight": functions, "cap": fc_cap},
        "meters": meters,
    }
