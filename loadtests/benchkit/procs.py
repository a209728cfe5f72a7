"""The benchmark's child processes, their readiness, and CPU accounting from /proc."""

from __future__ import annotations

import contextlib
import http.client
import os
import signal
import subprocess
import time
from pathlib import Path

from quotagate.limiter.embedded import EmbeddedValkey

from .common import PATH, ROOT


class Children:
    """Every process the benchmark starts; each in its own session so its whole group dies."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.valkey: EmbeddedValkey | None = None

    def start(self, name: str, argv: list[str], cpus: str | None) -> subprocess.Popen[bytes]:
        cmd = (["taskset", "-c", cpus] if cpus else []) + argv
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the child
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        log.close()
        self.procs.append((name, proc))
        return proc

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.logdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def check_alive(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} (pid {proc.pid}) exited with {proc.returncode}:\n"
                                   f"{self.log_tail(name)}")

    def stop_all(self) -> None:
        for _name, proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for _name, proc in reversed(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs.clear()
        if self.valkey is not None:
            self.valkey.stop()
            self.valkey = None


def wait_http(port: int, env: str | None, timeout: float, what: str, children: Children,
              path: str = PATH, every: float = 0.1) -> None:
    """Until GET ``path`` on the port answers 200 (the gateway has synced its environments),
    asked every ``every`` seconds."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        children.check_alive()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", path, headers={"X-CloudBase-Env": env} if env else {})
            resp = conn.getresponse()
            body = resp.read()
            conn.close()
            if resp.status == 200:
                return
            last = f"HTTP {resp.status} {body[:200]!r}"
        except OSError as exc:
            last = str(exc)
        time.sleep(every)
    raise RuntimeError(f"{what} on port {port} not ready after {timeout:.0f} s: {last}")


def tree_pids(root: int) -> list[int]:
    """root and all its descendants (nginx: master + worker)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_ticks(pids: list[int]) -> int:
    """utime + stime (clock ticks) of these processes, all threads, living and exited."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total


HAVE_SCHEDSTAT = os.path.exists("/proc/self/schedstat")


def cpu_ns(pids: list[int]) -> int:
    """On-CPU nanoseconds of these processes' living threads (/proc/<pid>/task/*/schedstat).

    Ticks (10 ms) are too coarse for 2 s slices (a 0.5 % step per slice); schedstat is exact,
    but forgets threads that exit, so the report cross-checks its totals against the ticks."""
    total = 0
    for pid in pids:
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (OSError, ValueError, IndexError):
                continue
    return total


def core_times() -> dict[str, tuple[int, int]]:
    """Per core: (busy, total) jiffies from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                name, *vals = line.split()
                nums = [int(v) for v in vals[:8]]
                idle = nums[3] + nums[4]
                out[name] = (sum(nums) - idle, sum(nums))
    return out
