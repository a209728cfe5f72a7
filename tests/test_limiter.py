"""decide.lua through the Limiter, against real Valkey and Redis, with an injected clock."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.common.clock import ManualClock
from quotagate.limiter import keys
from quotagate.limiter.codes import Flag, Outcome
from tests.helpers import at, env, local, synced_limiter, write_config


@pytest.fixture
async def make_limiter(store_url):
    made = []

    async def factory(config, clock=None, url=None, **kw):
        lim = await synced_limiter(url or store_url, config, clock, **kw)
        made.append(lim)
        return lim

    yield factory
    for lim in made:
        await lim.close()


async def outcomes(lim, env_id, n, kind="function", cost=1):
    results = await asyncio.gather(*(lim.decide(env_id, kind, cost) for _ in range(n)))
    return Counter(r.outcome for r in results), results


async def test_admits_and_reports_quota(tmp_path: Path, make_limiter):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 100})})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    d = await lim.decide("shop", "function", 1)
    assert d.outcome is Outcome.ADMITTED
    assert d.quota == 100 and d.remaining == 99
    assert d.qps_limit == 500
    # Cycle 2026-11-01 .. 2026-12-01 00:00 +08:00; now is 11-26 12:00 -> 4 d 12 h left.
    assert d.window_s == 30 * 86400
    assert d.reset_ms == (4 * 86400 + 12 * 3600) * 1000


async def test_unknown_environment_is_not_found(tmp_path: Path, make_limiter):
    config = write_config(tmp_path, {"shop": env()})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    d = await lim.decide("nobody", "function", 1)
    assert d.outcome is Outcome.NOT_FOUND and not d.admitted


async def test_exactly_quota_admitted_across_instances(tmp_path: Path, make_limiter, store_url):
    """Hundreds of concurrent requests over three independent limiters sharing one store."""
    quota = 250
    config = write_config(tmp_path, {"shop": env(limits={"calls": quota, "qps": 1_000_000})})
    clock = at("2026-11-26T12:00:00")
    # A slow machine must not turn this into a test of fail-open: every decision waits for
    # the store (5 s), and a bypass fails the test by its name, not as a miscount.
    instances = [await make_limiter(config, clock, timeout_ms=5_000) for _ in range(3)]
    for round_ in range(3):
        client = aredis.Redis.from_url(store_url)
        await client.delete(keys.usage("shop"))
        await client.aclose()
        tasks = [instances[i % 3].decide("shop", "function", 1) for i in range(quota + 150)]
        results = await asyncio.gather(*tasks)
        assert not any(r.store_bypassed for r in results), f"round {round_}: store timed out"
        admitted = sum(r.outcome is Outcome.ADMITTED for r in results)
        refused = sum(r.outcome is Outcome.QUOTA_EXCEEDED for r in results)
        assert (admitted, refused) == (quota, 150), f"round {round_}"


async def test_refused_request_consumes_nothing(tmp_path: Path, make_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 30})})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    d = await lim.decide("shop", "ai", 50)
    assert d.outcome is Outcome.QUOTA_EXCEEDED and d.meter == "calls"
    assert d.retry_after_ms == d.reset_ms
    assert await redis_client.hgetall(keys.usage("shop")) == {}
    assert await redis_client.get(keys.qps("shop")) is None
    assert (await lim.decide("shop", "function", 30)).outcome is Outcome.ADMITTED


async def test_waterfall_plan_then_packs_earliest_expiry_first(
    tmp_path: Path, make_limiter, redis_client
):
    packs = [
        {"id": "late", "meter": "calls", "amount": 5, "purchased": "2026-11-20"},   # to 12-20
        {"id": "early", "meter": "calls", "amount": 5, "purchased": "2026-11-10"},  # to 12-10
        {"id": "gone", "meter": "calls", "amount": 99, "purchased": "2026-10-01"},  # to 10-31
        {"id": "future", "meter": "calls", "amount": 99, "purchased": "2026-12-01"},
    ]
    config = write_config(tmp_path, {"shop": env(limits={"calls": 10}, packs=packs)})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    first = await lim.decide("shop", "function", 1)
    assert first.remaining == 10 + 5 + 5 - 1
    await lim.decide("shop", "function", 11)  # plan 10 + 2 from "early"
    assert await redis_client.hgetall(keys.pack_usage("shop")) == {b"early": b"2"}
    await lim.decide("shop", "function", 5)  # early 3 + late 2
    used = await redis_client.hgetall(keys.pack_usage("shop"))
    assert used == {b"early": b"5", b"late": b"2"}
    last = await lim.decide("shop", "function", 3)
    assert last.outcome is Outcome.ADMITTED and last.remaining == 0
    d = await lim.decide("shop", "function", 1)
    assert d.outcome is Outcome.QUOTA_EXCEEDED  # "gone" expired, "future" not yet valid


async def test_pack_valid_thirty_natural_days_in_env_timezone(tmp_path: Path, make_limiter):
    packs = [{"id": "p", "meter": "calls", "amount": 100, "purchased": "2026-11-20"}]
    config = write_config(tmp_path, {"shop": env(limits={"calls": 0}, packs=packs)})
    clock = at("2026-12-19T23:59:59")  # day 30 of the pack, local time
    lim = await make_limiter(config, clock)
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
    clock.advance(seconds=1)  # 12-20 00:00 local: expired
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.QUOTA_EXCEEDED


async def test_overage_records_payg_per_local_day(tmp_path: Path, make_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 3}, overage=True)})
    clock = at("2026-11-26T23:59:58")
    lim = await make_limiter(config, clock)
    for _ in range(5):
        d = await lim.decide("shop", "function", 1)
        assert d.outcome is Outcome.ADMITTED
    assert d.flags & Flag.PAYG and d.remaining == 0
    clock.advance(seconds=2)  # local midnight: a new billing day, same cycle
    await lim.decide("shop", "ai", 50)
    payg = await redis_client.hgetall(keys.payg("shop"))
    import datetime as dt

    day26 = day_number(dt.date(2026, 11, 26))
    assert payg == {f"{day26}:calls".encode(): b"2", f"{day26 + 1}:calls".encode(): b"50"}


async def test_each_day_counts_what_it_used(tmp_path: Path, make_limiter, redis_client):
    """The day's counts (the usage report's chart): every call charged counts on its local
    day, from the plan and beyond (overage on); a refund takes off its day's; ingested usage
    counts under its meter; refusals and free requests count nothing; a day's first charge
    finding more than 96 days kept forgets those older than 31 (a cycle's first day is at
    most 30 days back), and only then (most first charges cost no walk of the hash)."""
    config = write_config(tmp_path, {"shop": env(limits={"calls": 3, "qps": 1_000_000},
                                                 overage=True),
                                     "stop": env(limits={"calls": 2, "qps": 1_000_000})})
    clock = at("2026-11-26T23:59:58")
    lim = await make_limiter(config, clock)
    day26 = day_number(__import__("datetime").date(2026, 11, 26))
    await redis_client.hset(keys.days("shop"), mapping={  # days long gone, and one not yet
        f"{day26 - 300}:calls": 9, f"{day26 - 32}:calls": 8, f"{day26 - 31}:calls": 7,
        f"{day26 - 31}:gbs": 6, **{f"{day26 - 32 - n}:gbs": n for n in range(100)}})
    for _ in range(5):
        assert (await lim.decide("shop", "function", 1)).admitted
    assert (await lim.decide("shop", "ai", 50)).admitted
    lim.refund("shop", "calls", 50, clock.now_ms())
    assert await lim.ingest("shop", "rec-1", "ai_tokens", 1234, clock.now_ms()) == 0
    clock.advance(seconds=3)  # local midnight: the 27th
    for _ in range(2):
        assert (await lim.decide("shop", "function", 1)).admitted
    results = [await lim.decide("stop", "function", 1) for _ in range(4)]
    assert [r.admitted for r in results] == [True, True, False, False]
    await lim.close()
    days = {k.decode(): int(v) for k, v in (await redis_client.hgetall(keys.days("shop"))).items()}
    assert days == {f"{day26}:calls": 5, f"{day26}:ai_tokens": 1234,
                    f"{day26 + 1}:calls": 2, f"{day26 - 31}:calls": 7,
                    f"{day26 - 31}:gbs": 6}
    assert await redis_client.hgetall(keys.days("stop")) == {f"{day26 + 1}:calls".encode(): b"2"}
    # Kept 40 days from its last day of use: an environment no longer used loses them.
    assert 39 * 86_400_000 < await redis_client.pttl(keys.days("shop")) <= 40 * 86_400_000


async def test_shadow_counts_and_never_refuses(tmp_path: Path, make_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"calls": 2})})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"), mode="shadow")
    results = [await lim.decide("shop", "function", 1) for _ in range(4)]
    assert all(r.admitted for r in results)
    assert [r.outcome for r in results[2:]] == [Outcome.QUOTA_EXCEEDED] * 2
    assert all(r.flags & Flag.SHADOW_REFUSAL for r in results[2:])
    payg = await redis_client.hgetall(keys.payg("shop"))
    assert list(payg.values()) == [b"2"] and next(iter(payg)).endswith(b":calls:shadow")
    assert (await lim.decide("nobody", "function", 1)).admitted  # even unknown envs pass


async def test_sms_chain(tmp_path: Path, make_limiter, redis_client):
    """SMS packs -> plan calls (2,000 each) -> call packs -> call pay-as-you-go."""
    packs = [
        {"id": "s", "pack": "sms-1k", "purchased": "2026-11-20"},
        {"id": "c", "meter": "calls", "amount": 3000, "purchased": "2026-11-20"},
    ]
    config = write_config(tmp_path, {"shop": env(limits={"calls": 5000}, packs=packs)})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    assert (await lim.decide("shop", "sms", 1000)).outcome is Outcome.ADMITTED  # the SMS pack
    assert await redis_client.hgetall(keys.usage("shop")) == {}
    assert (await lim.decide("shop", "sms", 2)).outcome is Outcome.ADMITTED  # 4,000 plan calls
    d = await lim.decide("shop", "sms", 1)  # 1,000 plan calls + 1,000 from the call pack
    assert d.outcome is Outcome.ADMITTED and d.remaining == 2000
    refused = await lim.decide("shop", "sms", 2)  # 4,000 calls, 2,000 left, hard stop
    assert refused.outcome is Outcome.QUOTA_EXCEEDED and refused.meter == "sms"
    usage = await redis_client.hgetall(keys.usage("shop"))
    assert list(usage.values()) == [b"5000"]
    assert await redis_client.hgetall(keys.pack_usage("shop")) == {b"s": b"1000", b"c": b"1000"}


async def test_sms_chain_overage_bills_calls(tmp_path: Path, make_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(plan="personal", limits={"calls": 1000},
                                                 overage=True)})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    assert (await lim.decide("shop", "sms", 1)).flags & Flag.PAYG
    payg = await redis_client.hgetall(keys.payg("shop"))
    assert list(payg.values()) == [b"1000"] and next(iter(payg)).endswith(b":calls")


@pytest.mark.parametrize(
    ("anchor", "before", "after"),
    [
        # Anchor 31: February has no 31st -> the cycle resets on its last day.
        ("2026-01-31", "2026-02-27T23:59:59", "2026-02-28T00:00:00"),
        ("2028-01-31", "2028-02-28T23:59:59", "2028-02-29T00:00:00"),  # leap year
        ("2026-01-31", "2026-03-30T23:59:59", "2026-03-31T00:00:00"),  # back to the 31st
        ("2026-11-01", "2026-11-30T23:59:59", "2026-12-01T00:00:00"),
        ("2026-11-01", "2026-12-31T23:59:59", "2027-01-01T00:00:00"),  # year end
    ],
)
async def test_cycle_resets_at_local_midnight_of_anchor_day(
    tmp_path: Path, make_limiter, anchor, before, after
):
    config = write_config(tmp_path, {"shop": env(anchor=anchor, expires="2029-01-01",
                                                 limits={"calls": 1})})
    clock = at(before)
    lim = await make_limiter(config, clock)
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
    refused = await lim.decide("shop", "function", 1)
    assert refused.outcome is Outcome.QUOTA_EXCEEDED and refused.retry_after_ms == 1000
    clock.set(local(after))
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED


async def test_cycle_follows_environment_timezone(tmp_path: Path, make_limiter):
    import datetime as dt
    import zoneinfo

    la = zoneinfo.ZoneInfo("America/Los_Angeles")
    config = write_config(tmp_path, {
        "la": env(anchor="2026-10-05", timezone="America/Los_Angeles", limits={"calls": 1}),
        "sh": env(anchor="2026-10-05", limits={"calls": 1}),
    })
    # 2026-11-05 00:30 in Los Angeles (PST, after the DST end on 11-01) = 16:30 in Shanghai.
    clock = at("2026-11-04T23:59:00", tz=la)
    lim = await make_limiter(config, clock)
    for e in ("la", "sh"):
        assert (await lim.decide(e, "function", 1)).outcome is Outcome.ADMITTED
    d = await lim.decide("la", "function", 0)
    # Reset at 11-05 00:00 PST, one minute away; the cycle began 10-05 00:00 PDT, so it is
    # 31 days and the hour the clocks went back long.
    assert d.reset_ms == 60_000 and d.window_s == 31 * 86400 + 3600
    clock.set(dt.datetime(2026, 11, 5, 0, 0, tzinfo=la))
    assert (await lim.decide("la", "function", 1)).outcome is Outcome.ADMITTED  # reset in LA
    assert (await lim.decide("sh", "function", 1)).outcome is Outcome.QUOTA_EXCEEDED


async def test_promo_window_raises_qps_and_frees_database(tmp_path: Path, make_limiter):
    promos = [{"id": "d", "pack": "db-3k", "start": "2026-11-26", "days": 2}]
    config = write_config(tmp_path, {"shop": env(limits={"calls": 0}, promos=promos)})
    clock = at("2026-11-25T23:59:59")
    lim = await make_limiter(config, clock)
    before = await lim.decide("shop", "database", 1)
    assert before.outcome is Outcome.QUOTA_EXCEEDED and before.qps_limit == 500
    clock.advance(seconds=1)  # 11-26 00:00 local: the promo starts the day it is bought
    during = await lim.decide("shop", "database", 1)
    assert during.outcome is Outcome.ADMITTED and during.qps_limit == 10_000
    assert during.flags & Flag.DATABASE_FREE
    # Other kinds still cost calls.
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.QUOTA_EXCEEDED
    clock.set(local("2026-11-27T23:59:59"))
    assert (await lim.decide("shop", "database", 1)).outcome is Outcome.ADMITTED
    clock.advance(seconds=1)  # 11-28 00:00: two whole days are over
    after = await lim.decide("shop", "database", 1)
    assert after.outcome is Outcome.QUOTA_EXCEEDED and after.qps_limit == 500


async def test_combined_promos_take_the_highest_limit(tmp_path: Path, make_limiter):
    promos = [{"id": "f", "pack": "fn-500g", "start": "2026-11-26"},
              {"id": "d", "pack": "db-5k", "start": "2026-11-26"}]
    config = write_config(tmp_path, {"shop": env(promos=promos)})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    assert (await lim.decide("shop", "function", 1)).qps_limit == 20_000


@pytest.mark.parametrize(
    ("when", "outcome"),
    [
        ("2026-10-31T23:59:59", Outcome.NOT_STARTED),
        ("2027-10-31T23:59:59", Outcome.ADMITTED),
        ("2027-11-01T00:00:00", Outcome.ISOLATED),  # plan expiry
        ("2027-11-15T23:59:59", Outcome.ISOLATED),  # day 15 of isolation
        ("2027-11-16T00:00:00", Outcome.NOT_FOUND),  # 00:00 of day 16: released
    ],
)
async def test_lifecycle_by_date(tmp_path: Path, make_limiter, when, outcome):
    config = write_config(tmp_path, {"shop": env()})
    lim = await make_limiter(config, at(when))
    assert (await lim.decide("shop", "function", 1)).outcome is outcome


@pytest.mark.parametrize("call", ["function", "script", "flushed"])
async def test_a_pass_while_isolated_costs_nothing_and_only_auth_passes(
        tmp_path: Path, make_limiter, redis_client, call):
    """``while_isolated`` (a route's pass_while_isolated: js-sdk's realtime sign call): the
    store lets an auth request through while the environment is isolated or not started, at
    no cost and counted in QPS; nothing else passes, and a released environment is refused.
    The same through FCALL, EVALSHA and the EVAL after the store lost the code."""
    config = write_config(tmp_path, {"shop": env(), "tight": env(limits={"qps": 1})})
    clock = at("2027-11-05T12:00:00")  # isolated since 11-01
    lim = await make_limiter(config, clock)
    if call == "script":
        lim._calls.no_functions(RuntimeError("scripts for this test"))
    elif call == "flushed":
        await lim.decide("shop", "function", 1)  # connected, the code loaded: then lost
        await redis_client.function_flush()
        await redis_client.script_flush()
    passed = await lim.decide("shop", "auth", 1, while_isolated=True)
    assert passed.outcome is Outcome.ISOLATED and passed.flags & Flag.WHILE_ISOLATED
    assert passed.admitted and not passed.charged_calls("auth")
    assert passed.qps_limit == 500  # decided past the lifecycle: QPS applies
    assert lim.functions is (call != "script") and bool(lim.script_reloads) is (call == "flushed")
    for kind, pass_it in (("function", True), ("database", True), ("auth", False)):
        refused = await lim.decide("shop", kind, 1, while_isolated=pass_it)
        assert refused.outcome is Outcome.ISOLATED and not refused.admitted, kind
        assert not refused.flags & Flag.WHILE_ISOLATED
    assert await redis_client.hgetall(keys.usage("shop")) == {}  # nothing charged
    # Counted in QPS: at 1 QPS, a second one within the second is refused for it.
    assert (await lim.decide("tight", "auth", 1, while_isolated=True)).admitted
    again = await lim.decide("tight", "auth", 1, while_isolated=True)
    assert again.outcome is Outcome.QPS_EXCEEDED and not again.admitted
    clock.set(local("2026-10-31T12:00:00"))  # the plan starts tomorrow: the same
    early = await lim.decide("shop", "auth", 1, while_isolated=True)
    assert early.outcome is Outcome.NOT_STARTED and early.admitted
    assert early.flags & Flag.WHILE_ISOLATED
    clock.set(local("2027-11-16T00:00:00"))  # released
    gone = await lim.decide("shop", "auth", 1, while_isolated=True)
    assert gone.outcome is Outcome.NOT_FOUND and not gone.admitted
    assert await redis_client.hgetall(keys.usage("shop")) == {}
    clock.set(local("2027-10-20T12:00:00"))  # active: it costs its call as ever
    active = await lim.decide("shop", "auth", 1, while_isolated=True)
    assert active.outcome is Outcome.ADMITTED and not active.flags & Flag.WHILE_ISOLATED
    assert active.charged_calls("auth")
    usage = await redis_client.hgetall(keys.usage("shop"))
    assert sum(int(v) for v in usage.values()) == 1


async def test_resync_keeps_usage_and_pack_consumption(
    tmp_path: Path, make_limiter, store_url, redis_client
):
    packs = [{"id": "p1", "meter": "calls", "amount": 10, "purchased": "2026-11-20"}]
    config = write_config(tmp_path, {"shop": env(limits={"calls": 5}, packs=packs)})
    clock = at("2026-11-26T12:00:00")
    lim = await make_limiter(config, clock)
    await lim.decide("shop", "function", 8)
    # The file is applied again, with a second pack added: nothing consumed is reset.
    packs.append({"id": "p2", "meter": "calls", "amount": 10, "purchased": "2026-11-21"})
    config2 = write_config(tmp_path / "v2", {"shop": env(limits={"calls": 5}, packs=packs)})
    await make_limiter(config2, clock)
    d = await lim.decide("shop", "function", 1)
    assert d.remaining == (5 + 10 + 10) - 9
    assert await redis_client.hget(keys.pack_usage("shop"), "p1") == b"4"


async def test_env_removed_from_file_is_forgotten(tmp_path: Path, make_limiter):
    config = write_config(tmp_path, {"a": env(), "b": env()})
    clock = at("2026-11-26T12:00:00")
    lim = await make_limiter(config, clock)
    assert (await lim.decide("b", "function", 1)).outcome is Outcome.ADMITTED
    await make_limiter(write_config(tmp_path / "v2", {"a": env()}), clock)
    assert (await lim.decide("b", "function", 1)).outcome is Outcome.NOT_FOUND


async def test_env_mode_off_in_snapshot_counts_nothing(tmp_path: Path, make_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(mode="off", limits={"calls": 0})})
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    d = await lim.decide("shop", "function", 1)
    assert d.admitted and d.flags & Flag.MODE_OFF
    assert await redis_client.hgetall(keys.usage("shop")) == {}


async def test_qps_admitted_rate_under_five_times_offered_load(tmp_path: Path, make_limiter):
    """Open-loop offered load at 5x the limit for 3 s: admitted stays at the limit + burst."""
    limit, seconds, burst_ms = 40, 3.0, 100
    config = write_config(tmp_path, {"shop": env(limits={"qps": limit})}, qps_burst_ms=burst_ms)
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    loop = asyncio.get_running_loop()
    offered = int(limit * 5 * seconds)
    start = loop.time()
    tasks = []
    for i in range(offered):
        delay = start + i / (limit * 5) - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(lim.decide("shop", "function", 0)))
    results = await asyncio.gather(*tasks)
    elapsed = loop.time() - start
    admitted = sum(r.outcome is Outcome.ADMITTED for r in results)
    refused = [r for r in results if r.outcome is Outcome.QPS_EXCEEDED]
    burst = int(limit * burst_ms / 1000) + 1
    assert admitted + len(refused) == offered
    # GCRA bound: at most limit x elapsed + burst; and the limiter must not under-admit.
    assert admitted <= limit * elapsed + burst + 1
    assert admitted >= limit * seconds * 0.9
    assert all(r.retry_after_ms > 0 for r in refused)


async def test_store_version_check(redis_client):
    from quotagate.limiter.sync import check_store_version, parse_version

    described = await check_store_version(redis_client)
    assert described.startswith(("Valkey 8.", "Redis 7."))
    assert parse_version("6.0.20") < (6, 2) <= parse_version("6.2.0")


async def test_reset_where_dst_starts_at_midnight(tmp_path: Path, make_limiter):
    """America/Santiago skips 2026-09-06 00:00 (clocks go to 01:00): the cycle starts at the
    first instant of that local day."""
    import datetime as dt
    import zoneinfo

    tz = zoneinfo.ZoneInfo("America/Santiago")
    config = write_config(tmp_path, {"cl": env(anchor="2026-08-06", timezone="America/Santiago")})
    now = dt.datetime(2026, 9, 5, 22, 0, tzinfo=tz)
    lim = await make_limiter(config, ManualClock(now))
    d = await lim.decide("cl", "function", 1)
    first_instant = dt.datetime(2026, 9, 6, 0, 0, tzinfo=tz)  # resolves to 01:00 -03
    assert d.reset_ms == int((first_instant.timestamp() - now.timestamp()) * 1000) == 7_200_000


@pytest.mark.parametrize("limit", [600, 35_000])
async def test_qps_bound_holds_for_limits_whose_interval_rounds(tmp_path: Path, make_limiter,
                                                                 limit: int):
    """1000 / limit does not fit the TAT's 4 stored decimals for 600 or 35,000 QPS: an
    admission can leave the TAT a hair beyond burst + interval, which must not be taken for
    the store's clock stepping back (that clamp would admit every request of the same
    millisecond). Offered in bursts of many decisions at once, far above the limit."""
    burst_ms = 100
    config = write_config(tmp_path, {"shop": env(limits={"qps": limit})}, qps_burst_ms=burst_ms)
    lim = await make_limiter(config, at("2026-11-26T12:00:00"))
    loop = asyncio.get_running_loop()
    per_round = max(400, limit // 20)
    start = loop.time()
    results = []
    for _ in range(10):
        results += await asyncio.gather(*(lim.decide("shop", "function", 0)
                                          for _ in range(per_round)))
        await asyncio.sleep(0.05)
    elapsed = loop.time() - start
    admitted = sum(r.outcome is Outcome.ADMITTED for r in results)
    assert admitted <= limit * elapsed + limit * burst_ms / 1000 + 2, (admitted, elapsed)
