"""The Locust scenarios: every tenant's outcome checked against its limits, on the runner's
own stack and against a deployment it did not start (``--host``, tenants from a file)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import yaml

from tests.deployed import live_env, served

ROOT = Path(__file__).resolve().parents[1]
RUNNER = [sys.executable, str(ROOT / "loadtests" / "run_locust.py")]


def test_locust_scenarios_hold_the_limits(tmp_path: Path) -> None:
    out = subprocess.run([*RUNNER, "--time", "8s", "--users", "24", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert len(checks) == 13 and all(c["ok"] for c in checks)
    for name in ("locust.html", "locust_stats.csv", "admitted_refused.png", "outcomes.json"):
        assert (tmp_path / name).stat().st_size > 0, name


async def test_locust_loads_a_deployment_it_did_not_start(tmp_path: Path) -> None:
    """``--host`` and ``--tenants``: `quotagate serve` as shipped, two tenants at QPS 8 and 15
    and a realtime cap of 3, told to the runner by a file. A file that understates a limit
    (QPS 3 for the tenant that has 8) fails the run: the checks can fail."""
    envs = {"lt-a": live_env(qps=8), "lt-b": live_env(qps=15),
            "lt-live": live_env(realtime=3, qps=1000)}
    async with served(tmp_path, envs) as (gw, _):
        def run(tenants: dict, out: Path) -> subprocess.CompletedProcess[str]:
            path = tmp_path / f"{out.name}.yaml"
            path.write_text(yaml.safe_dump(tenants))
            return subprocess.run([*RUNNER, "--host", gw.base, "--tenants", str(path),
                                   "--time", "6s", "--users", "6", "--out", str(out)],
                                  capture_output=True, text=True, timeout=120)

        told = {"qps": {"lt-a": 8, "lt-b": 15}, "live": {"env": "lt-live", "cap": 3}}
        good = await asyncio.to_thread(run, told, tmp_path / "good")
        assert good.returncode == 0, good.stdout + good.stderr
        checks = json.loads((tmp_path / "good" / "checks.json").read_text())
        names = [c["check"] for c in checks]
        assert names == ["lt-a per second", "lt-a over the run", "lt-b per second",
                         "lt-b over the run", "watches held by the clients at the cap",
                         "no errors"], names
        outcomes = json.loads((tmp_path / "good" / "outcomes.json").read_text())
        refused = {row["tenant"] for row in outcomes if row["outcome"] == "refused"}
        assert "lt-a" in refused  # offered above its limit
        watch_refused = {row["tenant"] for row in outcomes if row["outcome"] == "watch-refused"}
        assert watch_refused == {"lt-live"}  # watches past the cap of 3

        understated = {**told, "qps": {"lt-a": 3, "lt-b": 15}}
        bad = await asyncio.to_thread(run, understated, tmp_path / "bad")
        assert bad.returncode == 1, bad.stdout + bad.stderr
        assert "FAIL lt-a per second" in bad.stdout, bad.stdout

    # A bad tenants file: a clear error, nothing run.
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("qps: {Not_An_Env: 5}\n")
    res = subprocess.run([*RUNNER, "--host", "http://127.0.0.1:9", "--tenants", str(wrong)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode != 0 and "not environment ids: 'Not_An_Env'" in res.stderr, res.stderr
