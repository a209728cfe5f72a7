"""Bandwidth shaping across instances, measured where the client is.

    .venv/bin/python loadtests/bandwidth_bench.py [--seconds 10] [--json out.json]

Starts a Valkey (TCP), the demo upstream and two ``quotagate serve`` processes as shipped
(config/, this store) sharing it. Environment ``bw-test`` has the gateway version ``test``
(1 Mbps = 125,000 B/s); ``bw-free`` has none. Against both instances at once, for
``--seconds`` (after 2 s of warm-up): ``bw-test`` runs large downloads (300 KB each, two
loops per instance), SSE streams (padded events, one loop per instance) and a realtime
WebSocket (one watch of padded events every 5 ms, per instance); ``bw-free`` downloads at
20 MB/s (one loop per instance, read no faster: a client that wants that much), from a
process of its own, to show that it gets all of it. Every body chunk and frame of ``bw-test`` is
timed at the client.

Reports, for ``bw-test``: the bytes of every 1 s window (sliding by 0.1 s) against 125,000
(the worst deviation), the mean rate; for ``bw-free`` its rate; and the store calls the
shaping made per MB (``quotagate_bandwidth_leases_total`` of both instances).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import zoneinfo
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from quotagate.demo.staging import stage_shipped, wait_ready
from quotagate.limiter.embedded import EmbeddedValkey, free_port

ROOT = Path(__file__).resolve().parents[1]
DOWNLOAD = 300_000
#: What the unshaped environment's client asks for (it reads no faster): 20 MB/s, 160 times
#: the shaped one's rate, without taking the machine's two cores from everything else.
FREE_RATE = 20_000_000
WARMUP_S = 2.0


def _environments(version: str) -> dict[str, Any]:
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    period = {"anchor": (today - dt.timedelta(days=3)).isoformat(),
              "expires": (today + dt.timedelta(days=360)).isoformat()}
    return {
        "bw-test": {"plan": "standard", **period, "overage": True,
                    "gateway": {"version": version, "purchased": period["anchor"], "months": 1,
                                "auto_renew": True}},
        "bw-free": {"plan": "standard", **period, "overage": True},
    }


class Instance:
    def __init__(self, directory: Path, store_url: str, upstream: str, version: str):
        gateway = stage_shipped(directory, upstream, _environments(version),
                                store={"url": store_url}, access_log=False)
        self.port, self.admin = (int(gateway[k].rsplit(":", 1)[1])
                                 for k in ("listen", "admin_listen"))
        self.log = open(directory / "serve.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "quotagate", "serve", "--config",
             str(directory / "gateway.yaml")], stdout=subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": "bench"})

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def leases(self) -> float:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.admin}/metrics") as r:
            text = await r.text()
        found = re.search(r'^quotagate_bandwidth_leases_total\{result="leased"\} (\S+)$',
                          text, re.M)
        return float(found.group(1)) if found else 0.0

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def _loop(session: aiohttp.ClientSession, url: str, env: str, until: float,
                seen: list[tuple[float, int]], headers: dict[str, str] | None = None) -> None:
    while time.monotonic() < until:
        async with session.get(url, headers={"X-CloudBase-Env": env, **(headers or {})}) as r:
            if r.status != 200:
                raise AssertionError(f"{env} {url}: {r.status} {await r.text()}")
            async for chunk in r.content.iter_any():
                seen.append((time.monotonic(), len(chunk)))
                if time.monotonic() >= until:
                    return


async def _watch(session: aiohttp.ClientSession, base: str, env: str, until: float,
                 seen: list[tuple[float, int]]) -> None:
    """One realtime socket with one watch whose events arrive as fast as they may go."""
    url = base.replace("http://", "ws://") + "/?event_ms=5&pad=1000"
    async with session.ws_connect(url, headers={"X-CloudBase-Env": env},
                                  protocols=("watch.v1",)) as ws:
        await ws.send_str(json.dumps({"watchId": "w1", "requestId": "r1",
                                      "msgType": "INIT_WATCH",
                                      "msgData": {"collName": "todos", "query": "{}"}}))
        while time.monotonic() < until:
            try:
                msg = await ws.receive(timeout=max(0.01, until - time.monotonic()))
            except TimeoutError:
                return
            if msg.type is not aiohttp.WSMsgType.TEXT:
                raise AssertionError(f"{env}: the socket ended: {msg}")
            frame = json.loads(msg.data)
            if frame["msgType"] == "ERROR":
                raise AssertionError(f"{env}: {frame}")
            seen.append((time.monotonic(), len(msg.data)))


async def measure(seconds: float, instances: list[Instance], rate: int) -> dict[str, Any]:
    shaped: list[tuple[float, int]] = []
    leases_before = [await i.leases() for i in instances]
    start = time.monotonic()
    until = start + WARMUP_S + seconds
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        jobs = []
        for inst in instances:
            big = f"{inst.base}/storage/bw/bytes?n={DOWNLOAD}"
            sse = f"{inst.base}/ai/chat?events=100000&delay_ms=5&pad=1000"
            jobs += [_loop(session, big, "bw-test", until, shaped),
                     _loop(session, big, "bw-test", until, shaped),
                     _loop(session, sse, "bw-test", until, shaped,
                           {"Accept": "text/event-stream"}),
                     _watch(session, inst.base, "bw-test", until, shaped),
                     ]
        # The unshaped environment's downloads run in a process of their own: at hundreds of
        # MB/s in this one they would delay the timing of the shaped bytes' arrival.
        other = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--free-load", *(i.base for i in instances),
            "--until", str(time.time() + (until - time.monotonic())),
            "--from", str(time.time() + (start + WARMUP_S - time.monotonic())),
            stdout=asyncio.subprocess.PIPE)
        await asyncio.gather(*jobs)
        out, _ = await other.communicate()
        free_rate = json.loads(out)["rate"]
    leased = sum([await i.leases() for i in instances]) - sum(leases_before)
    t0, t1 = start + WARMUP_S, until
    windows = []
    w = t0
    while w + 1.0 <= t1 + 1e-9:
        windows.append(sum(n for t, n in shaped if w <= t < w + 1.0))
        w += 0.1
    shaped_bytes = sum(n for t, n in shaped if t0 <= t < t1)
    total_shaped = sum(n for _, n in shaped)
    worst = max(windows, key=lambda b: abs(b - rate))
    return {
        "seconds": seconds, "warmup_s": WARMUP_S, "rate": rate, "windows": len(windows),
        "by_window": windows,
        "by_100ms": [sum(n for t, n in shaped if t0 + k / 10 <= t < t0 + (k + 1) / 10)
                     for k in range(int((t1 - t0) * 10))],
        "window_min": min(windows), "window_max": max(windows),
        "worst_deviation": (worst - rate) / rate,
        "mean_rate": shaped_bytes / (t1 - t0),
        "free_rate": free_rate,
        "leases": leased, "shaped_mb": total_shaped / 1e6,
        "leases_per_mb": leased / (total_shaped / 1e6) if total_shaped else 0.0,
    }


async def run(seconds: float, version: str) -> dict[str, Any]:
    plans = yaml.safe_load((ROOT / "config" / "plans.yaml").read_text())
    rate = plans["gateway_versions"][version]["mbps"] * 125_000
    tmp = Path(tempfile.mkdtemp(prefix="qg-bw-"))
    valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False)
    valkey.start()
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-m", "quotagate.demo.upstream", "--port",
                                 str(up_port)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    instances: list[Instance] = []
    try:
        instances = [Instance(tmp / f"gw{n}", valkey.url, f"http://127.0.0.1:{up_port}",
                              version) for n in range(2)]
        for inst in instances:
            await wait_ready(inst.admin, timeout=60)
        return await measure(seconds, instances, rate)
    finally:
        for inst in instances:
            inst.stop()
        upstream.terminate()
        upstream.wait(10)
        valkey.stop()


async def _paced_loop(session: aiohttp.ClientSession, url: str, until: float,
                      seen: list[tuple[float, int]]) -> None:
    """Downloads read at FREE_RATE / 2 at most (a client that wants that much)."""
    began, got = time.monotonic(), 0
    while time.monotonic() < until:
        async with session.get(url, headers={"X-CloudBase-Env": "bw-free"}) as r:
            assert r.status == 200, r.status
            async for chunk in r.content.iter_chunked(65536):
                now = time.monotonic()
                seen.append((now, len(chunk)))
                got += len(chunk)
                if now >= until:
                    return
                ahead = got / (FREE_RATE / 2) - (now - began)
                if ahead > 0:
                    await asyncio.sleep(ahead)


async def free_load(bases: list[str], since: float, until: float) -> float:
    """bw-free's downloads (one loop per instance, FREE_RATE in all) until ``until`` (wall
    clock); its rate from ``since``."""
    seen: list[tuple[float, int]] = []
    stop = time.monotonic() + (until - time.time())
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(_paced_loop(session, f"{b}/storage/bw/bytes?n=2000000", stop,
                                           seen) for b in bases))
    begin = time.monotonic() + (since - time.time())
    counted = sum(n for t, n in seen if t >= begin)
    return counted / max(stop - begin, 1e-9)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json")
    p.add_argument("--version", default="test", help="bw-test's gateway version (%(default)s)")
    p.add_argument("--free-load", nargs="+", help=argparse.SUPPRESS)
    p.add_argument("--until", type=float, help=argparse.SUPPRESS)
    p.add_argument("--from", dest="since", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.free_load:
        print(json.dumps({"rate": asyncio.run(free_load(args.free_load, args.since,
                                                        args.until))}))
        return 0
    result = asyncio.run(run(args.seconds, args.version))
    print(f"bw-test ({args.version}: {result['rate']:,} B/s), two instances, "
          f"{result['seconds']:.0f} s: "
          f"{result['windows']} 1-s windows from {result['window_min']:,} to "
          f"{result['window_max']:,} B (worst {result['worst_deviation']:+.2%}); mean "
          f"{result['mean_rate']:,.0f} B/s")
    print(f"bw-free (no version) meanwhile: {result['free_rate']:,.0f} B/s")
    print(f"store calls: {result['leases']:.0f} leases for {result['shaped_mb']:.2f} MB = "
          f"{result['leases_per_mb']:.1f} per MB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
