"""The load generator: wrk's command line, its runs (measured, or an unmeasured warm-up
stopped with SIGINT) and the parsing of its ``--latency`` output."""

from __future__ import annotations

import argparse
import math
import re
import signal
import subprocess
from dataclasses import dataclass

from .arm import Arm
from .common import PATH

_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _to_ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"unparsed wrk latency {text!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


@dataclass
class WrkResult:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    non2xx: int
    socket_errors: int


def parse_wrk(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+(?:us|ms|s|m))\s*$", out, re.M))
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return WrkResult(
        rps=rps,
        requests=requests,
        p50_ms=_to_ms(lat["50"]),
        p99_ms=_to_ms(lat["99"]),
        non2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=sum(int(g) for g in sock.groups()) if sock else 0,
    )


def wrk_command(args: argparse.Namespace, port: int, seconds: int, extra: list[str],
                path: str = PATH) -> list[str]:
    return ["taskset", "-c", args.client_cpu, "wrk", "-t1", f"-c{args.connections}",
            f"-d{seconds}s", "--latency", *extra, f"http://127.0.0.1:{port}{path}"]


def run_wrk(cmd: list[str], seconds: int) -> str:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=seconds + 60)
    except BaseException:  # timeout, Ctrl-C, SIGTERM: never leave wrk behind
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    return out


def warm_up(args: argparse.Namespace, arm: Arm, seconds: float) -> None:
    """Load the arm for `seconds`, unmeasured. wrk takes whole seconds only, so it runs with
    -d<ceil>s and is stopped with SIGINT (it then exits cleanly within 0.1 s)."""
    if seconds <= 0:
        return
    cmd = wrk_command(args, arm.port, math.ceil(seconds), arm.wrk_args, arm.path)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        try:
            proc.wait(timeout=seconds)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=10)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
