"""The Locust scenarios, briefly: every tenant's outcome checked against its limits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_locust_scenarios_hold_the_limits(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(ROOT / "loadtests" / "run_locust.py"), "--time",
                          "8s", "--users", "24", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert len(checks) == 12 and all(c["ok"] for c in checks)
    for name in ("locust.html", "locust_stats.csv", "admitted_refused.png", "outcomes.json"):
        assert (tmp_path / name).stat().st_size > 0, name
