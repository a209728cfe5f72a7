"""Ccold: C with hot environments off (``hot_rate: 0``): every request decided by the store,
one script call each, as before leases existed."""

from __future__ import annotations

from ..arm import Arm, ArmDef, Context
from ..common import ENV_OK, PLAIN_PATH
from ._gateway import gateway


def start(ctx: Context) -> Arm:
    port, pid = gateway(ctx, "cold")
    return Arm("Ccold", port, pid, ctx.header,
               f"as C, hot_rate 0: every request of {ENV_OK} decided by the store (one "
               "script call each)", PLAIN_PATH)


ARM = ArmDef("Ccold", start)
