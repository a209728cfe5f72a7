"""limiter/settling.py on its own: what finishes in one loop iteration leaves as one settle
call per store node (settle_many for several environments); what the store cannot take is
kept for write-back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.limiter import keys
from quotagate.limiter.backlog import METER_PREFIX, SLOT_MS
from quotagate.limiter.embedded import EmbeddedValkey, free_port
from tests.helpers import at, env, local, until, write_config
from tests.parts import build, command_calls

NOON = "2026-11-26T12:00:00"
CYCLE = day_number(local(NOON).date().replace(day=1))


async def test_one_settle_call_per_store_node_per_tick(tmp_path: Path, valkey_url: str):
    """What finished in one loop iteration: one settle per environment, and those of several
    environments on one store node in one settle_many call."""
    config = write_config(tmp_path, {"shop": env(), "mall": env(), "cafe": env()})
    parts = await build(valkey_url, config, at(NOON))
    client = aredis.Redis.from_url(valkey_url)
    try:
        await parts.calls.load_scripts()
        await client.config_resetstat()
        for amount in (1000, 2000, 3000):
            parts.settler.queue("shop", None, "gbs", amount)
        parts.settler.queue("mall", None, "gbs", 500)
        parts.settler.queue("cafe", "=fn:f", "gbs", 7)
        await until(lambda: client.hexists(keys.usage("cafe"), f"{CYCLE}:gbs"))
        assert await command_calls(client, "fcall") == 1  # all three environments in one
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:gbs")) == 6000
        assert int(await client.hget(keys.usage("mall"), f"{CYCLE}:gbs")) == 500
        assert int(await client.hget(keys.usage("cafe"), f"{CYCLE}:gbs")) == 7
        parts.settler.queue("mall", None, "gbs", 1)  # one environment alone: settle.lua

        async def mall_501() -> bool:
            return await client.hget(keys.usage("mall"), f"{CYCLE}:gbs") == b"501"

        await until(mall_501)
        assert await command_calls(client, "fcall") == 2
        assert int(await client.hget(keys.usage("mall"), f"{CYCLE}:gbs")) == 501
        assert not parts.writeback.backlog.pending
    finally:
        await client.aclose()
        await parts.close()


async def test_each_call_of_a_batch_settles_as_it_would_alone(
        tmp_path: Path, valkey_url: str, caplog: pytest.LogCaptureFixture):
    """In one settle_many call: one environment's call refused whole (out of bounds), one
    without a snapshot (its usage kept for write-back), one that goes through — each as in a
    call of its own."""
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env(), "mall": env()}),
                        at(NOON))
    client = aredis.Redis.from_url(valkey_url)
    try:
        await parts.calls.load_scripts()
        await client.config_resetstat()
        parts.settler.queue("shop", None, "gbs", 700)
        parts.settler.queue("mall", None, "gbs", 2**53)
        parts.settler.queue("ghost", None, "gbs", 300)  # no snapshot in the store
        for _ in range(100):
            if parts.writeback.backlog.pending and "refused by the store" in caplog.text:
                break
            await asyncio.sleep(0.02)
        assert await command_calls(client, "fcall") == 1
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:gbs")) == 700
        assert await client.hgetall(keys.usage("mall")) == {}
        assert "settle of mall refused by the store" in caplog.text
        assert [(k[0], k[1], a) for k, a in parts.writeback.backlog.pending.items()] == [
            ("ghost", METER_PREFIX + "gbs", 300)]
    finally:
        await client.aclose()
        await parts.close()


async def test_a_batch_after_the_library_was_flushed_goes_call_by_call(
        tmp_path: Path, valkey_url: str):
    """The store lost the function library (FUNCTION FLUSH): the batch ran nothing, so each
    environment's call is sent on its own (which loads the library again): counted once."""
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env(), "mall": env()}),
                        at(NOON))
    client = aredis.Redis.from_url(valkey_url)
    try:
        await parts.calls.load_scripts()
        await client.function_flush()
        parts.settler.queue("shop", None, "gbs", 40)
        parts.settler.queue("mall", None, "gbs", 2)
        for _ in range(100):
            if await client.hget(keys.usage("mall"), f"{CYCLE}:gbs"):
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:gbs")) == 40
        assert int(await client.hget(keys.usage("mall"), f"{CYCLE}:gbs")) == 2
        assert parts.calls.script_reloads >= 1 and parts.calls.functions
        assert await parts.calls.scripts_loaded()
    finally:
        await client.aclose()
        await parts.close()


async def test_a_batch_that_times_out_and_runs_late_is_counted_once(
        tmp_path: Path, own_valkey: EmbeddedValkey):
    """A settle_many call stuck in a frozen store times out: each environment's usage is
    kept for write-back; the store then runs the call after all, and its late reply takes
    each environment's usage back out of the write-back: counted once, not twice."""
    clock = at(NOON)
    parts = await build(own_valkey.url, write_config(tmp_path, {"shop": env(), "mall": env()}),
                        clock)
    client = aredis.Redis.from_url(own_valkey.url)
    try:
        await parts.calls.load_scripts()
        own_valkey.pause()
        parts.settler.queue("shop", None, "gbs", 700)
        parts.settler.queue("mall", None, "gbs", 500)
        for _ in range(100):
            if len(parts.writeback.backlog.pending) == 2:
                break
            await asyncio.sleep(0.02)
        assert sorted((k[0], a) for k, a in parts.writeback.backlog.pending.items()) == [
            ("mall", 500), ("shop", 700)]
        own_valkey.resume()
        for _ in range(200):
            if not parts.writeback.backlog.pending:
                break
            await asyncio.sleep(0.05)
        assert not parts.writeback.backlog.pending
        await asyncio.sleep(0.3)
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:gbs")) == 700
        assert int(await client.hget(keys.usage("mall"), f"{CYCLE}:gbs")) == 500
    finally:
        own_valkey.resume()
        await client.aclose()
        await parts.close()


