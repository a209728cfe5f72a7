"""Builders shared by the tests: config files in a temp dir, a synced limiter."""

from __future__ import annotations

import asyncio
import datetime as dt
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import redis.asyncio as aredis
import yaml

from quotagate.common.addresses import StoreAddress
from quotagate.common.clock import Clock, ManualClock
from quotagate.common.problem import CONTENT_TYPE, TYPE_BASE
from quotagate.demo import staging
from quotagate.limiter import keys
from quotagate.limiter.limiter import Limiter
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.sync import sync_environments
from quotagate.settings import Config, load_config

QUOTAGATE = [sys.executable, "-m", "quotagate"]
#: The admin token of the test gateways' admin listeners (fixture admin_for).
ADMIN_TOKEN = "s3cret-token"
ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "config" / "plans.yaml"
SHANGHAI = dt.timezone(dt.timedelta(hours=8))


def local(text: str, tz: dt.tzinfo = SHANGHAI) -> dt.datetime:
    """An ISO local time (default UTC+8, the environments' default zone)."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=tz)


def at(text: str, tz: dt.tzinfo = SHANGHAI) -> ManualClock:
    """A clock at an ISO local time."""
    return ManualClock(local(text, tz))


def write_config(directory: Path, environments: dict[str, Any], **gateway: Any) -> Config:
    directory.mkdir(parents=True, exist_ok=True)
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:1",
        "plans_file": str(PLANS),
        "environments_file": "environments.yaml",
        "routes": [],
    }
    settings.update(gateway)
    (directory / "gateway.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    (directory / "environments.yaml").write_text(
        yaml.safe_dump({"environments": environments}, sort_keys=False)
    )
    return load_config(directory / "gateway.yaml")


def env(plan: str = "standard", anchor: str = "2026-11-01", expires: str = "2027-11-01",
        **extra: Any) -> dict[str, Any]:
    return {"plan": plan, "anchor": anchor, "expires": expires, **extra}


async def synced_limiter(store_url: str, config: Config, clock: Clock | None = None,
                         **kw: Any) -> Limiter:
    client = aredis.Redis.from_url(store_url)
    try:
        await sync_environments(client, config)
    finally:
        await client.aclose()
    store = PipelinedStore(StoreAddress.from_url(store_url),
                           timeout_ms=kw.pop("timeout_ms", 200),
                           connect_timeout_ms=kw.pop("connect_timeout_ms", 200),
                           retry_interval_ms=kw.pop("retry_interval_ms", 100))
    kw.setdefault("burst_ms", config.gateway.qps_burst_ms)
    limiter = Limiter(store, clock=clock, **kw)
    limiter.known.update(config.environments.environments)  # as the gateway does at start
    return limiter


def routes_to(origin: str) -> list[dict]:
    return [
        {"prefix": "/functions/", "upstream": origin, "kind": "function"},
        {"prefix": "/database/", "upstream": origin, "kind": "database"},
        {"prefix": "/storage/", "upstream": origin, "kind": "storage"},
        {"prefix": "/ai/", "upstream": origin, "kind": "ai"},  # 1 call, 50 as a stream
        {"prefix": "/admin-only/", "upstream": origin, "kind": "function", "methods": ["POST"]},
    ]


def realtime_routes(origin: str, **extra: Any) -> list[dict[str, Any]]:
    """A realtime route to the stub beside the usual ones (connect to ``/realtime?event_ms=N``
    for a NEXT_EVENT every N ms)."""
    return [{"prefix": "/realtime", "upstream": origin, "kind": "realtime", **extra},
            *routes_to(origin)]


async def live_slots(client: aredis.Redis, env_id: str) -> dict[str, int]:
    """What the store counts, from its keys: totals of instances whose lease is live."""
    raw = await client.hgetall(keys.slots(env_id))
    return {k.decode()[1:]: int(v) for k, v in raw.items() if k.startswith(b"=")}


async def per_instance(client: aredis.Redis, env_id: str) -> dict[str, int]:
    raw = await client.hgetall(keys.slots(env_id))
    return {k.decode(): int(v) for k, v in raw.items() if not k.startswith(b"=")}


async def wait_ready(admin: int, proc: subprocess.Popen, timeout: float = 30) -> None:
    """Until ``quotagate serve``'s ``/readyz`` is 200; fails at once with its stderr if it
    exited (the readiness loop the demo and the load tests use too)."""
    def alive() -> None:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""

    await staging.wait_ready(admin, alive=alive, timeout=timeout)


async def statuses(url: str, env_id: str, n: int) -> list[int]:
    """The statuses of n GETs of url, one after another, as environment env_id."""
    out = []
    async with aiohttp.ClientSession() as s:
        for _ in range(n):
            async with s.get(url, headers={"X-CloudBase-Env": env_id}) as r:
                await r.read()
                out.append(r.status)
    return out


#: Every way quotagate runs its Lua in the store (functions; scripts where they are refused).
SCRIPT_COMMANDS = ("fcall", "fcall_ro", "evalsha", "eval")


def script_calls(stats: dict) -> int:
    """Script and function calls in an ``INFO commandstats`` reply."""
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in SCRIPT_COMMANDS)


async def assert_problem(resp: aiohttp.ClientResponse, status: int) -> dict[str, Any]:
    """``resp`` is an RFC 9457 problem of ``status``; returns its body."""
    assert resp.status == status, await resp.text()
    assert resp.content_type == CONTENT_TYPE, resp.content_type
    body = await resp.json(content_type=None)
    assert body["status"] == status and body["type"].startswith(TYPE_BASE)
    assert body["title"] and body["detail"], body
    return body


async def until(check: Callable[[], Awaitable[bool]], seconds: float = 10) -> None:
    """Until ``check()`` is true (polled every 20 ms; fails after ``seconds``): wait for an
    outcome, not for a guess of how long it takes on a busy machine."""
    deadline = time.monotonic() + seconds
    while not await check():
        assert time.monotonic() < deadline, f"not so after {seconds} s: {check}"
        await asyncio.sleep(0.02)
