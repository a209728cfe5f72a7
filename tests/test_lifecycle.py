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
from quotagate.limiter import due, keys
from tests.helpers import at, env, local

TOKEN = "t"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


async def stream(store: aredis.Redis) -> list[dict[str, str]]:
    return [{k.decode(): v.decode() for k, v in f.items()}
            for _, f in await store.xrange(keys.EVENTS)]


async def types(store: aredis.Redis, env_id: str) -> list[str]:
    return [e["type"] for e in await stream(store) if e.get("env") == env_id]


def local_ms(text: str) -> int:
    return int(local(text).timestamp() * 1000)


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


async def shop_with_scheduler(setup, when: str, expires: str, **extra):
    """A gateway at ``when`` with the API-owned environment "shop" (plan personal), and one
    scheduler: (clock, scheduler)."""
    clock = at(when)
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": expires, **extra})
    [sched] = schedulers(gw, clock, 1)
    return clock, sched


async def test_transitions_once_each_across_schedulers(setup, store):
    clock = at("2026-11-24T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01",
        "packs": [{"id": "p1", "pack": "calls-10m", "purchased": "2026-11-05"}]})
    await admin.put("/admin/v1/envs/kept", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2027-12-01"})
    tenant: dict[str, str] = {}  # an environment token of each
    for env_id in ("shop", "kept"):
        r = await admin.post("/admin/v1/tokens", headers=AUTH, json={
            "name": f"tenant of {env_id}", "role": "env", "env": env_id})
        assert r.status == 201, await r.text()
        tenant[env_id] = (await r.json())["token"]
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
    # Released: its tenant's token is revoked (a "shop" made again is another tenant's); the
    # other environment's token still works.
    def bearer(env_id: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tenant[env_id]}"}

    assert (await admin.get("/admin/v1/me", headers=bearer("shop"))).status == 401
    assert (await admin.get("/admin/v1/me", headers=bearer("kept"))).status == 200
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-12-16", "expires": "2027-12-16"})
    assert (await admin.get("/admin/v1/envs/shop/usage", headers=bearer("shop"))).status == 401
    listed = await (await admin.get("/admin/v1/tokens", headers=AUTH)).json()
    assert sorted(t["env"] for t in listed["tokens"] if t["role"] == "env") == ["kept"]


async def test_a_declared_token_of_a_released_environment_is_refused(make_gateway, admin_for,
                                                                    tmp_path):
    """tokens_file's environment token is refused once its environment is released (the file
    is the operator's: it is not changed, the token's digest is remembered in the store),
    while another environment's declared token still reads, by token or by id and digest."""
    import hashlib

    import yaml

    shop, mall = "qg_0badcafe_" + "A" * 43, "qg_0000beef_" + "B" * 43
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump({"tokens": [
        {"name": "shop's owner", "role": "env", "env": "shop", "token": shop},
        {"name": "mall's owner", "role": "env", "env": "mall", "id": "0000beef",
         "sha256": hashlib.sha256(mall.encode()).hexdigest()}]}))
    clock = at("2026-12-01T00:00:00")  # shop expired 11-15: released from 11-30
    gw = await make_gateway({}, clock=clock, lifecycle_interval_ms=0,
                            tokens_file=str(tmp_path / "tokens.yaml"))
    admin = await admin_for(gw, TOKEN)
    for env_id, expires in (("shop", "2026-11-15"), ("mall", "2027-11-15")):
        assert (await admin.put(f"/admin/v1/envs/{env_id}", headers=AUTH, json={
            "plan": "personal", "anchor": "2026-01-01", "expires": expires})).status == 200

    async def reads(token: str, env_id: str) -> int:
        r = await admin.get(f"/admin/v1/envs/{env_id}/usage",
                            headers={"Authorization": f"Bearer {token}"})
        return r.status

    assert await reads(shop, "shop") == 200 and await reads(mall, "mall") == 200
    # A token of the API's for shop, whose id the file then declares too (a token moved
    # into the Secret): the API's record is still the API's to revoke, and the release's.
    made = await admin.post("/admin/v1/tokens", headers=AUTH, json={
        "name": "shop's app", "role": "env", "env": "shop"})
    by_api = await made.json()
    declared = yaml.safe_load((tmp_path / "tokens.yaml").read_text())
    declared["tokens"].append({"name": "moved", "role": "viewer", "id": by_api["id"],
                               "sha256": hashlib.sha256(b"another").hexdigest()})
    (tmp_path / "tokens.yaml").write_text(yaml.safe_dump(declared))
    assert await gw.app[STATE].runtime.reload("test")
    assert await reads(by_api["token"], "shop") == 200
    [sched] = schedulers(gw, clock, 1)
    await sched.run_once()
    await sched.run_once()
    assert await reads(shop, "shop") == 401 and await reads(by_api["token"], "shop") == 401
    assert await reads(mall, "mall") == 200
    listed = await (await admin.get("/admin/v1/tokens", headers=AUTH)).json()
    assert [(t["id"], t["source"]) for t in listed["tokens"]] == [
        ("0000beef", "file"), (by_api["id"], "file")]
    gone = await admin.delete(f"/admin/v1/tokens/{by_api['id']}", headers=AUTH)
    assert gone.status == 409  # only the file's is left: changed there


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


