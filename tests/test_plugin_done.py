"""Plugin mode's done call, from outside: ``quotagate serve`` (shipped config, ``authz_listen``
on, real clock and sockets), decisions asked for as Traefik ForwardAuth asks them and done
calls sent as a proxy sends them, the store's counts read through the admin API.

- The first done call for a ticket decides everything, whatever it carries (nothing to
  meter, figures, ``answered=0``), whichever worker receives it and however many replays
  run at once; every later one changes nothing.
- A figure out of bounds (``duration_ms`` whose GBs overflow, ``bytes`` beyond 2^53 − 1) is
  refused with 400 before anything is written; the ticket stays good for a done call that is
  right.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from quotagate.demo.staging import shipped_gateway
from quotagate.limiter.embedded import free_port
from tests.deployed import Deployed, hold_the_day, live_env, serve, shipped_config, start_upstream

pytestmark = pytest.mark.deployed

MAX = 2**53 - 1
#: The shipped function route's memory (MB): GBs are counted in MB·ms.
MEMORY_MB = 256
#: Generous: the machine running this may be busy.
PATIENCE_S = 30


def environments() -> dict[str, Any]:
    fn = live_env(function_concurrency=1, qps=100_000)
    # A function as big as a function may be (MemoryMb's bound), for GBs that overflow.
    fn["functions"] = {"huge": {"memory_mb": 1024 * 1024}}
    # Overage on: usage beyond plan + packs is pay-as-you-go, and counted in the report.
    return {"fn": {**fn, "overage": True},
            "shop": {**live_env(qps=100_000), "overage": True}}


@contextlib.asynccontextmanager
async def plugin_mode(directory: Path, *args: str) -> AsyncIterator[Authz]:
    """``quotagate serve *args`` in plugin mode; stopped after, its log free of tracebacks."""
    hold_the_day()
    upstream, upstream_url = start_upstream()
    port = free_port()
    try:
        # A store call may take long on a busy machine: the done calls are answered from the
        # store's reply, not from a retry in the background.
        store = {**shipped_gateway()["store"], "timeout_ms": 3000}
        settings = shipped_config(directory, upstream_url, store=store,
                                  authz_listen=f"127.0.0.1:{port}")
        (directory / "environments.yaml").write_text(
            yaml.safe_dump({"environments": environments()}))
        deployed = await serve(directory, settings, *args)
        try:
            yield Authz(deployed, port)
        finally:
            log = deployed.stop()
            assert "Traceback" not in log, log
    finally:
        upstream.kill()


class Authz:
    def __init__(self, deployed: Deployed, port: int):
        self.deployed = deployed
        self.base = f"http://127.0.0.1:{port}"

    async def decide(self, method: str, uri: str, env: str) -> str:
        """An admitted decision's ticket (as Traefik ForwardAuth asks)."""
        headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri,
                   "X-Forwarded-Host": "api.example.com", "X-CloudBase-Env": env}
        async with aiohttp.ClientSession() as s, s.get(self.base + "/authz/forward",
                                                       headers=headers) as r:
            assert r.status == 200, (r.status, await r.text())
            return r.headers["X-Quotagate-Decision"]

    async def status_of(self, method: str, uri: str, env: str) -> int:
        headers = {"X-Forwarded-Method": method, "X-Forwarded-Uri": uri,
                   "X-Forwarded-Host": "api.example.com", "X-CloudBase-Env": env}
        async with aiohttp.ClientSession() as s, s.get(self.base + "/authz/forward",
                                                       headers=headers) as r:
            await r.read()
            return r.status

    async def done(self, ticket: str, **figures: Any) -> tuple[int, dict[str, Any]]:
        """One done call on a connection of its own (so ``--workers`` spreads them)."""
        async with aiohttp.ClientSession() as s, s.post(
                self.base + "/authz/v1/done", params={"decision": ticket, **figures}) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else {})

    async def done_json(self, ticket: str, **figures: Any) -> tuple[int, dict[str, Any]]:
        """The same, the figures as a JSON object (numbers as JSON numbers)."""
        async with aiohttp.ClientSession() as s, s.post(
                self.base + "/authz/v1/done", json={"decision": ticket, **figures}) as r:
            text = await r.text()
            return r.status, (json.loads(text) if text else {})

    async def usage(self, env: str) -> dict[str, Any]:
        status, body = await self.deployed.admin_api("GET", f"/envs/{env}/usage")
        assert status == 200, body
        return body

    async def used(self, env: str, meter: str) -> int:
        """Everything counted of ``meter`` this cycle: from the plan and pay-as-you-go."""
        m = (await self.usage(env))["meters"][meter]
        return int(m["used"]) + int(m["payg"]) + sum(int(p["used"]) for p in m["packs"])

    async def in_flight(self, env: str, function: str) -> int:
        return int((await self.usage(env))["function_concurrency"]["in_flight"]
                   .get(function, 0))


