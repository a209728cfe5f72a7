"""Lifecycle with an injected clock: reminders, isolation, release, each once whatever the
number of schedulers; renewal from the original expiry; asynchronous invocations queued while
isolated, replayed on renewal, dropped after 7 x 24 h."""

from __future__ import annotations

import asyncio
import datetime as dt

import aiohttp
import pytest
import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.control.envs import API_ENV_INDEX, Environments
from quotagate.control.lifecycle import Scheduler
from quotagate.gateway.app import STATE
from quotagate.limiter import keys
from tests.helpers import at, local

TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def stream(store: aredis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _, f in await store.xrange(keys.EVENTS)]


async def types(store: aredis.Redis, env: str) -> list[str]:
    return [e["type"] for e in await stream(store) if e.get("env") == env]


@pytest.fixture
async def setup(make_gateway, admin_for, store):
    async def factory(clock):
        gw = await make_gateway({}, clock=clock, lifecycle_interval_ms=0)
        return gw, await admin_for(gw, TOKEN)

    return factory


def schedulers(gw, clock, n: int) -> list[Scheduler]:
    state = gw.app[STATE]
    return [Scheduler(Environments(state.redis, lambda: state.config, clock), clock,
                      state.upstream_base, state.pool.session,
                      forward=state.limiter.forward_events, admit=state.admit_replay,
                      forward_soon=state.limiter.forward_events_soon)
            for _ in range(n)]


async def test_transitions_once_each_across_schedulers(setup, store):
    clock = at("2026-11-24T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01",
        "packs": [{"id": "p1", "pack": "calls-10m", "purchased": "2026-11-05"}]})
    many = schedulers(gw, clock, 3)

    async def round_() -> None:
        await asyncio.gather(*(s.run_once() for s in many))

    await round_()
    # 7 days before expiry; the pack (11-05 .. 12-05) is not within 7 days of its end yet.
    assert await types(store, "shop") == ["plan-expiring"]
    clock.set(local("2026-12-01T00:00:00"))
    await round_()
    await round_()
    assert (await types(store, "shop")).count("environment-isolated") == 1
    assert (await types(store, "shop")).count("pack-expiring") == 1  # 12-05: within 7 days
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 403
    clock.set(local("2026-12-16T00:00:00"))  # 00:00 of day 16
    await round_()
    await round_()
    assert (await types(store, "shop")).count("environment-released") == 1
    assert not await store.exists(keys.definition("shop"), keys.entitlements("shop"),
                                  keys.usage("shop"))
    assert await store.zscore(API_ENV_INDEX, "shop") is None  # out of the listing's index too
    assert (await admin.get("/admin/v1/envs/shop", headers=AUTH)).status == 404
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 404


async def test_plan_expiring_reminder_and_pack_used_up(setup, store):
    clock = at("2026-11-23T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01",
        "limits": {"calls": 1},
        "packs": [{"id": "tiny", "meter": "calls", "amount": 2, "purchased": "2026-11-23"}]})
    [sched] = schedulers(gw, clock, 1)
    await sched.run_once()
    assert await types(store, "shop") == []  # 8 days before expiry
    clock.set(local("2026-11-24T00:00:00"))
    await sched.run_once()
    assert await types(store, "shop") == ["plan-expiring"]
    for _ in range(3):
        assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 200
    await sched.run_once()
    await sched.run_once()
    assert (await types(store, "shop")).count("pack-used-up") == 1


async def test_renewal_counts_from_the_original_expiry_and_replays(setup, store, upstream):
    clock = at("2026-12-05T12:00:00")  # isolated since 11-30
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-31", "expires": "2026-11-30"})
    h = {"X-CloudBase-Env": "shop", "X-Invocation-Type": "Event"}
    for i in range(3):
        resp = await gw.post(f"/functions/job/record?n={i}", headers=h, data=f"payload-{i}")
        assert resp.status == 202 and (await resp.json())["queue_length"] == i + 1
    sync = await gw.post("/functions/job/record", headers={"X-CloudBase-Env": "shop"})
    assert sync.status == 403  # a synchronous invocation is refused
    assert await store.llen(keys.queue("shop")) == 3
    renewed = await admin.post("/admin/v1/envs/shop/renew", json={"months": 1}, headers=AUTH)
    body = await renewed.json()
    # One month from the original expiry, on the anchor's day (31), not Nov 30 + 1 month.
    assert renewed.status == 200 and body["expires"] == "2026-12-31"
    for _ in range(50):
        if not await store.llen(keys.queue("shop")):
            break
        await asyncio.sleep(0.05)
    assert await store.llen(keys.queue("shop")) == 0
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{upstream.port}/_recorded") as r:
        got = await r.json()
    assert [(e["path"], e["body"], e["replayed"]) for e in got] == [
        (f"/functions/job/record?n={i}", f"payload-{i}", "1") for i in range(3)]
    # Replayed invocations are counted like requests (3 calls, in the December cycle).
    cycle = day_number(dt.date(2026, 11, 30))
    assert int(await store.hget(keys.usage("shop"), f"{cycle}:calls")) == 3
    assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 200
    assert "plan-renewed" in await types(store, "shop")