async def commands(store: aredis.Redis) -> dict[str, int]:
    stats = await store.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_a_round_reads_what_is_due_not_every_environment(make_gateway, store):
    """The due index: a first round works through every environment (all written just now),
    then scores each with the next day something happens to it; a round before that day
    reads no environment at all - a few commands per shard whatever their number - and
    the day's round does that day's work."""
    clock = at("2026-11-20T12:00:00")
    many = {f"e{i:04d}": env(expires="2026-12-01") for i in range(1500)}
    gw = await make_gateway(many, clock=clock, lifecycle_interval_ms=0)
    [sched] = schedulers(gw, clock, 1)
    assert await sched.run_once() == 0  # 11 days before expiry: nothing yet
    reminder = local_ms("2026-11-24T00:00:00")  # expiry - 7 days, local midnight
    scores = {score for shard in range(keys.DUE_SHARDS)
              for _, score in await store.zrange(keys.due(shard), 0, -1, withscores=True)}
    assert scores == {reminder}
    before = await commands(store)
    clock.set(local("2026-11-23T23:59:00"))
    assert await sched.run_once() == 0
    after = await commands(store)
    spent = {c: after[c] - before.get(c, 0) for c in after if after[c] != before.get(c, 0)}
    # One look per shard (the test's own INFO calls, and the clock's follower should it
    # sample the store's clock meanwhile, aside): nothing per environment.
    assert spent.pop("zrangebyscore") == keys.DUE_SHARDS, spent
    assert set(spent) <= {"info", "time"}, spent
    clock.set(local("2026-11-24T00:00:00"))
    assert await sched.run_once() == 1500  # each its plan-expiring, once
    assert await sched.run_once() == 0


async def test_a_change_is_due_at_once_and_a_pack_is_used_up_by_its_request(setup, store):
    clock = at("2026-11-23T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2027-06-01",
        "limits": {"calls": 1}})
    [sched] = schedulers(gw, clock, 1)
    await sched.run_once()
    shard = keys.due(due.shard_of("shop"))
    assert await store.zscore(shard, "shop") == local_ms("2027-05-25T00:00:00")
    # A pack bought today that ends in 30 days: due at once, then at its reminder.
    await admin.post("/admin/v1/envs/shop/packs", headers=AUTH,
                     json={"meter": "calls", "amount": 2, "id": "tiny"})
    assert await store.zscore(shard, "shop") <= clock.now_ms()
    await sched.run_once()
    assert await store.zscore(shard, "shop") == local_ms("2026-12-16T00:00:00")
    # The request that spends the pack writes pack-used-up: no round is needed.
    for _ in range(3):
        assert (await gw.get("/functions/f", headers={"X-CloudBase-Env": "shop"})).status == 200
    for _ in range(100):
        if "pack-used-up" in await types(store, "shop"):
            break
        await asyncio.sleep(0.05)
    got = [t for t in await types(store, "shop") if t != "quota-alert"]  # (the plan's 1 call)
    assert got == ["pack-purchased", "pack-used-up"]
    await sched.run_once()
    assert (await types(store, "shop")).count("pack-used-up") == 1


async def test_events_an_instance_left_in_a_stream_are_moved_by_the_next_round(setup, store):
    """An instance marks the environment due before it moves the events a script wrote; if
    it dies before moving them, the next round does (no keyspace scan finds them)."""
    clock, sched = await shop_with_scheduler(setup, "2026-11-23T12:00:00", "2027-06-01")
    await sched.run_once()
    await store.xadd(keys.env_events("shop"), {"type": "quota-alert", "level": "80"})
    await due.mark(store, ["shop"], clock.now_ms())  # (what the dead instance had done)
    await sched.run_once()
    for _ in range(100):
        if await types(store, "shop"):
            break
        await asyncio.sleep(0.05)
    got = [e for e in await stream(store) if e.get("env") == "shop"]
    assert [e["type"] for e in got] == ["quota-alert"]
    assert got[0]["event_id"].startswith("shop/")
    assert await store.xlen(keys.env_events("shop")) == 0


