"""The store's clock steps (NTP, a failover to a node whose clock differs) under traffic, with
`quotagate serve` as shipped: the store runs under libfaketime (scripts/faketime), so the
whole deployment — which takes every notion of now from the store — lives through the step.
Real clock otherwise: no date is fixed, none depends on the day the test runs.

A step costs at most one slot of shaping and one interval of QPS, never its own length."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from quotagate.limiter.embedded import EmbeddedValkey, free_port
from tests.deployed import Deployed, days, live_env, serve, shipped_config, upstream_process

pytestmark = pytest.mark.deployed

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
#: 1 Mbps, gateway version `test`.
RATE = 125_000
#: However busy the machine, a response the step does not hold ends within this long (the
#: steps below are 20 s, 30 s and an hour).
PROMPT_S = 8.0


class StoreClock:
    """The faked store's offset from the real clock, in seconds (libfaketime reads the file at
    each call: FAKETIME_NO_CACHE)."""

    def __init__(self, directory: Path):
        self.file = directory / "faketime"
        self.offset = 0
        self.file.write_text("+0\n")

    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME_TIMESTAMP_FILE": str(self.file),
                "FAKETIME_NO_CACHE": "1", "DONT_FAKE_MONOTONIC": "1"}

    def step(self, seconds: int) -> None:
        self.offset += seconds
        self.file.write_text(f"{self.offset:+d}\n")


@pytest.fixture
def store_clock(tmp_path: Path) -> StoreClock:
    assert LIBFAKETIME.exists(), "libfaketime is missing: scripts/faketime installs it"
    return StoreClock(tmp_path)


@pytest.fixture
def upstream() -> Iterator[str]:
    with upstream_process() as origin:
        yield origin


@pytest.fixture
async def deployment(tmp_path: Path, store_clock: StoreClock, upstream: str
                     ) -> AsyncIterator[Deployed]:
    store = EmbeddedValkey(tmp_path / "valkey", port=free_port(), env=store_clock.env()).start()
    config = shipped_config(tmp_path, upstream, store={"url": store.url, "timeout_ms": 500})
    versioned = {**live_env(), "gateway": {"version": "test", "purchased": days(-3),
                                           "months": 1}}
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        "steps-bw": versioned, "steps-qps": live_env(qps=5)}}))
    gateway = await serve(tmp_path, config)
    try:
        yield gateway
    finally:
        log = gateway.stop()
        store.stop()
        assert "Traceback" not in log, log[-3000:]


async def download(gw: Deployed, n: int) -> float:
    """Seconds one `steps-bw` download of ``n`` bytes takes (shaped at RATE)."""
    started = time.monotonic()
    async with aiohttp.ClientSession() as s, s.get(
            gw.route("storage") + f"x/bytes?n={n}", headers={"X-CloudBase-Env": "steps-bw"},
            timeout=aiohttp.ClientTimeout(total=120)) as r:
        body = await r.read()
    assert (r.status, len(body)) == (200, n)
    return time.monotonic() - started


async def test_a_forward_step_costs_shaped_responses_one_slot(deployment: Deployed,
                                                             store_clock: StoreClock):
    """Before the fix, a +20 s step held the next shaped response for 20 s (the instance kept
    the old store-to-local offset for 10 s and mapped the new slot 20 s into the future), and
    after +1 h none completed."""
    gw = deployment
    # Paced before the step: 125,000 B at 125,000 B/s (the first piece goes at once).
    assert await download(gw, RATE) >= 0.9
    for step in (20, 3600):
        store_clock.step(step)
        took = [await download(gw, 12_500) for _ in range(3)]
        assert max(took) < PROMPT_S, (step, took)
    # Still shaped to the version after the steps, not let through unpaced.
    assert await download(gw, RATE) >= 0.9


async def test_a_backward_step_refuses_no_recent_traffic(deployment: Deployed,
                                                        store_clock: StoreClock):
    """Before the fix, after a -30 s step every environment with a request just before got
    429 qps-exceeded for 30 s (the stored GCRA TAT was 30 s ahead of the new TIME), and a
    shaped response waited for the timeline 30 s ahead."""
    gw = deployment
    url = gw.route("function") + "f"
    # 5 QPS: a burst at once fills the TAT (some refused: that is the limit).
    assert 200 in await gw.get(url, "steps-qps", 10, concurrent=True)
    assert await download(gw, 25_000) < PROMPT_S
    store_clock.step(-30)
    stepped = time.monotonic()
    statuses: list[int] = []
    while time.monotonic() - stepped < 3:  # a request every 0.4 s, below the limit
        statuses += await gw.get(url, "steps-qps")
        await asyncio.sleep(0.4)
    # Below the limit after the step: every one passes (the step is the clock's, not theirs).
    assert statuses == [200] * len(statuses), statuses
    took = await download(gw, 12_500)
    assert took < PROMPT_S, took


async def test_capacity_is_billed_for_a_day_no_instance_ran(tmp_path: Path,
                                                           store_clock: StoreClock,
                                                           upstream: str):
    """The last size reported is carried into each day's bill by the scheduler's rounds; a
    day on which no instance ran (here: the gateway stopped, the store's clock two days on, a
    gateway started again) is billed the size kept, once, like any other day."""
    store = EmbeddedValkey(tmp_path / "valkey", port=free_port(), env=store_clock.env()).start()
    config = shipped_config(tmp_path, upstream, store={"url": store.url, "timeout_ms": 500},
                            lifecycle_interval_ms=300)
    envs = {"steps-cap": {**live_env(capacity_gb=1), "overage": True}}
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": envs}))

    def capacity_lines(gw: Deployed, day: dt.date) -> list[dict]:
        return [line for line in gw.json("bill", "--date", day.isoformat())["lines"]
                if line["env"] == "steps-cap" and line["meter"] == "capacity_bytes"]

    gw = await serve(tmp_path, config)
    try:
        reported = dt.date.fromisoformat(gw.json("env", "usage", "steps-cap")["today"])
        status, body = await gw.admin_api("POST", "/usage", {"records": [{
            "id": "size-1", "env": "steps-cap", "meter": "capacity_bytes",
            "amount": 3 * 2**30, "at": dt.datetime.now(dt.UTC).isoformat()}]})
        assert status == 200 and body["counted"] == 1, body
        [first] = capacity_lines(gw, reported)  # 2 GB over the plan's 1 GB
        assert first["amount"] == "0.20", first
    finally:
        assert "Traceback" not in gw.stop()
    store_clock.step(2 * 86_400)  # nobody runs for a whole day
    gw = await serve(tmp_path, config)
    try:
        today = dt.date.fromisoformat(gw.json("env", "usage", "steps-cap")["today"])
        assert today == reported + dt.timedelta(days=2)
        for _ in range(100):  # the first round carries the size into today
            if capacity_lines(gw, today):
                break
            await asyncio.sleep(0.1)
        assert [line["amount"] for line in capacity_lines(gw, today)] == ["0.20"]
        skipped = capacity_lines(gw, reported + dt.timedelta(days=1))
        assert [(line["quantity"], line["amount"]) for line in skipped] == [
            (first["quantity"], "0.20")], skipped
        assert capacity_lines(gw, reported) == [first]  # billed once, unchanged
    finally:
        log = gw.stop()
        store.stop()
        assert "Traceback" not in log, log[-3000:]


async def test_anchor_31_resets_on_the_last_day_of_february(tmp_path: Path,
                                                           store_clock: StoreClock,
                                                           upstream: str):
    """A plan bought on the 31st resets on the last day of a month without one (SPEC §4): the
    store's clock is put ten seconds before 00:00 (Asia/Shanghai) of the last day of next
    February, a hard stop is reached, and at midnight the new cycle admits again - through
    `quotagate serve`, every date taken from the store."""
    import zoneinfo

    tz = zoneinfo.ZoneInfo("Asia/Shanghai")
    year = dt.date.today().year + 1
    last = dt.date(year, 3, 1) - dt.timedelta(days=1)  # 28 or 29
    reset = dt.datetime.combine(last, dt.time(), tz)
    store_clock.step(int((reset - dt.timedelta(seconds=10)).timestamp() - time.time()))
    store = EmbeddedValkey(tmp_path / "valkey", port=free_port(), env=store_clock.env()).start()
    config = shipped_config(tmp_path, upstream, store={"url": store.url, "timeout_ms": 500})
    (tmp_path / "environments.yaml").write_text(yaml.safe_dump({"environments": {
        "steps-31": {"plan": "standard", "anchor": f"{year}-01-31",
                     "expires": f"{year + 1}-01-31", "limits": {"calls": 3}}}}))
    gw = await serve(tmp_path, config)
    try:
        url = gw.route("function") + "f"
        assert await gw.get(url, "steps-31", 4) == [200, 200, 200, 429]  # the cycle's 3
        # Ten seconds later it is 00:00 on the last day of February: a new cycle (20 s at most).
        for _ in range(200):
            if await gw.get(url, "steps-31") == [200]:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("no new cycle at the end of February")
        usage = gw.json("env", "usage", "steps-31")
        assert usage["cycle"]["start"] == last.isoformat(), usage["cycle"]
        assert usage["meters"]["calls"]["used"] == 1
    finally:
        log = gw.stop()
        store.stop()
        assert "Traceback" not in log, log[-3000:]
