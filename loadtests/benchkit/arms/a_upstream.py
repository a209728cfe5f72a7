"""A: wrk -> the demo upstream directly (the harness's ceiling)."""

from __future__ import annotations

from ..arm import Arm, ArmDef, Context


def start(ctx: Context) -> Arm:
    args = ctx.args
    up_desc = f"demo upstream, {args.upstream_procs} uvloop process(es) on cpu {args.aux_cpus}"
    return Arm("A", ctx.up_port, None, ctx.header, f"wrk -> {up_desc}")


ARM = ArmDef("A", start)