async def test_environments_stored_before_the_index_are_put_in_it_once(setup, store):
    clock = at("2026-11-24T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2026-12-01"})
    # As a store written by a version without the index holds it:
    await store.delete(*(keys.due(s) for s in range(keys.DUE_SHARDS)), keys.DUE_COMPLETE)
    [sched] = schedulers(gw, clock, 1)
    assert await sched.run_once() == 1
    assert await types(store, "shop") == ["plan-expiring"]
    assert await store.exists(keys.DUE_COMPLETE)
    await store.delete(keys.due(due.shard_of("shop")))  # (another scheduler: no walk again)
    [other] = schedulers(gw, clock, 1)
    before = await commands(store)
    await other.run_once()
    assert (await commands(store)).get("sscan", 0) == before.get("sscan", 0)


async def test_every_mark_changes_the_score_so_a_round_that_read_it_looks_again(store):
    """Two marks in one millisecond (a change's before and after its write) leave different
    scores: the compare-and-set of a round that read the first fails."""
    shard = keys.due(due.shard_of("shop"))
    await due.mark(store, ["shop"], 1_000)
    first = await store.zscore(shard, "shop")
    await due.mark(store, ["shop"], 1_000)
    second = await store.zscore(shard, "shop")
    assert first == 999.5 and second != first and 998.5 < second < first
    assert await store.eval(due.SETTLE, 1, shard, "shop", repr(first), 5_000) == 0
    assert await store.zscore(shard, "shop") == second
    assert await store.eval(due.SETTLE, 1, shard, "shop", repr(second), 5_000) == 1
    assert await store.zscore(shard, "shop") == 5_000
    await due.mark(store, ["shop"], 2_000, only_new=True)  # in the index: kept as it is
    assert await store.zscore(shard, "shop") == 5_000


async def test_a_pack_spent_by_a_smaller_size_is_told_once_and_not_reminded(setup, store):
    """A pack whose size is lowered below what was used is spent without a take: the round
    writes pack-used-up (with the scripts' own mark: once), and no pack-expiring for it."""
    clock = at("2026-11-23T12:00:00")
    gw, admin = await setup(clock)
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2027-06-01",
        "packs": [{"id": "p", "meter": "calls", "amount": 10, "purchased": "2026-11-20"}]})
    await store.hset(keys.pack_usage("shop"), "p", 5)  # (5 of 10 used)
    [sched] = schedulers(gw, clock, 1)
    await sched.run_once()
    await admin.put("/admin/v1/envs/shop", headers=AUTH, json={
        "plan": "personal", "anchor": "2026-01-01", "expires": "2027-06-01",
        "packs": [{"id": "p", "meter": "calls", "amount": 4, "purchased": "2026-11-20"}]})
    assert await sched.run_once() == 1
    clock.set(local("2026-12-15T00:00:00"))  # within 7 days of the pack's end (12-20)
    await sched.run_once()
    await sched.run_once()
    for _ in range(100):
        if "pack-used-up" in await types(store, "shop"):
            break
        await asyncio.sleep(0.05)
    assert await types(store, "shop") == ["pack-used-up"]


async def test_an_environment_missing_from_the_index_is_put_back(setup, store, monkeypatch):
    """A shard the store lost (or ids an earlier version wrote without the index): the
    next check (once a day per store) puts every environment back."""
    from quotagate.control import lifecycle

    _, sched = await shop_with_scheduler(setup, "2026-11-24T12:00:00", "2026-12-01")
    await sched.run_once()
    assert await types(store, "shop") == ["plan-expiring"]
    await store.delete(*(keys.due(s) for s in range(keys.DUE_SHARDS)))
    await sched.run_once()  # (checked within the hour: nothing read)
    assert not await store.zscore(keys.due(due.shard_of("shop")), "shop")
    monkeypatch.setattr(lifecycle, "INDEX_CHECK_S", 0)
    await store.delete(keys.DUE_COMPLETE)  # (a day later)
    await sched.run_once()
    assert await store.zscore(keys.due(due.shard_of("shop")), "shop") == local_ms(
        "2026-12-01T00:00:00")
