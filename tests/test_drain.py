"""A graceful stop of ``quotagate serve`` as shipped (SIGTERM, as Kubernetes and systemd send
it): the listeners stop accepting at once, a request in flight is answered if it finishes
within ``drain_timeout_ms``, and one that does not is cut off then, so the process ends
within the pod's grace period instead of being killed mid-write-back."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import aiohttp
import pytest

from tests.deployed import live_env, served

pytestmark = pytest.mark.deployed


async def stopped(deployed, timeout: float = 30) -> int:
    for _ in range(int(timeout / 0.05)):
        if deployed.proc.poll() is not None:
            return deployed.proc.returncode
        await asyncio.sleep(0.05)
    raise AssertionError("serve did not stop")


async def test_a_request_in_flight_is_answered_and_new_ones_are_refused(tmp_path: Path):
    async with served(tmp_path, {"draining": live_env()}, drain_timeout_ms=10_000) as (gw, _):
        url = gw.route("function") + "slow?ms=1500"
        async with aiohttp.ClientSession() as s:
            async def slow() -> tuple[int, bytes]:
                async with s.get(url, headers={"X-CloudBase-Env": "draining"}) as r:
                    return r.status, await r.read()

            in_flight = asyncio.create_task(slow())
            await asyncio.sleep(0.5)  # (admitted and at the upstream)
            gw.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            async with aiohttp.ClientSession() as fresh:  # a new connection: refused
                with pytest.raises(aiohttp.ClientConnectionError):
                    await fresh.get(gw.route("function") + "f",
                                    headers={"X-CloudBase-Env": "draining"})
            status, body = await in_flight
        assert status == 200 and body
        assert await stopped(gw) == 0
        assert "requests in flight get up to 10.0 s" in gw.log_text()


async def test_a_request_longer_than_the_drain_is_cut_off_at_its_end(tmp_path: Path):
    async with served(tmp_path, {"draining": live_env()}, drain_timeout_ms=300) as (gw, _):
        url = gw.route("function") + "slow?ms=20000"
        async with aiohttp.ClientSession() as s:
            async def slow() -> int:
                async with s.get(url, headers={"X-CloudBase-Env": "draining"}) as r:
                    await r.read()
                    return r.status

            in_flight = asyncio.create_task(slow())
            await asyncio.sleep(0.5)
            gw.proc.send_signal(signal.SIGTERM)
            # Stopped long before the upstream would answer (20 s), the request cut off.
            assert await stopped(gw, timeout=15) == 0
            with pytest.raises(aiohttp.ClientError):
                await in_flight
