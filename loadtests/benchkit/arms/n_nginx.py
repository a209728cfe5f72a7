"""N: wrk -> nginx proxy_pass (1 worker, upstream keepalive 32) -> upstream, for scale."""

from __future__ import annotations

import shutil
from pathlib import Path

from quotagate.limiter.embedded import free_port

from ..arm import Arm, ArmDef, Context
from ..common import ENV_OK
from ..procs import wait_http


def nginx_conf(tmp: Path, port: int, upstream_port: int) -> Path:
    ndir = tmp / "nginx"
    ndir.mkdir()
    conf = ndir / "nginx.conf"
    conf.write_text(f"""\
user root;
worker_processes 1;
daemon off;
pid {ndir}/nginx.pid;
error_log {ndir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {ndir}/body;
    proxy_temp_path {ndir}/proxy;
    fastcgi_temp_path {ndir}/fastcgi;
    uwsgi_temp_path {ndir}/uwsgi;
    scgi_temp_path {ndir}/scgi;
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 32;
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
""")
    return conf


def start(ctx: Context) -> Arm:
    port = free_port()
    conf = nginx_conf(ctx.tmp, port, ctx.up_port)
    proc = ctx.children.start("nginx", ["nginx", "-p", str(conf.parent), "-c", str(conf),
                                        "-e", str(conf.parent / "error.log")],
                              ctx.args.proxy_cpu)
    wait_http(port, ENV_OK, 20, "nginx", ctx.children)
    return Arm("N", port, proc.pid, ctx.header,
               "nginx proxy_pass, 1 worker, upstream keepalive 32, HTTP/1.1, "
               "access_log off")


def unavailable() -> str | None:
    if not shutil.which("nginx"):
        return "note: nginx not found, skipping arm N (apt-get install -y nginx)"
    return None


ARM = ArmDef("N", start, unavailable=unavailable)
