"""Paths, the benchmark's environments and routes, and the gateway configs (also used by
latency.py, limiter_cpu.py, rls_bench.py and store_cost.py)."""

from __future__ import annotations

import datetime as dt
import sys
import zoneinfo
from pathlib import Path

import yaml

from quotagate.limiter.embedded import free_port

LOADTESTS = Path(__file__).resolve().parents[1]
ROOT = LOADTESTS.parent
PLANS_FILE = ROOT / "config" / "plans.yaml"
PY = sys.executable
PATH = "/functions/bench"
ENV_OK = "bench-ok"
ENV_EMPTY = "bench-empty"
PLAIN_PATH = "/plain/bench"


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
