"""The gateway never takes its own stall for the store's (issue 24, item 3).

A real Valkey, a real PipelinedStore (under a Limiter, timeout 200 ms) on the default loop and
on uvloop: decisions in flight while the event loop is blocked synchronously for 1.5 s (as a
reload parsing a big YAML file, a GC pause or a slow disk blocks it). The store answered in
microseconds; its replies waited in the socket. Every call must get the store's real answer:
none timed out, none was bypassed fail-open, none refused fail-closed, the store not marked
down and its connection kept. And a store that does hang is still found out once the loop
runs again: a stall extends deadlines by what the loop could not wait, it does not switch
them off.
"""

from __future__ import annotations

import asyncio
import collections
import tempfile
import time
from pathlib import Path

import pytest
import uvloop

from quotagate.limiter.codes import Outcome
from quotagate.limiter.errors import StoreError
from tests.helpers import at, env, synced_limiter, write_config

TIMEOUT_MS = 200
STALL_S = 1.5
LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def run(loop: str, coro_fn, *args):
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        return runner.run(coro_fn(*args))


async def limiter_for(url: str, policy: str):
    config = write_config(Path(tempfile.mkdtemp()), {"shop": env(limits={"calls": 10**6})})
    return await synced_limiter(url, config, at("2026-11-26T12:00:00"),
                                timeout_ms=TIMEOUT_MS, on_failure=policy)


async def stall_under_traffic(url: str, policy: str) -> dict:
    lim = await limiter_for(url, policy)
    store = lim.store
    loop = asyncio.get_running_loop()
    try:
        assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
        connects = store.connects
        seen: dict = {}

        async def one():
            try:
                return await lim.decide("shop", "function", 1)
            except StoreError as exc:
                return exc

        def block(when: str) -> None:  # a reload parsing YAML on the loop, say
            proto = store._proto
            seen[when] = len(proto.waiting) if proto is not None else -1
            time.sleep(STALL_S)

        tasks: list[asyncio.Task] = []
        started = time.monotonic()
        stalls = ["before the write", "after the write"]
        while time.monotonic() - started < 2 * STALL_S + 1.3:  # a trickle before, in, after
            tasks.extend(loop.create_task(one()) for _ in range(5))
            await asyncio.sleep(0)  # they run up to their store call, which is queued
            if stalls and time.monotonic() - started > 0.3 + (2 - len(stalls)) * (STALL_S + 0.5):
                if stalls.pop(0) == "before the write":
                    # Now, in the loop turn that queued them: the write is for the next turn.
                    block("before the write")
                else:
                    # Next turn, right after the write, before their replies are read.
                    loop.call_soon(block, "after the write")
            await asyncio.sleep(0.005)
        results = await asyncio.gather(*tasks)
        errors = [r for r in results if isinstance(r, Exception)]
        bypassed = [r for r in results if not isinstance(r, Exception) and r.store_bypassed]
        return {
            "calls": len(results),
            "in_flight_at_stalls": (seen.get("before the write"), seen.get("after the write")),
            "errors": len(errors),
            "first_error": repr(errors[0]) if errors else None,
            "bypassed": len(bypassed),
            "outcomes": dict(collections.Counter(
                r.outcome.name for r in results if not isinstance(r, Exception))),
            "down": time.monotonic() < store._down_until,
            "stalled_connections": len(store._stalled),
            "new_connections": store.connects - connects,
            "backlog": dict(lim.backlog.pending),
        }
    finally:
        await lim.close()


@pytest.mark.parametrize("policy", ["open", "closed"])
@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_blocked_loop_is_not_a_hung_store(own_valkey, loop, policy):
    seen = run(loop, stall_under_traffic, own_valkey.url, policy)
    print(f"\n{loop}, fail-{policy}, loop blocked twice {STALL_S} s: {seen}")
    assert min(seen["in_flight_at_stalls"]) > 0, seen  # the stalls did catch calls in flight
    assert seen["errors"] == 0, seen  # none timed out / was refused (fail-closed: no 503)
    assert seen["bypassed"] == 0 and not seen["backlog"], seen  # none passed undecided
    # Every one the store's own answer (admitted, or over the plan's QPS in the burst).
    assert sum(seen["outcomes"].values()) == seen["calls"], seen
    assert not seen["down"] and seen["stalled_connections"] == 0, seen
    assert seen["new_connections"] == 0, seen  # the connection was never set aside


async def hung_store_and_stall(server, policy: str) -> dict:
    lim = await limiter_for(server.url, policy)
    loop = asyncio.get_running_loop()
    try:
        assert (await lim.decide("shop", "function", 1)).outcome is Outcome.ADMITTED
        server.pause()  # SIGSTOP: the store really hangs, and the loop stalls too
        ended: list[float] = []

        async def one():
            try:
                result = await lim.decide("shop", "function", 1)
            except StoreError as exc:
                result = exc
            ended.append(time.monotonic())
            return result

        tasks = [loop.create_task(one()) for _ in range(10)]
        await asyncio.sleep(0)  # they are sent
        await asyncio.sleep(0)
        time.sleep(1.0)  # and the loop stalls before any timeout could fire
        stall_end = time.monotonic()
        results = await asyncio.gather(*tasks)
        return {"results": results, "after_stall_s": max(ended) - stall_end}
    finally:
        server.resume()
        await lim.close()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_hung_store_is_still_found_out_after_a_stall(own_valkey, loop):
    seen = run(loop, hung_store_and_stall, own_valkey, "open")
    results = seen["results"]
    print(f"\n{loop}: hung store + 1 s stall: all {len(results)} bypassed "
          f"{all(getattr(r, 'store_bypassed', False) for r in results)}, "
          f"the last {seen['after_stall_s']:.3f} s after the stall")
    assert all(not isinstance(r, Exception) and r.store_bypassed for r in results), results
    # At most the timeout again after the stall (the stall does not count as the store's
    # time), plus a watchdog tick and a busy machine's slack.
    assert seen["after_stall_s"] < TIMEOUT_MS / 1000 * 1.25 + 0.6, seen
