"""Leased concurrency slots and metered usage (decide/settle/renew.lua) through the Limiter,
against real Valkey and Redis. Leases run on the store's clock: the few tests of expiry wait
out a short lease (under a second); calendar logic uses the injected clock."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import pytest
import redis.asyncio as aredis

from quotagate.common.addresses import StoreAddress
from quotagate.common.calendar import day_number
from quotagate.limiter import keys
from quotagate.limiter.codes import Outcome
from quotagate.limiter.embedded import EmbeddedValkey, free_port
from quotagate.limiter.entitlements import MBMS_PER_GBS
from quotagate.limiter.errors import StoreError
from quotagate.limiter.limiter import Limiter
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.sync import sync_environments
from tests.helpers import (
    at,
    env,
    live_slots,
    local,
    per_instance,
    script_calls,
    synced_limiter,
    write_config,
)

NOON = "2026-11-26T12:00:00"


async def test_function_cap_exact_across_instances(tmp_path: Path, noon_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"function_concurrency": 7})})
    lims = [await noon_limiter(config) for _ in range(3)]
    results = await asyncio.gather(*(
        lims[i % 3].decide("shop", "function", 1, "fn:hello") for i in range(30)))
    counts = Counter(r.outcome for r in results)
    assert counts == {Outcome.ADMITTED: 7, Outcome.CONCURRENCY_EXCEEDED: 23}
    refused = next(r for r in results if not r.admitted)
    assert refused.meter == "function_concurrency" and refused.cap == 7 and refused.in_use == 7
    assert await live_slots(redis_client, "shop") == {"fn:hello": 7}
    # Another function has its own cap.
    assert (await lims[0].decide("shop", "function", 1, "fn:other")).admitted
    # A refused invocation cost nothing: 7 + 1 calls counted.
    assert int(await redis_client.hget(keys.usage("shop"), f"{day_number(local(NOON).date().replace(day=1))}:calls")) == 8  # noqa: E501
    # Give one back: exactly one new fits.
    holder = next(lim for lim in lims if lim.slots_held("shop", "fn:hello"))
    holder.release("shop", "fn:hello")
    await asyncio.sleep(0.05)
    again = await asyncio.gather(*(lims[2].decide("shop", "function", 1, "fn:hello")
                                   for _ in range(3)))
    assert sum(d.admitted for d in again) == 1
    assert sum(lim.slots_held("shop", "fn:hello") for lim in lims) == 7
    assert (await live_slots(redis_client, "shop"))["fn:hello"] == 7


async def test_realtime_cap_raised_by_database_promo(tmp_path: Path, noon_limiter):
    promos = [{"id": "d", "pack": "db-3k", "start": "2026-11-27"}]
    config = write_config(tmp_path, {"shop": env(plan="personal", promos=promos)})
    clock = at("2026-11-26T23:59:00")
    lim = await noon_limiter(config, clock)
    got = [await lim.decide("shop", "realtime", 1, "rt:") for _ in range(12)]
    assert [d.outcome for d in got].count(Outcome.ADMITTED) == 10  # personal: 10
    assert got[-1].meter == "realtime" and got[-1].cap == 10
    clock.set(local("2026-11-27T00:00:00"))  # the promo's day: 10,000
    more = await asyncio.gather(*(lim.decide("shop", "realtime", 1, "rt:") for _ in range(50)))
    assert all(d.admitted for d in more) and more[-1].cap == 10_000
    assert lim.slots_held("shop", "rt:") == 60
    clock.set(local("2026-11-28T00:00:00"))  # promo over: the 60 open ones stay
    assert (await lim.decide("shop", "realtime", 1, "rt:")).outcome is \
        Outcome.CONCURRENCY_EXCEEDED
    assert lim.slots_held("shop", "rt:") == 60
    for _ in range(50):
        lim.release("shop", "rt:")
    assert (await lim.decide("shop", "realtime", 1, "rt:")).outcome is \
        Outcome.CONCURRENCY_EXCEEDED  # 10 open: still at the cap
    lim.release("shop", "rt:")
    assert (await lim.decide("shop", "realtime", 1, "rt:")).admitted


async def test_lowered_cap_keeps_open_slots(tmp_path: Path, noon_limiter, store_url,
                                            redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"realtime": 5})})
    lim = await noon_limiter(config)
    assert all([(await lim.decide("shop", "realtime", 1, "rt:")).admitted for _ in range(5)])
    lowered = write_config(tmp_path / "b", {"shop": env(limits={"realtime": 2})})
    other = await noon_limiter(lowered)  # re-syncs the snapshot with the lower cap
    assert (await lim.renew())["shop"] == 0
    assert await live_slots(redis_client, "shop") == {"rt:": 5}  # nothing closed
    refused = await other.decide("shop", "realtime", 1, "rt:")
    assert refused.outcome is Outcome.CONCURRENCY_EXCEEDED and refused.cap == 2
    for _ in range(3):
        lim.release("shop", "rt:")
    await asyncio.sleep(0.05)
    assert (await other.decide("shop", "realtime", 1, "rt:")).outcome is \
        Outcome.CONCURRENCY_EXCEEDED  # 2 open, cap 2
    lim.release("shop", "rt:")
    await asyncio.sleep(0.05)  # given back on lim's next loop tick; other is another instance
    assert (await other.decide("shop", "realtime", 1, "rt:")).admitted


async def test_dead_instance_slots_come_back_within_the_lease(tmp_path: Path, noon_limiter,
                                                              redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"function_concurrency": 4})})
    dying = await noon_limiter(config, lease_ms=600)
    for _ in range(4):
        assert (await dying.decide("shop", "function", 1, "fn:f")).admitted
    await dying.close(give_back=False)  # as if killed: no renewal, nothing given back
    survivor = await noon_limiter(config, lease_ms=600)
    assert (await survivor.decide("shop", "function", 1, "fn:f")).outcome is \
        Outcome.CONCURRENCY_EXCEEDED
    started = time.monotonic()
    while not (await survivor.decide("shop", "function", 1, "fn:f")).admitted:
        assert time.monotonic() - started < 2.0, "slots of the dead instance did not come back"
        await asyncio.sleep(0.05)
    assert time.monotonic() - started >= 0.3  # not before the lease ended
    assert await per_instance(redis_client, "shop") == {f"{survivor.instance}|fn:f": 1}
    assert await live_slots(redis_client, "shop") == {"fn:f": 1}


async def test_renewal_keeps_slots_past_the_ttl(tmp_path: Path, noon_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"realtime": 3})})
    holder = await noon_limiter(config, lease_ms=500)
    for _ in range(3):
        assert (await holder.decide("shop", "realtime", 1, "rt:")).admitted
    other = await noon_limiter(config, lease_ms=500)
    for _ in range(8):  # 1.2 s, more than two leases
        await asyncio.sleep(0.15)
        await holder.renew()
    assert (await other.decide("shop", "realtime", 1, "rt:")).outcome is \
        Outcome.CONCURRENCY_EXCEEDED
    # Giving everything back (clean shutdown) frees them at once.
    await holder.renew(lease_ms=0)
    assert (await other.decide("shop", "realtime", 1, "rt:")).admitted
    assert await live_slots(redis_client, "shop") == {"rt:": 1}


async def test_renewal_restores_what_the_store_lost(tmp_path: Path, noon_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"realtime": 3})})
    lim = await noon_limiter(config)
    for _ in range(3):
        assert (await lim.decide("shop", "realtime", 1, "rt:")).admitted
    await redis_client.delete(keys.slots("shop"), keys.lease("shop"))  # e.g. a failover
    assert (await lim.renew())["shop"] == 0
    assert await live_slots(redis_client, "shop") == {"rt:": 3}
    assert (await lim.decide("shop", "realtime", 1, "rt:")).outcome is \
        Outcome.CONCURRENCY_EXCEEDED


async def test_renewal_is_one_call_per_batch_not_per_slot(tmp_path: Path, noon_limiter,
                                                           redis_client):
    ids = [f"e{i}" for i in range(300)]
    config = write_config(tmp_path, {i: env() for i in ids})
    # (A renewal of 256 environments in one call: more than the default 200 ms on a busy
    # machine, and what is counted here is calls, not time.)
    lim = await noon_limiter(config, timeout_ms=5_000)
    await asyncio.gather(*(lim.decide(i, "realtime", 1, "rt:") for i in ids for _ in range(5)))
    assert sum(lim.slots_held(i, "rt:") for i in ids) == 1500
    before = await redis_client.info("commandstats")
    statuses = await lim.renew()
    after = await redis_client.info("commandstats")

    assert script_calls(after) - script_calls(before) == 2  # 300 environments, 256 per call
    assert lim.renew_commands == 2
    assert set(statuses.values()) == {0} and len(statuses) == 300


async def test_refusal_after_a_renewal_counted_it_is_given_back(tmp_path: Path, noon_limiter,
                                                                 redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"realtime": 2})})
    lim = await noon_limiter(config)
    for _ in range(2):
        assert (await lim.decide("shop", "realtime", 1, "rt:")).admitted
    # An acquisition in flight when a renewal is sent: the renewal counts it (3), the store
    # then refuses it; the limiter gives the phantom back.
    pending = asyncio.ensure_future(lim.decide("shop", "realtime", 1, "rt:"))
    await asyncio.sleep(0)  # submitted
    assert lim.slots_held("shop", "rt:") == 3
    await lim.renew()
    assert (await pending).outcome is Outcome.CONCURRENCY_EXCEEDED
    await asyncio.sleep(0.05)
    assert lim.slots_held("shop", "rt:") == 2
    assert await live_slots(redis_client, "shop") == {"rt:": 2}


async def test_release_after_being_reaped_never_goes_negative(tmp_path: Path, noon_limiter,
                                                              redis_client):
    config = write_config(tmp_path, {"shop": env()})
    lim = await noon_limiter(config, lease_ms=300)
    assert (await lim.decide("shop", "function", 1, "fn:f")).admitted
    await asyncio.sleep(0.4)
    other = await noon_limiter(config)
    assert (await other.decide("shop", "function", 1, "fn:f")).in_use == 1  # reaped lim's
    lim.release("shop", "fn:f")
    await asyncio.sleep(0.05)
    assert await live_slots(redis_client, "shop") == {"fn:f": 1}


async def test_metered_gbs_hard_stop_refuses_next_request(tmp_path: Path, noon_limiter,
                                                          redis_client):
    config = write_config(tmp_path, {"shop": env(limits={"gbs": 10})})  # 10 GBs
    lim = await noon_limiter(config)
    assert (await lim.decide("shop", "function", 1, "fn:f", needs="gbs")).admitted
    lim.release("shop", "fn:f")
    lim.meter("shop", "gbs", 6 * MBMS_PER_GBS)
    await asyncio.sleep(0.05)
    assert (await lim.decide("shop", "function", 1, "fn:f", needs="gbs")).admitted
    lim.release("shop", "fn:f")
    lim.meter("shop", "gbs", 5 * MBMS_PER_GBS)  # 11 GBs: beyond the quota, recorded unbilled
    await asyncio.sleep(0.05)
    refused = await lim.decide("shop", "function", 1, "fn:f", needs="gbs")
    assert refused.outcome is Outcome.QUOTA_EXCEEDED and refused.meter == "gbs"
    assert refused.retry_after_ms == refused.reset_ms > 0
    today = day_number(local(NOON).date())
    cycle = day_number(local(NOON).date().replace(day=1))
    assert int(await redis_client.hget(keys.usage("shop"), f"{cycle}:gbs")) == 10 * MBMS_PER_GBS
    assert int(await redis_client.hget(keys.payg("shop"), f"{today}:gbs:unbilled")) == \
        MBMS_PER_GBS
    # Routes that do not need gbs still pass.
    assert (await lim.decide("shop", "database", 1)).admitted
    assert await live_slots(redis_client, "shop") == {}


async def test_metered_bytes_overage_is_pay_as_you_go(tmp_path: Path, noon_limiter,
                                                      redis_client):
    config = write_config(tmp_path, {"shop": env(overage=True,
                                                 limits={"storage_traffic_gb": 1})})
    lim = await noon_limiter(config)
    gib = 1024**3
    for _ in range(3):
        lim.meter("shop", "storage_traffic_bytes", gib // 2)
        await asyncio.sleep(0)  # separate ticks: separate settle calls
    await asyncio.sleep(0.05)
    d = await lim.decide("shop", "storage", 1, needs="storage_traffic_bytes")
    assert d.admitted  # overage: never stops
    today = day_number(local(NOON).date())
    assert int(await redis_client.hget(keys.payg("shop"), f"{today}:storage_traffic_bytes")) \
        == gib // 2


async def test_settle_coalesces_one_call_per_environment_per_tick(tmp_path: Path, noon_limiter,
                                                                  redis_client):
    config = write_config(tmp_path, {"shop": env()})
    lim = await noon_limiter(config)
    await asyncio.gather(*(lim.decide("shop", "function", 1, "fn:f") for _ in range(50)))
    before = await redis_client.info("commandstats")
    for _ in range(50):
        lim.release("shop", "fn:f")
        lim.meter("shop", "gbs", 100)
    await asyncio.sleep(0.05)
    after = await redis_client.info("commandstats")
    assert script_calls(after) - script_calls(before) == 1
    assert await live_slots(redis_client, "shop") == {}
    cycle = day_number(local(NOON).date().replace(day=1))
    assert int(await redis_client.hget(keys.usage("shop"), f"{cycle}:gbs")) == 5000


async def test_renewal_reports_isolated_environments(tmp_path: Path, noon_limiter):
    config = write_config(tmp_path, {"shop": env(expires="2026-12-01"), "other": env()})
    clock = at(NOON)
    lim = await noon_limiter(config, clock)
    ended: list[tuple[str, str]] = []
    lim.on_ended = lambda e, status: ended.append((e, status))
    for e in ("shop", "other"):
        assert (await lim.decide(e, "realtime", 1, "rt:")).admitted
    assert await lim.renew() == {"shop": 0, "other": 0} and ended == []
    clock.set(local("2026-12-01T00:00:00"))
    assert await lim.renew() == {"shop": 3, "other": 0}
    assert ended == [("shop", "isolated")]


async def test_slots_held_through_a_store_outage_are_written_back(tmp_path: Path):
    """Fail-open: a watch admitted while the store is down is held here; the first renewal
    that reaches the store writes it, so the cap counts it."""
    port = free_port()
    config = write_config(tmp_path / "cfg", {"shop": env(limits={"realtime": 2})})
    store = PipelinedStore(StoreAddress.from_url(f"redis://127.0.0.1:{port}/0"),
                           timeout_ms=100, connect_timeout_ms=100, retry_interval_ms=50)
    lim = Limiter(store, clock=at(NOON), on_failure="open")
    lim.known.add("shop")  # declared (the gateway adds its config's environments)
    server = None
    try:
        d = await lim.decide("shop", "realtime", 1, "rt:")
        assert d.store_bypassed and lim.slots_held("shop", "rt:") == 1
        with pytest.raises(StoreError):
            await lim.renew()
        assert lim.slots_held("shop", "rt:") == 1
        server = EmbeddedValkey(tmp_path / "v", port=port, appendonly=False).start()
        client = aredis.Redis.from_url(server.url)
        await sync_environments(client, config)
        await asyncio.sleep(0.1)  # past the retry interval
        assert (await lim.renew())["shop"] == 0
        assert await live_slots(client, "shop") == {"rt:": 1}
        other = await synced_limiter(server.url, config, at(NOON))
        assert (await other.decide("shop", "realtime", 1, "rt:")).admitted
        assert (await other.decide("shop", "realtime", 1, "rt:")).outcome is \
            Outcome.CONCURRENCY_EXCEEDED
        await other.close()
        await client.aclose()
    finally:
        await lim.close(give_back=False)
        if server is not None:
            server.stop()


async def test_clean_shutdown_gives_every_slot_back(tmp_path: Path, noon_limiter, store_url,
                                                    redis_client):
    config = write_config(tmp_path, {"shop": env(), "other": env()})
    lim = await synced_limiter(store_url, config, at(NOON))
    for e in ("shop", "other"):
        for _ in range(3):
            assert (await lim.decide(e, "realtime", 1, "rt:")).admitted
        assert (await lim.decide(e, "function", 1, "fn:f")).admitted
    await lim.close()
    for e in ("shop", "other"):
        assert await live_slots(redis_client, e) == {}
        assert await redis_client.zcard(keys.lease(e)) == 0


@pytest.mark.parametrize("at_cap", [False, True])
async def test_cancelled_decision_leaks_no_slot(tmp_path: Path, noon_limiter, redis_client,
                                                at_cap):
    """The caller goes away (client disconnect, socket closed) while the store decides: the
    outcome is handled when it arrives, admitted or refused, with a renewal in between."""
    config = write_config(tmp_path, {"shop": env(limits={"realtime": 2})})
    lim = await noon_limiter(config)
    if at_cap:
        for _ in range(2):
            assert (await lim.decide("shop", "realtime", 1, "rt:")).admitted
    task = asyncio.ensure_future(lim.decide("shop", "realtime", 1, "rt:"))
    await asyncio.sleep(0)  # submitted
    await lim.renew()  # counts it while in flight
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)
    expected = {"rt:": 2} if at_cap else {}
    assert await live_slots(redis_client, "shop") == expected
    assert lim.slots_held("shop", "rt:") == (2 if at_cap else 0)
    await lim.renew()
    assert await live_slots(redis_client, "shop") == expected


async def test_old_snapshot_layout_is_treated_as_missing(tmp_path: Path, noon_limiter,
                                                         redis_client):
    config = write_config(tmp_path, {"shop": env()})
    lim = await noon_limiter(config)
    missing: list[str] = []
    ended: list[tuple[str, str]] = []
    lim.on_missing = missing.append
    lim.on_ended = lambda e, s: ended.append((e, s))
    assert (await lim.decide("shop", "realtime", 1, "rt:")).admitted
    old = {"v": 1, "plan": "standard", "quota": {"calls": 5}}
    await redis_client.set(keys.entitlements("shop"), json.dumps(old))
    assert (await lim.decide("shop", "function", 1, "fn:f")).outcome is Outcome.NOT_FOUND
    assert missing == ["shop"]
    assert (await lim.renew())["shop"] == 7 and ended == [("shop", "missing")]
    await redis_client.delete(keys.entitlements("shop"))
    assert (await lim.renew())["shop"] == 7


async def test_giving_back_reaps_fields_the_instance_forgot(tmp_path: Path, store_url,
                                                            redis_client):
    config = write_config(tmp_path, {"shop": env()})
    lim = await synced_limiter(store_url, config, at(NOON))
    assert (await lim.decide("shop", "realtime", 1, "rt:")).admitted
    # A slot the store has but this instance no longer knows of (a late reply ran after a
    # renewal, say).
    await redis_client.hset(keys.slots("shop"), mapping={f"{lim.instance}|fn:ghost": 2,
                                                          "=fn:ghost": 2})
    await lim.close()
    assert await redis_client.hgetall(keys.slots("shop")) == {}
    assert await redis_client.zcard(keys.lease("shop")) == 0


async def test_slot_keys_always_expire(tmp_path: Path, noon_limiter, redis_client):
    config = write_config(tmp_path, {"shop": env()})
    lim = await noon_limiter(config, lease_ms=5000)
    assert (await lim.decide("shop", "function", 1, "fn:f")).admitted
    lim.release("shop", "fn:f")
    await asyncio.sleep(0.05)
    assert not await redis_client.exists(keys.slots("shop"))  # emptied: gone
    assert (await lim.decide("shop", "function", 1, "fn:f")).admitted  # same instance again
    for key in (keys.slots("shop"), keys.lease("shop")):
        assert 5000 < await redis_client.pttl(key) <= 10_000


async def test_a_renewal_carries_the_releases_queued_before_it(tmp_path: Path, valkey_url: str):
    """leases.py on its own: a renewal writes absolute counts, which already hold what was
    queued to give back — so that is not given back a second time by the settle after it."""
    from tests.parts import INSTANCE, build

    clock = at(NOON)
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env()}), clock)
    client = aredis.Redis.from_url(valkey_url)
    try:
        parts.leases.hold("shop", "rt:", 3)
        assert await parts.leases.renew() == {"shop": 0}
        assert await per_instance(client, "shop") == {f"{INSTANCE}|rt:": 3}
        parts.leases.release("shop", "rt:")  # queued for the next settle...
        await parts.leases.renew()  # ...which this renewal's absolute count (2) includes
        await asyncio.sleep(0.1)  # the tick the settle would have gone in
        assert await per_instance(client, "shop") == {f"{INSTANCE}|rt:": 2}
        assert parts.leases.slots_held("shop", "rt:") == 2
    finally:
        await client.aclose()
        await parts.close()
