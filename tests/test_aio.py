"""Background loops stop when cancelled, even when a library turns the cancellation into an
error of its own (redis-py may, mid-command): a gateway's shutdown waited forever on the
lifecycle scheduler that logged such an error and slept on. Or when a library swallows it:
on Python 3.11 ``asyncio.wait_for`` returns the result of what finished as the cancel came
(CPython gh-86296), redis-py wraps its socket writes in it, and a gateway's shutdown waited
its full 10 s on the scheduler, asleep for its next round."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from quotagate.common.clock import StoreClock
from quotagate.control import events
from quotagate.control.envs import Environments
from quotagate.control.lifecycle import Scheduler
from quotagate.gateway.app import STATE
from quotagate.settings.schema import EventSettings
from tests.helpers import at, env


class HidesItsCancellation:
    """A store whose first call of a round (is the due index to be filled?) is interrupted
    like a redis command can be: the CancelledError comes out as a ConnectionError."""

    def __init__(self) -> None:
        self.started = asyncio.Event()  # each its own (a class one stays set for the next)
        self.redis = self  # (the Environments' store, as the scheduler reads it)

    async def set(self, *_: object, **__: object) -> bool:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ConnectionError("connection closed by the cancellation") from None
        return False


async def stops_when_cancelled_in_its_listing(envs: HidesItsCancellation) -> None:
    """A scheduler (rounds an hour apart) cancelled while it reads the store ends."""
    scheduler = Scheduler(envs, StoreClock())  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(scheduler.run(every_s=3600))
    await envs.started.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task} and task.cancelled()


async def test_the_scheduler_stops_when_its_cancellation_is_hidden():
    await stops_when_cancelled_in_its_listing(HidesItsCancellation())


class SwallowsItsCancellation(HidesItsCancellation):
    """A store read that finishes as the cancel comes, and returns its result: what
    ``asyncio.wait_for`` does on Python 3.11."""

    async def set(self, *_: object, **__: object) -> bool:
        self.started.set()
        with contextlib.suppress(asyncio.CancelledError):  # lost; the task stays cancelling
            await asyncio.sleep(30)
        return False


async def test_the_scheduler_stops_when_its_cancellation_is_swallowed():
    await stops_when_cancelled_in_its_listing(SwallowsItsCancellation())


async def stops_wherever_cancelled(loop: Callable[[], Coroutine[Any, Any, None]],
                                   every: int = 1) -> None:
    """Start ``loop``, cancel it after 0, 1, 2 ... 39 turns of the event loop (or every
    ``every``-th of them), so the cancel lands at every point of its store calls, and see each
    run end: a lost cancel leaves it asleep for its interval (an hour here), or going on."""
    for turns in range(0, 40, every):
        task = asyncio.get_running_loop().create_task(loop())
        for _ in range(turns):
            await asyncio.sleep(0)
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done == {task}, f"still running 5 s after a cancel {turns} turns in"


async def test_store_loops_stop_wherever_the_cancel_lands(make_gateway):
    """The loops that talk to a real store through redis-py: the lifecycle scheduler (its
    first round reads every environment, all due) and the webhook delivery."""
    clock = at("2026-11-26T12:00:00")
    gw = await make_gateway({f"e{i}": env(expires="2026-11-30") for i in range(5)},
                            clock=clock, lifecycle_interval_ms=0)
    state = gw.app[STATE]
    scheduler = Scheduler(Environments(state.redis, lambda: state.config, clock), clock)
    await stops_wherever_cancelled(lambda: scheduler.run(every_s=3600))
    delivery = events.WebhookDelivery(state.redis, EventSettings(
        webhook_url="http://127.0.0.1:9/hook"), "test")
    # (A cancel lost in its XREADGROUP is seen when the read's 1 s block ends: every 4th.)
    await stops_wherever_cancelled(delivery.run, every=4)
