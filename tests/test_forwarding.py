"""limiter/forwarding.py on its own: events an environment's scripts wrote reach the global
stream once, however many instances move them at the same time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aredis

from quotagate.limiter import keys
from tests.helpers import at
from tests.parts import build


async def test_events_are_moved_once_by_concurrent_instances(tmp_path: Path, valkey_url: str):
    clock = at("2026-11-26T12:00:00")
    one = await build(valkey_url, None, clock, instance="one")
    two = await build(valkey_url, None, clock, instance="two")
    client = aredis.Redis.from_url(valkey_url)
    try:
        for i in range(250):
            await client.xadd(keys.env_events("shop"), {"type": "quota-used", "n": str(i)})
        moved = await asyncio.gather(one.events.forward("shop"), two.events.forward("shop"))
        assert sum(moved) == 250
        assert await client.xlen(keys.env_events("shop")) == 0
        entries = await client.xrange(keys.EVENTS)
        assert len(entries) == 250
        assert len({fields[b"event_id"] for _, fields in entries}) == 250
        assert sorted(int(fields[b"n"]) for _, fields in entries) == list(range(250))
        assert {fields[b"env"] for _, fields in entries} == {b"shop"}
    finally:
        await client.aclose()
        await one.close()
        await two.close()
