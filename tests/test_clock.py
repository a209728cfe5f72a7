"""The production clock is the store's: sampled from a real store's TIME, carried by the
monotonic clock, never a sentinel where a timestamp is read."""

from __future__ import annotations

import datetime as dt

import pytest
import redis.asyncio as aredis

from quotagate.common.clock import STORE_TIME, ManualClock, StoreClock, StoreTime, script_arg


def test_store_time_is_no_timestamp():
    assert script_arg(STORE_TIME) == "0"  # the scripts read TIME themselves
    assert script_arg(1_700_000_000_000) == "1700000000000"
    with pytest.raises(ValueError):
        script_arg(0)  # 0 is "ask the store" only as STORE_TIME, never as a number
    with pytest.raises(TypeError):
        int(STORE_TIME)  # type: ignore[call-overload]
    with pytest.raises(TypeError):
        STORE_TIME + 1  # type: ignore[operator]
    assert StoreClock().script_time() is STORE_TIME
    manual = ManualClock(dt.datetime(2026, 11, 26, tzinfo=dt.UTC))
    assert manual.script_time() == manual.now_ms() == 1_795_651_200_000
    assert not isinstance(manual.script_time(), StoreTime)


async def test_the_best_of_the_samples_is_kept_and_carried_forward():
    ticks = iter([10.0, 10.5,   # a slow round trip: 500 ms
                  20.0, 20.002,  # the best: 2 ms, the store said 1,000,000 s at 20.001
                  30.0, 30.1])
    now = [0.0]

    def monotonic() -> float:
        now[0] = next(ticks, now[0])
        return now[0]

    clock = StoreClock(monotonic=monotonic, wall=lambda: 1_000_005.0)
    assert not clock.synced
    replies = iter([(999_999, 0), (1_000_000, 0), (1_000_010, 0)])

    async def store_time() -> tuple[int, int]:
        return next(replies)

    await clock.sync(store_time)
    assert clock.synced
    now[0] = 21.001  # one second after the best sample's midpoint
    assert clock.now_ms() == 1_000_001_000
    # The host's wall clock (1,000,005 s) against the store's at the sample's last reading
    # (monotonic 30.1: 1,000,010.099 s).
    assert clock.skew_ms == pytest.approx(-5_099, abs=1)


async def test_synced_with_a_real_store(valkey_url: str):
    client = aredis.Redis.from_url(valkey_url)
    try:
        clock = StoreClock()

        async def store_time() -> tuple[int, int]:
            seconds, micros = await client.time()
            return int(seconds), int(micros)

        await clock.sync(store_time)
        seconds, micros = await client.time()
        # Same host: within a round trip or two of the store's own answer.
        assert abs(clock.now_ms() - (seconds * 1000 + micros // 1000)) < 250
    finally:
        await client.aclose()
