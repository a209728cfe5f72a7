"""Slow and idle clients are bounded (issue 12), through ``quotagate serve`` as shipped: a
request head must come within clients.header_timeout_ms, connections beyond
clients.max_connections are refused at once, and the descriptor limit is raised at start."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.deployed import (
    Deployed,
    days,
    raise_descriptor_limit,
    serve,
    shipped_config,
    upstream_process,
)

pytestmark = pytest.mark.deployed

HEADER_TIMEOUT_MS = 3000


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    """This test process holds thousands of sockets itself."""
    raise_descriptor_limit()


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    with upstream_process() as origin:
        yield origin


async def gateway(tmp_path: Path, origin: str, nofile: int | None = None,
                  **clients: int) -> Deployed:
    config = shipped_config(tmp_path, origin, clients={"header_timeout_ms": HEADER_TIMEOUT_MS,
                                                       **clients})
    deployed = await serve(tmp_path, config, nofile=nofile)
    deployed.put_env("legit", f"plan: standard\nanchor: {days(0)}\nexpires: {days(365)}\n")
    return deployed


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the gateway closes this connection within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except TimeoutError:
        return False
    except ConnectionError:
        return True


async def legit_requests(deployed: Deployed, n: int) -> tuple[list[int], list[float]]:
    statuses, took = [], []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            started = time.perf_counter()
            async with s.get(deployed.route("function") + "hello",
                             headers={"X-CloudBase-Env": "legit"}) as r:
                await r.read()
                statuses.append(r.status)
            took.append(time.perf_counter() - started)
    return statuses, took


async def test_slowloris_and_idle_sockets_do_not_starve_real_clients(tmp_path, upstream):
    # Started under the common soft limit of 1,024 descriptors: 3,000 sockets would exhaust
    # it (every later accept failing) unless the gateway raises it.
    deployed = await gateway(tmp_path, upstream, nofile=1024)
    try:
        baseline, usual = await legit_requests(deployed, 50)
        assert baseline == [200] * 50
        idle = [await asyncio.open_connection("127.0.0.1", deployed.port)
                for _ in range(1500)]
        slow = [await asyncio.open_connection("127.0.0.1", deployed.port)
                for _ in range(1500)]
        opened = time.monotonic()
        for _, writer in slow:
            writer.write(b"GET /functions/x HTTP/1.1\r\nHost: legit\r\n")

        async def trickle() -> None:
            for i in range(HEADER_TIMEOUT_MS // 500 + 4):  # a header line every 0.5 s
                await asyncio.sleep(0.5)
                for _, writer in slow:
                    if not writer.is_closing():
                        with contextlib.suppress(ConnectionError):
                            writer.write(f"X-Slow-{i}: 1\r\n".encode())

        trickling = asyncio.create_task(trickle())
        # While all 3,000 are open, real clients are served.
        statuses, took = await legit_requests(deployed, 50)
        assert statuses == [200] * 50
        # And every one of the 3,000 is closed by the gateway soon after the header timeout.
        left = HEADER_TIMEOUT_MS / 1000 - (time.monotonic() - opened) + 5
        closed = await asyncio.gather(*(closed_by_peer(r, left) for r, _ in idle + slow))
        trickling.cancel()
        assert closed.count(True) == 3000, closed.count(False)
        for _, writer in idle + slow:
            writer.close()
    finally:
        log = deployed.stop()
    assert "descriptor limit raised from 1024" in log, log
    # A figure for the operator guide, not an assertion (timing is the benchmark's job).
    print(f"\nordinary requests p50: {sorted(usual)[25] * 1000:.1f} ms alone, "
          f"{sorted(took)[25] * 1000:.1f} ms with 3,000 hostile sockets open")


async def test_connections_beyond_the_cap_are_refused_at_once(tmp_path, upstream):
    deployed = await gateway(tmp_path, upstream, max_connections=100)
    try:
        held = [await asyncio.open_connection("127.0.0.1", deployed.port) for _ in range(100)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", deployed.port)
        async with asyncio.timeout(5):
            answer = await reader.read()  # answered and closed before it sent anything
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1" in head
        problem = json.loads(body)
        assert problem["code"] == "TOO_MANY_CONNECTIONS" and "100" in problem["detail"]
        writer.close()
        # The idle ones are closed after the header timeout: the next client is served.
        await asyncio.gather(*(closed_by_peer(r, HEADER_TIMEOUT_MS / 1000 + 5)
                               for r, _ in held))
        statuses, _ = await legit_requests(deployed, 5)
        assert statuses == [200] * 5
        for _, w in held:
            w.close()
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{deployed.admin}/metrics") as r:
            metrics = await r.text()
        assert "quotagate_connections_refused_total 1.0" in metrics
    finally:
        deployed.stop()
