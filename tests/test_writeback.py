"""limiter/writeback.py on its own: usage admitted while the store was away is written back
once per record id, on the day it passed; an environment the store lacks is reported."""

from __future__ import annotations

from pathlib import Path

import redis.asyncio as aredis

from quotagate.common.calendar import day_number
from quotagate.limiter import keys
from quotagate.limiter.backlog import SLOT_MS
from tests.helpers import at, env, local, write_config
from tests.parts import build

NOON = "2026-11-26T12:00:00"
CYCLE = day_number(local(NOON).date().replace(day=1))


async def test_written_back_once_per_record_id(tmp_path: Path, valkey_url: str):
    clock = at(NOON)
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env()}), clock)
    client = aredis.Redis.from_url(valkey_url)
    try:
        passed = clock.now_ms() - 3_600_000
        slot = passed - passed % SLOT_MS
        for _ in range(3):  # a retry, a journal replay: the same id
            assert await parts.writeback.write_back("shop", "function", 4, slot, "rec-1")
        assert await parts.writeback.write_back("shop", "meter:gbs", 900, slot, "rec-2")
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:calls")) == 4
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:gbs")) == 900
    finally:
        await client.aclose()
        await parts.close()


async def test_flush_empties_the_backlog_and_reports_a_missing_environment(
        tmp_path: Path, valkey_url: str):
    clock = at(NOON)
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env()}), clock)
    client = aredis.Redis.from_url(valkey_url)
    try:
        passed = clock.now_ms()
        slot = passed - passed % SLOT_MS
        backlog = parts.writeback.backlog
        assert backlog.admit(("shop", "function", slot), 5)
        assert backlog.admit(("ghost", "function", slot), 2)
        assert await parts.writeback.flush() == 1
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:calls")) == 5
        assert backlog.pending == {("ghost", "function", slot): 2}  # kept: tried again later
        assert parts.missing == ["ghost"]
    finally:
        await client.aclose()
        await parts.close()


async def test_an_entry_the_store_refuses_does_not_hold_back_the_others(
        tmp_path: Path, valkey_url: str):
    """One environment's keys answer with an error (here its QPS key is of the wrong type, so
    decide.lua stops with WRONGTYPE before it writes anything): the other environments'
    usage is written back all the same; the refused entry stays, in doubt under its id, and
    is written once its keys are right again."""
    import pytest

    from quotagate.limiter.errors import StoreError

    clock = at(NOON)
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env(), "bad": env()}),
                        clock)
    client = aredis.Redis.from_url(valkey_url)
    try:
        await client.hset(keys.qps("bad"), "x", "1")
        passed = clock.now_ms()
        slot = passed - passed % SLOT_MS
        backlog = parts.writeback.backlog
        assert backlog.admit(("bad", "function", slot), 3)  # first: tried first
        assert backlog.admit(("shop", "function", slot), 5)
        with pytest.raises(StoreError, match="1 usage entries refused"):
            await parts.writeback.flush()
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:calls")) == 5
        assert list(backlog.in_doubt) == [("bad", "function", slot)]
        assert await client.hget(keys.usage("bad"), f"{CYCLE}:calls") is None
        await client.delete(keys.qps("bad"))
        assert await parts.writeback.flush() == 1
        assert await parts.writeback.flush() == 0  # nothing twice
        assert int(await client.hget(keys.usage("bad"), f"{CYCLE}:calls")) == 3
        assert int(await client.hget(keys.usage("shop"), f"{CYCLE}:calls")) == 5
        assert not backlog.pending and not backlog.in_doubt
    finally:
        await client.aclose()
        await parts.close()