async def until(what: Callable[[], Awaitable[Any]], want: Any) -> Any:
    """Poll ``what`` until it gives ``want`` (generous bound); returns its last value."""
    deadline = time.monotonic() + PATIENCE_S
    got = await what()
    while got != want and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        got = await what()
    return got


@pytest.fixture
async def authz(tmp_path: Path) -> AsyncIterator[Authz]:
    async with plugin_mode(tmp_path / "config") as it:
        yield it


async def test_the_first_done_call_decides_even_when_it_meters_nothing(authz: Authz):
    calls = lambda env: authz.used(env, "calls")  # noqa: E731
    # A function's call whose first done call meters nothing (answered, no duration).
    ticket = await authz.decide("POST", "/functions/report", "fn")
    assert await calls("fn") == 1
    assert (await authz.done(ticket))[0] == 204
    assert await until(lambda: authz.in_flight("fn", "report"), 0) == 0  # its slot is back
    # (a) a replay saying it was never answered gives nothing back;
    assert (await authz.done(ticket, answered=0))[0] == 204
    # (b) a replay with a duration meters no GBs.
    assert (await authz.done(ticket, duration_ms=1500))[0] == 204
    assert (await authz.done_json(ticket, answered=False, duration_ms=2500))[0] == 204
    assert await calls("fn") == 1, "a replay gave the call back"
    assert await authz.used("fn", "gbs") == 0, "a replay metered GBs"

    # A route metered in bytes: first 0 bytes, then a replay with some.
    ticket = await authz.decide("GET", "/storage/a.png", "shop")
    before = await authz.usage("shop")
    assert (await authz.done(ticket, bytes=0))[0] == 204
    assert (await authz.done(ticket, bytes=5000))[0] == 204
    assert (await authz.done(ticket, answered=0, bytes=7000))[0] == 204
    assert (await authz.usage("shop"))["meters"] == before["meters"]

    # A stream price charged up front (nginx sends no body: the intent is unreadable): a
    # first done call saying it was a stream keeps it; a replay saying it was not gives
    # nothing back.
    ticket = await authz.decide("POST", "/ai/chat", "shop")
    charged = await calls("shop")
    assert (await authz.done(ticket, stream=1))[0] == 204
    assert (await authz.done(ticket, stream=0))[0] == 204
    assert (await authz.done(ticket, content_type="application/json"))[0] == 204
    assert await calls("shop") == charged, "a replay gave the stream's price back"

    # (c) a first done call with figures: applied once, replays with others change nothing.
    ticket = await authz.decide("POST", "/functions/report", "fn")
    calls_before = await calls("fn")
    assert (await authz.done(ticket, duration_ms=1000))[0] == 204
    assert await until(lambda: authz.used("fn", "gbs"), MEMORY_MB * 1000) == MEMORY_MB * 1000
    for figures in ({"duration_ms": 1000}, {"duration_ms": 99_000}, {"answered": 0},
                    {"answered": 0, "duration_ms": 0}, {}):
        assert (await authz.done(ticket, **figures))[0] == 204
    assert await authz.used("fn", "gbs") == MEMORY_MB * 1000
    assert await calls("fn") == calls_before

    # A first done call that gives the call back: once, whatever follows.
    ticket = await authz.decide("POST", "/functions/report", "fn")
    assert await calls("fn") == calls_before + 1
    assert (await authz.done(ticket, answered=0))[0] == 204
    assert await until(lambda: calls("fn"), calls_before) == calls_before
    for figures in ({"answered": 0}, {"duration_ms": 3000}, {}):
        assert (await authz.done(ticket, **figures))[0] == 204
    assert await calls("fn") == calls_before
    assert await authz.used("fn", "gbs") == MEMORY_MB * 1000


