"""P, plugin mode: wrk -> nginx running deploy/nginx/quotagate.conf, its auth_request asking a
quotagate decision service (authz_listen) -> proxy_pass upstream; CPU per request is
quotagate's."""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from quotagate.demo.staging import staged_nginx
from quotagate.limiter.embedded import free_port

from ..arm import Arm, ArmDef, Context
from ..common import ENV_OK, LOADTESTS, PLAIN_PATH, PY
from ..procs import wait_http

LUA_MODULE = Path("/usr/lib/nginx/modules/ngx_http_lua_module.so")


def start(ctx: Context) -> Arm:
    # Plugin mode: the shipped deploy/nginx/quotagate.conf, its auth_request asking a
    # quotagate decision service (no proxy of its own in the path), on the proxy's core.
    args, children, tmp = ctx.args, ctx.children, ctx.tmp
    cfg = yaml.safe_load(ctx.configs["enforce"].read_text())
    authz = free_port()
    cfg["authz_listen"] = f"127.0.0.1:{authz}"
    cfg["listen"] = f"127.0.0.1:{free_port()}"  # (C's gateway has the other one)
    authz_config = tmp / "gateway-authz.yaml"
    authz_config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = children.start("gateway-authz", [PY, str(LOADTESTS / "gateway_proc.py"),
                                            str(authz_config), ctx.store_url],
                          args.proxy_cpu)
    wait_http(int(cfg["listen"].rsplit(":", 1)[1]), ENV_OK, 30, "gateway (authz)",
              children)
    port = free_port()
    conf = staged_nginx(tmp / "nginx-p", listen=port, authz=authz,
                        proxy=int(cfg["listen"].rsplit(":", 1)[1]), upstream=ctx.up_port)
    children.start("nginx-p", ["nginx", "-p", str(conf.parent), "-c", str(conf),
                               "-g", "daemon off;"], args.proxy_cpu)
    wait_http(port, ENV_OK, 20, "nginx (auth_request)", children)
    return Arm("P", port, proc.pid, ctx.header,
               "deploy/nginx/quotagate.conf: nginx (1 worker) auth_request -> "
               "quotagate decision service (authz_listen) -> proxy_pass upstream, "
               f"both on cpu {args.proxy_cpu}, on {PLAIN_PATH}; CPU per request is "
               "quotagate's (nginx's not counted)", PLAIN_PATH)


def unavailable() -> str | None:
    if not (shutil.which("nginx") and LUA_MODULE.exists()):
        return ("note: nginx or its lua module not found, skipping arm P (scripts/nginx "
                "installs them)")
    return None


ARM = ArmDef("P", start, unavailable=unavailable)
