"""The entitlement snapshot: what decide.lua reads about one environment, in one JSON value.

Built from config (or, later, the admin API) by pure functions; written to the store by
``sync``. Usage and pack consumption live in other keys, so rewriting the snapshot never resets
them.
"""

from __future__ import annotations

import datetime as dt
import functools
import zoneinfo
from typing import Any

import msgspec

from quotagate.common import calendar as cal
from quotagate.settings.schema import (
    BYTES_PER_MBPS,
    PAYG_METERS,
    Environment,
    GatewayGrant,
    GatewayVersion,
    Limits,
    Plan,
    PlansFile,
)

GIB = 1024**3

#: Days an isolated environment is kept before it is released (SPEC §11).
ISOLATION_DAYS = 15

SNAPSHOT_VERSION = 3

#: Meters with a per-cycle quota in the snapshot.
CHARGED_METERS = tuple(m for m in PAYG_METERS if m != "capacity_bytes")

#: gbs is counted in MB·ms (exact integers): 1 GBs = 1024 MB x 1000 ms.
MBMS_PER_GBS = 1024 * 1000


def effective_limits(plan: Plan, overrides: Limits) -> dict[str, int]:
    """Plan limits with per-environment overrides, in meter units: bytes for *_bytes, MB·ms for
    gbs."""

    def pick(name: str) -> int:
        value = getattr(overrides, name)
        return int(getattr(plan, name) if value is None else value)

    qps = overrides.qps if overrides.qps is not None else plan.qps
    assert qps is not None, "validated: plans without QPS need limits.qps"
    return {
        "qps": int(qps),
        "calls": pick("calls"),
        "gbs": pick("gbs") * MBMS_PER_GBS,
        "outbound_bytes": pick("outbound_gb") * GIB,
        "storage_traffic_bytes": pick("storage_traffic_gb") * GIB,
        "cdn_origin_bytes": pick("cdn_origin_gb") * GIB,
        "capacity_bytes": pick("capacity_gb") * GIB,
        "ai_tokens": pick("ai_tokens"),
        "sms": 0,  # the plan has no SMS quota: SMS go through packs, then calls
        "realtime": pick("realtime"),
        "function_concurrency": pick("function_concurrency"),
    }


def gateway_expires(grant: GatewayGrant) -> dt.date:
    """The first day the version no longer covers: ``purchased`` + ``months``."""
    return cal.add_months_clamped(grant.purchased, grant.months)


def lowest_version(plans: PlansFile) -> GatewayVersion:
    """What an expired version falls back to: the one with the least QPS (then bandwidth)."""
    return min(plans.gateway_versions.values(), key=lambda v: (v.qps, v.mbps))


def gateway_entry(grant: GatewayGrant, plans: PlansFile) -> dict[str, int]:
    """The snapshot's ``gw``: the version's caps from ``from`` to ``to`` (a day number; 0 while
    it renews itself), then the lowest version's (SPEC §15: an expired version falls back)."""
    version = plans.gateway_versions[grant.version]
    lowest = lowest_version(plans)
    return {
        "from": cal.day_number(grant.purchased),
        "to": 0 if grant.auto_renew else cal.day_number(gateway_expires(grant)),
        "qps": version.qps, "bps": version.mbps * BYTES_PER_MBPS,
        "qps_after": lowest.qps, "bps_after": lowest.mbps * BYTES_PER_MBPS,
    }


def build_snapshot(
    env: Environment, plans: PlansFile, default_timezone: str
) -> dict[str, Any]:
    """The JSON-able snapshot decide.lua reads (see the header of decide.lua)."""
    plan = plans.plans[env.plan]
    tz = zoneinfo.ZoneInfo(env.timezone or default_timezone)
    release = env.expires + dt.timedelta(days=ISOLATION_DAYS)
    cycles, offsets = _calendar(env.anchor, env.expires, tz.key)
    limits = effective_limits(plan, env.limits)

    packs = []
    for grant in env.packs:
        if grant.pack:
            spec = plans.resource_packs[grant.pack]
            meter, amount, days = spec.meter, spec.amount, spec.days
        else:
            assert grant.meter is not None and grant.amount is not None
            meter, amount, days = grant.meter, grant.amount, 30
        first = cal.day_number(grant.purchased)
        packs.append({"id": grant.id, "meter": meter, "amount": amount,
                      "from": first, "to": first + days})
    # Earliest expiry first (SPEC §5); ties by id so every instance orders them alike.
    packs.sort(key=lambda p: (p["to"], p["id"]))

    promos = []
    for promo in env.promos:
        promo_spec = plans.promo_packs[promo.pack]
        first = cal.day_number(promo.start)
        promos.append({
            "id": promo.id, "pack": promo.pack, "from": first, "to": first + promo.days,
            "qps": promo_spec.qps or 0, "fc": promo_spec.function_concurrency or 0,
            "rt": promo_spec.realtime or 0, "db": 1 if promo_spec.database_free else 0,
        })

    snapshot: dict[str, Any] = {
        "v": SNAPSHOT_VERSION,
        "plan": env.plan,
        "mode": env.mode or "",
        "overage": 1 if env.overage else 0,
        "qps": limits["qps"],
        # The meters the scripts charge, and the capacity gauge's limit.
        "quota": {m: limits[m] for m in (*CHARGED_METERS, "capacity_bytes")},
        "caps": {"rt": limits["realtime"], "fc": limits["function_concurrency"]},
        "timezone": tz.key,
        "tz": [list(t) for t in offsets],
        "cycles": list(cycles),
        "anchor_day": cal.day_number(env.anchor),
        "expire_day": cal.day_number(env.expires),
        "release_day": cal.day_number(release),
        "packs": packs,
        "promos": promos,
        "sms_calls": plans.sms_call_cost,
    }
    if env.gateway is not None:  # absent: no version (older code reads the same layout)
        snapshot["gw"] = gateway_entry(env.gateway, plans)
    return snapshot


@functools.lru_cache(maxsize=8192)
def _calendar(anchor: dt.date, expires: dt.date, tz_key: str
              ) -> tuple[tuple[int, ...], tuple[tuple[int, ...], ...]]:
    """The cycle start days and the zone's offset table of a period: the same for every
    environment bought on one day in one zone, so worked out once for them (10^5 snapshots
    built at a start or a plans change)."""
    release = expires + dt.timedelta(days=ISOLATION_DAYS)
    cycles = tuple(cal.day_number(d) for d in cal.cycle_starts(anchor, expires))
    offsets = tuple(tuple(t) for t in
                    cal.offset_transitions(zoneinfo.ZoneInfo(tz_key), anchor, release))
    return cycles, offsets


def encode(snapshot: dict[str, Any]) -> str:
    """The snapshot as compact JSON, keys sorted (every instance writes the same bytes)."""
    return msgspec.json.encode(snapshot, order="sorted").decode()
