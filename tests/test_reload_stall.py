"""A reload that keeps the loop busy is not a store outage (issue 24, item 3), through
``quotagate serve`` as shipped (store timeout 200 ms; fail-open, and fail-closed): an
environments.yaml of thousands of environments is reloaded (SIGHUP) three times under steady
traffic; parsing it holds the event loop for seconds, while the store's replies wait in the
socket. No request may pass undecided (no ``X-Quotagate-Bypass``,
``decisions_total{result="bypassed"}`` unchanged) and none may get a 503."""

from __future__ import annotations

import asyncio
import collections
import re
import signal
import time

import aiohttp
import pytest

from tests.deployed import days, served

pytestmark = pytest.mark.deployed

#: Environments in the reloaded file: parsing them holds the loop for seconds here (the
#: precondition below checks that it did; a faster machine would need more).
ENVIRONMENTS = 3000
CLIENTS = 16
RELOADS = 3


def environments_yaml(count: int) -> str:
    """Written as text (yaml.safe_dump of this many takes longer than the test may)."""
    anchor, expires = days(-3), days(300)
    lines = ["environments:",
             f"  busy: {{plan: standard, anchor: {anchor}, expires: {expires}, "
             "limits: {qps: 100000}}"]
    lines += [f"  tenant-{i:06d}: {{plan: standard, anchor: {anchor}, expires: {expires}, "
              f"limits: {{calls: {1000 + i}}}}}" for i in range(count)]
    return "\n".join(lines) + "\n"


async def bypassed_total(session: aiohttp.ClientSession, admin: int) -> float:
    async with session.get(f"http://127.0.0.1:{admin}/metrics") as r:
        text = await r.text()
    return sum(float(v) for v in re.findall(
        r'^quotagate_decisions_total\{[^}]*result="bypassed"[^}]*\} (\S+)$', text, re.M))


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_long_reload_bypasses_nothing_and_refuses_nothing(tmp_path, policy):
    envs = {"busy": {"plan": "standard", "anchor": days(-3), "expires": days(300),
                     "limits": {"qps": 100000}}}
    async with served(tmp_path, envs, store={"timeout_ms": 200}, reload_poll_ms=0,
                      on_store_failure=policy) as (deployed, _):
        url = deployed.route("function") + "f"
        statuses: collections.Counter[int] = collections.Counter()
        bypass_headers: list[str] = []
        slowest = [0.0]
        stop = asyncio.Event()

        async def client(s: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                started = time.monotonic()
                async with s.get(url, headers={"X-CloudBase-Env": "busy"}) as r:
                    await r.read()
                    statuses[r.status] += 1
                    if "X-Quotagate-Bypass" in r.headers:
                        bypass_headers.append(r.headers["X-Quotagate-Bypass"])
                slowest[0] = max(slowest[0], time.monotonic() - started)
                await asyncio.sleep(0.002)

        async with aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=CLIENTS)) as s:
            before = await bypassed_total(s, deployed.admin)
            clients = [asyncio.create_task(client(s)) for _ in range(CLIENTS)]
            await asyncio.sleep(1.5)
            assert statuses and set(statuses) == {200}, statuses  # healthy to begin with
            took = []
            for n in range(RELOADS):  # (each file a little different: each a real change)
                (tmp_path / "environments.yaml").write_text(
                    environments_yaml(ENVIRONMENTS + n))
                reloaded = time.monotonic()
                deployed.proc.send_signal(signal.SIGHUP)
                deadline = time.monotonic() + 30
                while (deployed.log_text().count("config reloaded (SIGHUP)") <= n
                       and time.monotonic() < deadline):
                    await asyncio.sleep(0.2)
                took.append(round(time.monotonic() - reloaded, 1))
                await asyncio.sleep(0.5)
            await asyncio.sleep(1.5)  # and the traffic after it
            stop.set()
            await asyncio.gather(*clients)
            after = await bypassed_total(s, deployed.admin)
        print(f"\nfail-{policy}: {RELOADS} reloads of {ENVIRONMENTS} environments: {took} s, "
              f"slowest request {slowest[0]:.2f} s; statuses {dict(statuses)}; "
              f"bypassed: {after - before:.0f} (headers {collections.Counter(bypass_headers)})")
        assert deployed.log_text().count("config reloaded (SIGHUP)") == RELOADS, "unfinished"
        # The precondition: the reload did hold the loop (far) longer than the store timeout.
        assert slowest[0] > 1.0, "no stall of the loop to test: scale ENVIRONMENTS up"
        assert not bypass_headers and after == before, (bypass_headers, before, after)
        assert set(statuses) == {200}, statuses  # no 503 (nor anything else)
