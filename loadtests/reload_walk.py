"""What a reload costs in memory work at N file-owned environments in ``environments_dir``
(issue 24): the reload's preparation (``runtime._prepare_reload``: parse what changed, merge,
compare, snapshot what changed, digest) after one environment in one file changed, a load
with nothing changed, and the watcher's stat of every file. Off the event loop, in the
reload's thread; no store.

    .venv/bin/python loadtests/reload_walk.py [--envs 100000] [--per-file 1000] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import scale

from quotagate.control.runtime import _mtimes, _prepare_reload
from quotagate.demo.staging import stage_shipped
from quotagate.settings import load_config


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", type=int, default=100_000)
    p.add_argument("--per-file", type=int, default=1000)
    p.add_argument("--runs", type=int, default=5)
    args = p.parse_args()
    d = Path(tempfile.mkdtemp(prefix="qg-walk-"))
    try:
        stage_shipped(d, "http://127.0.0.1:9", access_log=False)
        changed, target = scale.build_dir(d, args.envs, args.per_file)
        back = time.time() - 60  # (settled: not compared by content at the next load)
        for path in [*(d / "environments.d").iterdir(), d / "environments.yaml"]:
            os.utime(path, (back, back))
        config = load_config(d / "gateway.yaml")
        times: dict[str, list[float]] = {"reload, one file changed": [],
                                         "load, nothing changed": [], "stat every file": []}
        for i in range(args.runs):
            target.write_text(changed.read_text().replace(
                f"qps: {scale.QPS + 1}", f"qps: {scale.QPS + 2 + i}"))
            os.utime(target, (back + i, back + i))
            t = time.perf_counter()
            config, change = _prepare_reload(d / "gateway.yaml", config)
            times["reload, one file changed"].append(time.perf_counter() - t)
            assert len(change.blobs) == 1, len(change.blobs)
            t = time.perf_counter()
            load_config(d / "gateway.yaml", config.sources)
            times["load, nothing changed"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _mtimes(config)
            times["stat every file"].append(time.perf_counter() - t)
        print(f"{args.envs:,} environments, {args.per_file:,} a file:")
        for name, values in times.items():
            print(f"  {name:26} median {statistics.median(values) * 1e3:6.1f} ms "
                  f"({', '.join(f'{v * 1e3:.1f}' for v in values)})")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
