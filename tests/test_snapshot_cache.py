"""The function library keeps decoded entitlement snapshots between calls (common.lua): a
changed snapshot is used at once, and the cache stays bounded however many environments
pass through one store."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aredis

from quotagate.limiter import keys
from quotagate.limiter.codes import Outcome
from quotagate.limiter.scripts import DECIDE, LIBRARY
from tests.helpers import at, env, write_config

#: Decided at the limiters' noon (the snapshots are written for that day), never at the store's
#: own clock: the test must not depend on the day it runs.
NOON_MS = at("2026-11-26T12:00:00").now_ms()
ARGS = (str(NOON_MS), "function", "1", "enforce", "100", "", "inst", "15000", "")


async def decide(client: aredis.Redis, env_id: str) -> list:
    names = keys.decision_keys(env_id)
    return await client.fcall(DECIDE.function, len(names), *names, *ARGS)


async def test_a_changed_snapshot_is_used_at_once(tmp_path: Path, noon_limiter,
                                                  redis_client: aredis.Redis):
    lim = await noon_limiter(write_config(tmp_path, {"shop": env(limits={"calls": 1000})}))
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED  # cached
    ent = keys.decision_keys("shop")[0]
    raw = await redis_client.get(ent)
    # Same length, other content: a cache keyed on anything but the string would miss it.
    changed = raw.replace(b'"calls":1000,', b'"calls":0001,')
    assert changed != raw and len(changed) == len(raw)
    await redis_client.set(ent, changed)
    decision = await lim.decide("shop", "function", 1)
    assert decision.outcome is Outcome.QUOTA_EXCEEDED and decision.quota == 1
    await redis_client.set(ent, raw)  # and back
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
    await redis_client.delete(ent)
    assert (await lim.decide("shop", "function", 1)).outcome is Outcome.NOT_FOUND


async def test_the_cache_is_bounded(tmp_path: Path, noon_limiter, redis_client: aredis.Redis):
    lim = await noon_limiter(write_config(tmp_path, {"shop": env(limits={"calls": 10})}))
    await lim.decide("shop", "function", 1)
    await redis_client.function_load(LIBRARY, replace=True)  # a fresh, empty cache
    raw = await redis_client.get(keys.decision_keys("shop")[0])

    async def through(first: int, count: int) -> int:
        """``count`` more environments decided once each; the functions' memory after."""
        async with redis_client.pipeline(transaction=False) as pipe:
            for i in range(first, first + count):
                pipe.set(keys.decision_keys(f"e{i}")[0], raw)
            await pipe.execute()
        async with redis_client.pipeline(transaction=False) as pipe:
            for i in range(first, first + count):
                names = keys.decision_keys(f"e{i}")
                pipe.fcall(DECIDE.function, len(names), *names, *ARGS)
            replies = await pipe.execute()
        assert all(r[0] == 0 for r in replies)
        await redis_client.execute_command("FUNCTION", "STATS")
        memory = await redis_client.info("memory")
        return int(memory.get("used_memory_vm_functions", memory.get("used_memory_lua", 0)))

    at_4k = await through(0, 4_000)  # far beyond both generations (2 x SNAP_MAX)
    at_12k = await through(4_000, 8_000)
    # Lua's collector may lag a little; an unbounded cache would triple.
    assert at_12k < at_4k * 1.5, (at_4k, at_12k)
    # The first environment, long evicted, is decoded again and still right.
    assert (await decide(redis_client, "shop"))[0] == 0
    remaining = (await decide(redis_client, "shop"))[6]
    assert remaining == 10 - 1 - 2