async def test_replays_on_other_workers_and_at_once_change_nothing(tmp_path: Path):
    async with plugin_mode(tmp_path / "config", "--workers", "2") as authz:
        calls = lambda: authz.used("fn", "calls")  # noqa: E731
        gbs = lambda: authz.used("fn", "gbs")  # noqa: E731
        replays: tuple[dict[str, int], ...] = (
            {"answered": 0}, {"duration_ms": 4000}, {"answered": 0, "duration_ms": 9}, {})

        # (d) A first done call with nothing to meter, then 24 replays of every kind at once,
        # each on its own connection (SO_REUSEPORT spreads them over both workers).
        ticket = await authz.decide("POST", "/functions/report", "fn")
        assert (await authz.done(ticket))[0] == 204
        answers = await asyncio.gather(*(authz.done(ticket, **replays[i % len(replays)])
                                         for i in range(24)))
        assert {status for status, _ in answers} == {204}
        assert (await calls(), await gbs()) == (1, 0)

        # 24 copies of one done call with figures at once: metered once.
        ticket = await authz.decide("POST", "/functions/report", "fn")
        answers = await asyncio.gather(*(authz.done(ticket, duration_ms=1000)
                                         for _ in range(24)))
        assert {status for status, _ in answers} == {204}
        both = lambda: asyncio.gather(calls(), gbs())  # noqa: E731
        assert await until(both, [2, MEMORY_MB * 1000]) == [2, MEMORY_MB * 1000]

        # 24 done calls of every kind at once, nothing sent first: whichever the store takes
        # first decides — the call given back, or GBs metered, or neither — never two.
        ticket = await authz.decide("POST", "/functions/report", "fn")
        answers = await asyncio.gather(*(authz.done(ticket, **replays[i % len(replays)])
                                         for i in range(24)))
        assert {status for status, _ in answers} == {204}
        outcome = (await calls(), await gbs() - MEMORY_MB * 1000)
        assert outcome in {(2, 0), (3, 0), (3, MEMORY_MB * 4000), (2, MEMORY_MB * 9)}, outcome
        assert await until(lambda: authz.in_flight("fn", "report"), 0) == 0


async def test_figures_out_of_bounds_are_refused_before_anything_is_written(authz: Authz):
    ticket = await authz.decide("POST", "/functions/report", "fn")
    big = await authz.decide("POST", "/functions/huge", "fn")  # (another function's slot)
    before = await authz.usage("fn")
    assert before["function_concurrency"]["in_flight"] == {"report": 1, "huge": 1}
    for done, which, figures, named in (
            # GBs beyond 2^63 in the store (memory × duration), and beyond 2^53 − 1
            (authz.done, big, {"duration_ms": MAX}, "duration_ms"),
            (authz.done, big, {"duration_ms": (MAX >> 20) + 1}, "duration_ms"),
            # a duration no request could have (longer than its ticket lives)
            (authz.done, ticket, {"duration_ms": MAX}, "duration_ms"),
            (authz.done_json, ticket, {"duration_ms": MAX}, "duration_ms"),
            (authz.done, ticket, {"duration_ms": MAX, "answered": 0}, "duration_ms"),
            (authz.done, ticket, {"duration_ms": MAX // MEMORY_MB + 1}, "duration_ms"),
            (authz.done, ticket, {"duration_ms": 90_000_000}, "duration_ms"),
            (authz.done, ticket, {"duration_ms": 2**53}, "duration_ms"),
            (authz.done_json, ticket, {"duration_ms": 1e300}, "duration_ms"),
            (authz.done, ticket, {"bytes": 2**53}, "bytes")):
        status, problem = await done(which, **figures)
        assert status == 400, (figures, status, problem)
        assert problem["code"] == "INVALID_DECISION" and named in problem["detail"], problem
    # Nothing was written — no GBs, no call given back, no slot given back — and the
    # gateway still answers decisions (no 503, no store error).
    assert await authz.usage("fn") == before
    assert await authz.status_of("POST", "/functions/report", "fn") == 429  # (its slot: held)
    assert await authz.status_of("GET", "/database/q", "fn") == 200
    # The tickets are still good: a done call that is right is applied, whole.
    assert (await authz.done(ticket, duration_ms=1234))[0] == 204
    assert (await authz.done(big, duration_ms=1000))[0] == 204
    want = MEMORY_MB * 1234 + 1024 * 1024 * 1000
    assert await until(lambda: authz.used("fn", "gbs"), want) == want
    assert await until(lambda: authz.in_flight("fn", "report"), 0) == 0

    # bytes at the bound: applied whole (plan, then pay-as-you-go), never partly; once.
    ticket = await authz.decide("GET", "/storage/a.png", "shop")
    assert await authz.used("shop", "storage_traffic_bytes") == 0
    assert (await authz.done(ticket, bytes=MAX))[0] == 204
    assert await until(lambda: authz.used("shop", "storage_traffic_bytes"), MAX) == MAX
    assert (await authz.done(ticket, bytes=MAX))[0] == 204
    assert await authz.used("shop", "storage_traffic_bytes") == MAX
