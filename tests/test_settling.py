"""limiter/settling.py on its own: what finishes in one loop iteration leaves as one settle
call per environment; what the store cannot take is kept for write-back."""

from __future__ import annotations

import asyncio
from pathlib import Path

import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.limiter import keys
from quotagate.limiter.backlog import METER_PREFIX, SLOT_MS
from quotagate.limiter.embedded import free_port
from tests.helpers import at, env, local, write_config
from tests.parts import build, command_calls

NOON = "2026-11-26T12:00:00"
CYCLE = day_number(local(NOON).date().replace(day=1))


async def test_one_settle_call_per_environment_per_tick(tmp_path: Path, valkey_url: str):
    config = write_config(tmp_path, {"shop": env(), "mall": env()})
    parts = await build(valkey_url, config, at(NOON))
    client = aredis.Redis.from_url(valkey_url)
    try:
        await parts.calls.load_scripts()
        await client.config_resetstat()
        for amount in (1000, 2000, 3000):
            parts.settler.queue("shop", None, "gbs", amount)
        parts.settler.queue("mall", None, "gbs", 500)
        await asyncio.sleep(0.1)
        assert await command_calls(client, "fcall") == 2  # shop's three in one, mall's
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:gbs")) == 6000
        assert int(await client.hget(keys.usage("mall"), f"{CYCLE}:gbs")) == 500
    finally:
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