async def test_old_queued_invocations_are_dropped(setup, store):
    clock = at("2026-12-02T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01"})
    h = {"X-CloudBase-Env": "shop", "X-Invocation-Type": "event"}
    assert (await gw.post("/functions/job", headers=h, data="old")).status == 202
    clock.set(local("2026-12-05T12:00:00"))
    assert (await gw.post("/functions/job", headers=h, data="new")).status == 202
    [sched] = schedulers(gw, clock, 1)
    clock.set(local("2026-12-09T13:00:00"))  # the first is 7 d 1 h old
    await sched.run_once()
    assert await store.llen(keys.queue("shop")) == 1 and sched.dropped == 1


async def test_renewal_refused_in_arrears_or_released(setup, store):
    clock = at("2026-12-20T12:00:00")
    _gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/owing", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2027-01-01", "arrears": True})
    await admin.put("/admin/v1/envs/gone", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01"})
    for env_id, months, status in (("owing", 1, 409), ("gone", 1, 409), ("owing", 0, 422),
                                   ("nobody", 1, 404)):
        resp = await admin.post(f"/admin/v1/envs/{env_id}/renew", json={"months": months},
                                headers=AUTH)
        assert resp.status == status, env_id


@pytest.mark.parametrize(("anchor", "expires", "months", "expected"), [
    ("2026-01-31", "2026-11-30", 1, "2026-12-31"),  # a cycle boundary: back on day 31
    ("2026-01-31", "2027-01-31", 1, "2027-02-28"),
    ("2024-01-31", "2024-01-31", 1, "2024-02-29"),  # leap year
    ("2026-01-31", "2027-02-28", 1, "2027-03-31"),
    ("2026-01-15", "2026-12-15", 12, "2027-12-15"),
    ("2026-01-15", "2026-12-20", 1, "2027-01-20"),  # not a boundary (contract): + 1 month
])
def test_renewed_expiry(anchor, expires, months, expected) -> None:
    import datetime as dt

    from quotagate.control.envs import renewed_expiry

    d = dt.date.fromisoformat
    assert renewed_expiry(d(anchor), d(expires), months) == d(expected)


async def test_the_queue_is_bounded(setup, store, monkeypatch):
    from quotagate.control import lifecycle

    monkeypatch.setattr(lifecycle, "QUEUE_MAX", 3)
    clock = at("2026-12-02T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01"})
    h = {"X-CloudBase-Env": "shop", "X-Invocation-Type": "Event"}
    statuses = [(await gw.post("/functions/j", headers=h, data="x")).status for _ in range(5)]
    assert statuses == [202, 202, 202, 429, 429]
    big = await gw.post("/functions/j", headers=h, data=b"x" * (lifecycle.QUEUE_MAX_BODY + 1))
    assert big.status == 413
    assert await store.llen(keys.queue("shop")) == 3


async def test_an_event_whose_move_failed_is_moved_again_soon(setup, store):
    """A claimed transition whose move to the global stream fails once (a store call that
    timed out on a busy machine; here the store refuses the XADD) reaches the stream within a
    few seconds, tried again in the background: not at the sweep's next pass (30 s), and not
    never (the claim is taken: no later round writes the event again)."""
    clock = at("2026-12-01T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01"})
    await store.set(keys.EVENTS, "not a stream")  # every XADD to it fails (WRONGTYPE)
    [sched] = schedulers(gw, clock, 1)
    assert await sched.run_once() == 1  # claimed and written to the environment's stream
    assert await store.xlen(keys.env_events("shop")) == 1
    await store.delete(keys.EVENTS)  # the store takes the move again
    assert await sched.run_once() == 0  # claimed already: no second event
    deadline = asyncio.get_running_loop().time() + 15  # (the sweep's first pass: 30 s)
    while not await store.exists(keys.EVENTS) or not await types(store, "shop"):
        assert asyncio.get_running_loop().time() < deadline, "the event was not moved"
        await asyncio.sleep(0.1)
    assert await types(store, "shop") == ["environment-isolated"]
    assert await store.xlen(keys.env_events("shop")) == 0
