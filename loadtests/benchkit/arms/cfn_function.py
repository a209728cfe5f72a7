"""Cfn: as C on a function route with its defaults (a concurrency slot per invocation, GBs
metering); Cfn/C is their cost."""

from __future__ import annotations

from ..arm import Arm, ArmDef, Context
from ..common import PATH
from ._gateway import gateway


def start(ctx: Context) -> Arm:
    port, pid = gateway(ctx, "enforce")
    return Arm("Cfn", port, pid, ctx.header,
               f"as C on {PATH}: a function route with a concurrency slot "
               "and GBs metering")


ARM = ArmDef("Cfn", start)
