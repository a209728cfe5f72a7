"""Hot environments through ``quotagate serve``: two instances, one store, the real clock, the
demo upstream; driven over HTTP only. The environment's rate on each instance is over
``gateway.hot_rate`` (lowered here: this machine's clients cannot offer thousands a second),
so both decide it in memory from leases (hot.py, lease.lua)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aredis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from quotagate.limiter import keys
from quotagate.limiter.embedded import EmbeddedValkey, free_port
from tests.deployed import Deployed, hold_the_day, live_env, serve, shipped_config, start_upstream
from tests.helpers import until

pytestmark = pytest.mark.deployed

ENV = "hot-shop"
HOT_RATE = 100


@contextlib.asynccontextmanager
async def two_instances(tmp_path: Path, **limits: int) -> AsyncIterator[
        tuple[list[Deployed], aredis.Redis, Callable[[int], Awaitable[Deployed]]]]:
    """Two ``quotagate serve`` on one Valkey, each in its own directory with its own journal;
    yields them, a client of the store, and ``restart(i)`` (serve again from its directory)."""
    hold_the_day()
    store = EmbeddedValkey(tmp_path / "valkey", port=free_port(), appendonly=False).start()
    upstream, origin = start_upstream()
    client = aredis.Redis.from_url(store.url)
    gateways: list[Deployed] = []
    settings = []
    try:
        for i in range(2):
            directory = tmp_path / f"gw{i}"
            directory.mkdir()
            settings.append(shipped_config(
                directory, origin, hot_rate=HOT_RATE, access_log=False,
                store={"url": store.url, "timeout_ms": 2000,
                       "journal_dir": str(directory / "journal")}))
            (directory / "environments.yaml").write_text(yaml.safe_dump(
                {"environments": {ENV: live_env(**limits)}}))
            gateways.append(await serve(directory, settings[i]))

        async def restart(i: int) -> Deployed:
            gateways[i] = await serve(gateways[i].directory, settings[i])
            return gateways[i]

        yield gateways, client, restart
    finally:
        logs = []
        for gw in gateways:
            if gw.proc.poll() is None:
                logs.append(gw.stop())
        await client.aclose()
        upstream.kill()
        store.stop()
    for log in logs:
        assert "Traceback" not in log, log[-3000:]


async def used_calls(client: aredis.Redis) -> int:
    """Calls charged to the environment's plan quota, every cycle."""
    usage = await client.hgetall(keys.usage(ENV))
    return sum(int(v) for k, v in usage.items() if k.endswith(b":calls"))


async def load(gateways: list[Deployed], seconds: float | None = None, clients: int = 16,
               stop: asyncio.Event | None = None) -> Counter:
    """``clients`` loops of GETs of the database route, spread over ``gateways``, for
    ``seconds`` or until ``stop``: statuses counted ("error": the connection failed, as when
    an instance is killed under it)."""
    seen: Counter = Counter()
    end = time.monotonic() + (seconds or 3600)

    async def one(s: aiohttp.ClientSession, gw: Deployed) -> None:
        url = gw.route("database") + "x"
        while time.monotonic() < end and not (stop and stop.is_set()):
            try:
                async with s.get(url, headers={"X-CloudBase-Env": ENV}) as r:
                    await r.read()
                    seen[r.status] += 1
            except (TimeoutError, aiohttp.ClientError):
                seen["error"] += 1
                if gw.proc.poll() is not None:
                    return

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as s:
        await asyncio.gather(*(one(s, gateways[i % len(gateways)]) for i in range(clients)))
    return seen


async def metric(gw: Deployed, name: str, **labels: str) -> float:
    """The sum of ``gw``'s /metrics samples of ``name`` that carry ``labels``."""
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{gw.admin}/metrics") as r:
        text = await r.text()
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


async def lease_calls(gw: Deployed) -> float:
    return await metric(gw, "quotagate_hot_lease_calls_total")


async def test_hard_stop_is_exact_through_leases_and_a_kill(tmp_path: Path):
    """Two instances decide the environment from leases; one is killed (-9) with its lease
    out; the other goes on to the hard stop; the killed one starts again and its journal gives
    back what its lease held unused. In the end exactly the quota is charged, and every
    request answered 200 is in it (those in flight at the kill may be too: admitted, then
    cut)."""
    quota = 6_000
    async with two_instances(tmp_path, calls=quota, qps=100_000) as (gws, client, restart):
        # Under load, once both instances hold a lease, one is killed (-9): its lease stays
        # out, its journal on disk; the other goes on alone until the hard stop refuses it.
        stop = asyncio.Event()

        async def until_refused() -> None:
            while True:
                await asyncio.sleep(0.5)
                if (await used_calls(client)) >= quota:
                    await asyncio.sleep(1.0)
                    stop.set()
                    return

        async def both_leasing() -> bool:
            fields = await client.hkeys(keys.hot(ENV))
            return sum(not f.startswith(b"x:") for f in fields) == 2

        running = asyncio.create_task(load(gws, stop=stop))
        await until(both_leasing, 20)
        assert await lease_calls(gws[0]) > 0 and await lease_calls(gws[1]) > 0
        gws[0].proc.kill()
        gws[0].proc.wait()
        gws[0].log.close()
        watcher = asyncio.create_task(until_refused())
        first = await running
        await watcher
        assert first[200] > 0 and first[429] > 0, first
        # The killed lease expired and was charged whole: fewer than the quota answered yet.
        answered = first[200]
        assert answered <= quota
        # Restarted: its journal is read, what its lease did not use goes back, once.
        await restart(0)
        stop.clear()
        watcher = asyncio.create_task(until_refused())
        third = await load(gws, stop=stop)
        await watcher
        answered += third[200]
        # Every lease ended (a clean stop of both), then the store's count is final.
        for gw in gws:
            gw.stop()
        charged = await used_calls(client)
        cut = first["error"]  # in flight at the kill: perhaps admitted, never answered
        assert charged == quota, (charged, answered, first, third)
        assert quota - cut <= answered <= quota, (answered, cut, first, third)
        assert await client.hlen(keys.hot(ENV)) == 0


