"""D-fixed, D-moving, D-sliding (--arms D for the three): wrk -> an aiohttp passthrough
(limits_proxy.py) deciding with the `limits` library's async Redis strategies against the same
Valkey -> upstream."""

from __future__ import annotations

import functools

from quotagate.limiter.embedded import free_port

from ..arm import Arm, ArmDef, Context
from ..common import ENV_OK, LOADTESTS, PY
from ..procs import wait_http

D_STRATEGIES = ("fixed", "moving", "sliding")


def start(ctx: Context, strategy: str) -> Arm:
    args = ctx.args
    name = f"D-{strategy}"
    port = free_port()
    host_port = ctx.store_url.removeprefix("redis://").split("/")[0]
    proc = ctx.children.start(name, [
        PY, str(LOADTESTS / "limits_proxy.py"), "--port", str(port),
        "--upstream", f"http://127.0.0.1:{ctx.up_port}",
        "--storage", f"async+redis://{host_port}", "--strategy", strategy,
        "--limit", args.d_limit], args.proxy_cpu)
    wait_http(port, ENV_OK, 30, name, ctx.children)
    return Arm(name, port, proc.pid, ctx.header,
               f"aiohttp passthrough (quotagate's UpstreamPool) + limits "
               f"{strategy} window ({args.d_limit}, redis-py) -> upstream")


ARMS = tuple(ArmDef(f"D-{s}", functools.partial(start, strategy=s), group="D")
             for s in D_STRATEGIES)
