"""B: wrk -> quotagate with enforcement: off -> upstream (the proxy path alone)."""

from __future__ import annotations

from ..arm import Arm, ArmDef, Context
from ._gateway import gateway


def start(ctx: Context) -> Arm:
    port, pid = gateway(ctx, "off")
    return Arm("B", port, pid, ctx.header,
               "quotagate, enforcement: off (no store calls) -> upstream")


ARM = ArmDef("B", start)
