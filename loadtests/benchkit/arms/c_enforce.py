"""C (BENCH.md's C): wrk -> quotagate, enforcement: enforce, never refusing -> upstream; one
script call per request, on a route without concurrency slots or GBs metering."""

from __future__ import annotations

from ..arm import Arm, ArmDef, Context
from ..common import ENV_OK, PLAIN_PATH
from ._gateway import gateway


def start(ctx: Context) -> Arm:
    port, pid = gateway(ctx, "enforce")
    return Arm("C", port, pid, ctx.header,
               f"quotagate, enforcement: enforce, env {ENV_OK} (enterprise, "
               "qps 1e7, calls 1e12: never refused), Valkey on TCP, on "
               f"{PLAIN_PATH}: no concurrency slot, no GBs metering",
               PLAIN_PATH)


ARM = ArmDef("C", start)
