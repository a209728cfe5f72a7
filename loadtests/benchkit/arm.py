"""What an arm is: ``ArmDef``, which each module of ``arms/`` defines (its name and how to
start it), and ``Arm``, the running arm that wrk loads and the report describes."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .common import PATH
from .procs import Children


@dataclass
class Arm:
    name: str
    port: int
    pid: int | None  # the proxy process whose CPU is measured (None for A)
    wrk_args: list[str]
    description: str
    path: str = PATH


@dataclass
class Context:
    """What every arm's start gets: the processes and files the bench set up before the arms."""

    args: argparse.Namespace  # the command line (--proxy-cpu, --d-limit, ...)
    children: Children  # start the arm's processes with children.start (stopped on exit)
    tmp: Path  # the run's temporary directory (configs, logs)
    up_port: int  # the demo upstream
    store_url: str  # the Valkey every arm shares
    configs: dict[str, Path]  # the gateway configs of write_configs: "off" and "enforce"
    header: list[str]  # wrk's -H X-CloudBase-Env: bench-ok
    #: processes several arms share, started by the first that needs them: name -> (port, pid)
    shared: dict[str, tuple[int, int]] = field(default_factory=dict)


def _available() -> str | None:
    return None


@dataclass(frozen=True)
class ArmDef:
    """One arm, as its module of ``arms/`` defines it (registered in ``arms/__init__.py``)."""

    #: its name in --arms, in the report and in MEASURE_ORDER
    name: str
    #: start its processes (with ctx.children, pinned to ctx.args.proxy_cpu), wait until they
    #: answer (procs.wait_http), and return the running arm
    start: Callable[[Context], Arm]
    #: an --arms name that selects it with its siblings ("D": D-fixed, D-moving, D-sliding)
    group: str | None = None
    #: why it cannot run on this machine (a note printed when skipping it), or None
    unavailable: Callable[[], str | None] = _available