async def test_usage_the_store_cannot_take_is_kept_for_write_back(tmp_path: Path):
    clock = at(NOON)
    parts = await build(f"redis://127.0.0.1:{free_port()}", None, clock)  # nobody listens
    try:
        parts.settler.queue("shop", None, "gbs", 700)
        parts.settler.refund("shop", "calls", 3, clock.now_ms())  # lost: never written back
        for _ in range(50):
            if parts.writeback.backlog.pending:
                break
            await asyncio.sleep(0.02)
        passed = clock.now_ms()
        assert parts.writeback.backlog.pending == {
            ("shop", METER_PREFIX + "gbs", passed - passed % SLOT_MS): 700}
    finally:
        await parts.close()


MAX = 2**53 - 1


async def test_a_settle_out_of_bounds_is_refused_whole(tmp_path: Path, valkey_url: str,
                                                       caplog: pytest.LogCaptureFixture):
    """settle.lua checks every count and amount (0 to 2^53 − 1: exact in Lua's doubles) and
    every counter it adds to (never past 2^62) before its first write: a call out of bounds
    writes nothing at all — no plan part, no slot, no seen key — and is logged."""
    clock = at(NOON)
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env(overage=True)}), clock)
    client = aredis.Redis.from_url(valkey_url)
    seen = keys.seen("shop", "done:p:1")
    names = [*keys.settle_keys("shop"), seen]
    now = clock.now_ms()

    async def settle(*args: object) -> list[int]:
        return list(await parts.calls.settle("shop", names, [now, "p:1", "enforce", *args]))

    async def stored() -> list[object]:
        return [*[await client.hgetall(k("shop")) for k in (keys.usage, keys.pack_usage,
                                                            keys.payg, keys.slots)],
                await client.exists(seen)]

    try:
        await parts.calls.load_scripts()
        # A slot its holder holds, as decide.lua leaves it, and a call charged today.
        await client.hset(keys.slots("shop"), mapping={"p:1|fn:f": 1, "=fn:f": 1})
        await client.hset(keys.usage("shop"), f"{CYCLE}:calls", 5)
        before = await stored()
        slot = (1, "fn:f", 1)
        for args in (
                # GBs past 2^63 (4 GB × 2^53 − 1 ms): HINCRBY refused them after the plan's part
                (*slot, "gbs", 4096 * MAX),
                (*slot, "gbs", MAX + 1),
                (*slot, "gbs", 1000, "storage_traffic_bytes", 2**53),  # the second pair
                (*slot, f"-calls@{now}", 1, "gbs", 2**60),
                (*slot, "gbs", -5), (*slot, "gbs", "1.5"), (*slot, "gbs", "nan"),
                (*slot, "gbs", "inf"), (*slot, "gbs", "x"), (*slot, "capacity_bytes", 2**53),
                (*slot, "gbs", 1000, 0),  # a seen key kept 0 ms
                (1, "fn:f", -1), (1, "fn:f", "1e300"), (2, "fn:f", 1), ("x",)):
            assert await settle(*args) == [16, 0], args
            assert await stored() == before, args
        # A counter that would pass 2^62 (HINCRBY stops at 2^63 − 1): refused, whole — the
        # plan's, or today's beyond plan and packs.
        await client.hset(keys.usage("shop"), f"{CYCLE}:gbs", 2**63 - 2**53)
        before = await stored()
        assert await settle(*slot, "storage_traffic_bytes", 10, "gbs", 1) == [16, 0]
        assert await stored() == before
        await client.hdel(keys.usage("shop"), f"{CYCLE}:gbs")
        await client.hset(keys.payg("shop"), f"{CYCLE + 25}:gbs", 2**62)
        before = await stored()
        assert await settle(*slot, "gbs", MAX) == [16, 0]
        assert await stored() == before
        assert caplog.text.count("refused by the store") == 17, caplog.text

        # In bounds: written whole (plan, then pay-as-you-go), the slot given back and the id
        # seen for as long as asked, in the same call; the same call again writes nothing.
        await client.hset(keys.payg("shop"), f"{CYCLE + 25}:gbs", 2**61)
        assert (await settle(*slot, "gbs", MAX, f"-calls@{now}", 2, 3_600_000))[0] == 0
        usage, _, payg, slots, _ = await stored()
        gbs = int(usage[f"{CYCLE}:gbs".encode()]) + int(payg[f"{CYCLE + 25}:gbs".encode()])
        assert gbs == MAX + 2**61 and int(usage[f"{CYCLE}:calls".encode()]) == 3
        assert slots == {} and 0 < await client.pttl(seen) <= 3_600_000
        assert await settle(*slot, "gbs", 1000, f"-calls@{now}", 2, 3_600_000) == [8, 0]
        assert await stored() == [usage, {}, payg, {}, 1]
    finally:
        await client.aclose()
        await parts.close()


async def test_a_batch_the_store_refuses_is_logged_not_kept(tmp_path: Path, valkey_url: str,
                                                            caplog: pytest.LogCaptureFixture):
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env()}), at(NOON))
    client = aredis.Redis.from_url(valkey_url)
    try:
        await parts.calls.load_scripts()
        parts.settler.queue("shop", None, "gbs", 2**53)
        for _ in range(300):
            if "refused by the store" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert "settle of shop refused by the store" in caplog.text
        assert await client.hgetall(keys.usage("shop")) == {}
        assert await client.hgetall(keys.payg("shop")) == {}
        assert not parts.writeback.backlog.pending  # never written back: it would be again
    finally:
        await client.aclose()
        await parts.close()