async def test_qps_limit_holds_across_two_leasing_instances(tmp_path: Path):
    """Offered about three times the limit through two instances for 5 s: the admitted rate
    over the run stays within the limit (+2 %, plus the store's burst tolerance once), the
    seconds after the leases are taken reach it, and both instances admit."""
    limit = 400
    async with two_instances(tmp_path, calls=10_000_000, qps=limit) as (gws, _client, _):
        per: list[Counter] = [Counter(), Counter()]
        start = time.monotonic()

        async def count(i: int) -> None:
            gw = gws[i]
            url = gw.route("database") + "x"
            async with aiohttp.ClientSession() as s:
                async def one() -> None:
                    while time.monotonic() - start < 5.0:
                        async with s.get(url, headers={"X-CloudBase-Env": ENV}) as r:
                            await r.read()
                            if r.status == 200:
                                per[i][int(time.monotonic() - start)] += 1
                await asyncio.gather(*(one() for _ in range(8)))

        await asyncio.gather(count(0), count(1))
        elapsed = time.monotonic() - start
        assert await lease_calls(gws[0]) > 0 and await lease_calls(gws[1]) > 0
        # Every admission of the run lies between `start` and now, whenever its answer was
        # read (a busy client reads some late, into the next second): the bound over the run.
        admitted = sum(per[0].values()) + sum(per[1].values())
        assert admitted <= elapsed * limit * 1.02 + limit * 0.1 + 10, (per, elapsed)
        steady = sum(per[0][s] + per[1][s] for s in (1, 2, 3, 4))
        assert steady >= 4 * limit * 0.7, (per,)  # the limit is reached, not starved
        assert sum(per[0].values()) > 0 and sum(per[1].values()) > 0
        for i, gw in enumerate(gws):
            # Decisions made in memory are counted as the store's are; only the store's are
            # timed (quotagate_decision_duration_seconds: "from asking the store").
            admitted = await metric(gw, "quotagate_decisions_total", result="admitted")
            refused = await metric(gw, "quotagate_decisions_total", result="refused",
                                   reason="qps-exceeded")
            timed = await metric(gw, "quotagate_decision_duration_seconds_count")
            assert admitted == sum(per[i].values()), (i, admitted, per[i])
            assert refused > 0 and timed < (admitted + refused) / 2, (i, refused, timed)


async def test_a_cycle_boundary_crossed_with_leases_out(tmp_path: Path):
    """The store's clock (libfaketime) a few seconds before the environment's cycle ends, two
    instances leasing it under load: the hard stop is reached in the old cycle — exactly its
    quota charged to it — and after midnight the new cycle admits again, charged to the new
    cycle, exactly its quota; every admission counted once, in one cycle."""
    import datetime as dt
    import zoneinfo

    from quotagate.common.calendar import day_number
    from tests.test_clock_steps import LIBFAKETIME, StoreClock

    assert LIBFAKETIME.exists(), "libfaketime is missing: scripts/faketime installs it"
    tz = zoneinfo.ZoneInfo("Asia/Shanghai")
    year = dt.date.today().year + 1
    anchor, reset_day = dt.date(year, 1, 15), dt.date(year, 2, 15)
    reset = dt.datetime.combine(reset_day, dt.time(), tz).timestamp()
    clock = StoreClock(tmp_path)
    clock.step(int(reset - 120 - time.time()))  # started two minutes before the end
    quota = 400
    store = EmbeddedValkey(tmp_path / "valkey", port=free_port(), appendonly=False,
                           env=clock.env()).start()
    upstream, origin = start_upstream()
    client = aredis.Redis.from_url(store.url)
    gateways: list[Deployed] = []
    try:
        for i in range(2):
            directory = tmp_path / f"gw{i}"
            directory.mkdir()
            settings = shipped_config(directory, origin, hot_rate=HOT_RATE, access_log=False,
                                      store={"url": store.url, "timeout_ms": 2000})
            (directory / "environments.yaml").write_text(yaml.safe_dump({"environments": {
                ENV: {"plan": "standard", "anchor": anchor.isoformat(),
                      "expires": f"{year + 1}-01-15",
                      "limits": {"calls": quota, "qps": 100_000}}}}))
            gateways.append(await serve(directory, settings))
        clock.step(int(reset - 4 - (time.time() + clock.offset)))  # now 4 s before the end
        old, new = f"{day_number(anchor)}:calls".encode(), \
            f"{day_number(reset_day)}:calls".encode()
        stop = asyncio.Event()

        async def until_new_cycle_spent() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                if int(await client.hget(keys.usage(ENV), new) or 0) >= quota:
                    await asyncio.sleep(1.0)
                    break
            stop.set()

        watcher = asyncio.create_task(until_new_cycle_spent())
        seen = await load(gateways, stop=stop)
        await watcher
        assert await lease_calls(gateways[0]) > 0 and await lease_calls(gateways[1]) > 0
        for gw in gateways:
            gw.stop()
        usage = await client.hgetall(keys.usage(ENV))
        assert int(usage.get(old, 0)) == quota, (usage, seen)
        assert int(usage.get(new, 0)) == quota, (usage, seen)
        assert seen[200] == 2 * quota, seen
        assert seen[429] > 0, seen
        assert await client.hlen(keys.hot(ENV)) == 0
    finally:
        for gw in gateways:
            if gw.proc.poll() is None:
                gw.stop()
        await client.aclose()
        upstream.kill()
        store.stop()
