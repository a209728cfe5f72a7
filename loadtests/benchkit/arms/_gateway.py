"""The quotagate gateway processes the arms share (B's, and C's with Cfn and Creject)."""

from __future__ import annotations

import yaml

from ..arm import Context
from ..common import ENV_OK, LOADTESTS, PY
from ..procs import wait_http


def gateway(ctx: Context, mode: str) -> tuple[int, int]:
    """(port, pid) of the gateway running ctx.configs[mode] ("off" or "enforce") on the proxy
    core, started by the first arm that asks for it."""
    name = f"gateway-{mode}"
    if name not in ctx.shared:
        cfg = yaml.safe_load(ctx.configs[mode].read_text())
        port = int(cfg["listen"].rsplit(":", 1)[1])
        proc = ctx.children.start(name, [PY, str(LOADTESTS / "gateway_proc.py"),
                                         str(ctx.configs[mode]), ctx.store_url],
                                  ctx.args.proxy_cpu)
        wait_http(port, ENV_OK, 30, f"gateway ({mode})", ctx.children)
        ctx.shared[name] = (port, proc.pid)
    return ctx.shared[name]
