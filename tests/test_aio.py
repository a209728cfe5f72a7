"""Background loops stop when cancelled, even when a library turns the cancellation into an
error of its own (redis-py may, mid-command): a gateway's shutdown waited forever on the
lifecycle scheduler that logged such an error and slept on."""

from __future__ import annotations

import asyncio

from quotagate.common.clock import StoreClock
from quotagate.control.lifecycle import Scheduler


class HidesItsCancellation:
    """Environments whose listing is interrupted like a redis command can be: the
    CancelledError comes out as a ConnectionError."""

    redis = None
    started = asyncio.Event()

    async def ids(self) -> dict[str, str]:
        self.started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            raise ConnectionError("connection closed by the cancellation") from None
        return {}


async def test_the_scheduler_stops_when_its_cancellation_is_hidden():
    envs = HidesItsCancellation()
    scheduler = Scheduler(envs, StoreClock())  # type: ignore[arg-type]
    task = asyncio.get_running_loop().create_task(scheduler.run(every_s=3600))
    await envs.started.wait()
    task.cancel()
    done, _ = await asyncio.wait([task], timeout=5)
    assert done == {task} and task.cancelled()
