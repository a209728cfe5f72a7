"""What the demo, the load tests and the test suite share to stage a gateway: the shipped
routes (``config/gateway.yaml``) pointed at an upstream, and waiting until a gateway is ready.

One route list and one readiness loop: a stage that drifts from what ships would test, load
or show a gateway nobody runs.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from quotagate.limiter.embedded import free_ports

#: The project's config directory (a source checkout; the container copies it to /app/config).
CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"


def find_config_dir() -> Path:
    """``config/`` of the current directory, else the project's."""
    for candidate in (Path.cwd() / "config", CONFIG_DIR):
        if (candidate / "plans.yaml").exists() and (candidate / "gateway.yaml").exists():
            return candidate
    raise SystemExit("config/plans.yaml not found: run from the project directory")


def shipped_gateway() -> dict[str, Any]:
    """``config/gateway.yaml`` as shipped."""
    loaded = yaml.safe_load((find_config_dir() / "gateway.yaml").read_text())
    assert isinstance(loaded, dict)
    return loaded


def shipped_routes(upstream: str) -> list[dict[str, Any]]:
    """The shipped routes, every one pointed at ``upstream``."""
    return [{**route, "upstream": upstream} for route in shipped_gateway()["routes"]]


def stage_shipped(directory: Path, upstream: str,
                  environments: dict[str, Any] | None = None, **changes: Any) -> dict[str, Any]:
    """``config/`` copied to ``directory`` (not its store data); gateway.yaml as shipped but
    for free ports on 127.0.0.1, every route to ``upstream`` and ``changes``; environments.yaml
    replaced when ``environments`` is given. Returns the gateway settings written."""
    shipped = find_config_dir()
    shutil.copytree(shipped, directory, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("data"))
    gateway = shipped_gateway()
    listen, admin = free_ports(2)  # (two calls of free_port may give one port twice)
    gateway.update(listen=f"127.0.0.1:{listen}", admin_listen=f"127.0.0.1:{admin}",
                   routes=shipped_routes(upstream))
    gateway.update(changes)
    (directory / "gateway.yaml").write_text(yaml.safe_dump(gateway, sort_keys=False))
    if environments is not None:
        (directory / "environments.yaml").write_text(
            yaml.safe_dump({"environments": environments}))
    return gateway


async def wait_ready(admin_port: int, *, alive: Callable[[], None] | None = None,
                     timeout: float = 30, host: str = "127.0.0.1") -> None:
    """Until the gateway's ``/readyz`` says ready (store reachable, scripts loaded,
    environments written, the store's clock sampled). ``alive()`` raises if the gateway
    has died meanwhile (so a failed start is reported at once, with its own error)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if alive is not None:
                alive()
            try:
                async with session.get(f"http://{host}:{admin_port}/readyz") as resp:
                    if resp.status == 200:
                        return
                    last = f"{resp.status}: {await resp.text()}"
            except aiohttp.ClientError as exc:
                last = repr(exc)
            await asyncio.sleep(0.05)
    raise TimeoutError(f"the gateway (admin port {admin_port}) was not ready within "
                       f"{timeout:.0f} s; last: {last}")


def wait_ready_blocking(admin_port: int, *, alive: Callable[[], None] | None = None,
                        timeout: float = 30) -> None:
    """``wait_ready`` for code that is not async (the load-test runners)."""
    asyncio.run(wait_ready(admin_port, alive=alive, timeout=timeout))


#: deploy/nginx/: the shipped nginx (plugin mode).
NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
#: The addresses quotagate.conf ships with: this server, quotagate's authz_listen and listen,
#: the platform's services.
NGINX_PORTS = {"listen": 8088, "authz": 9092, "proxy": 8080, "upstream": 9001}


def staged_nginx(directory: Path, **ports: int) -> Path:
    """deploy/nginx/ copied to ``directory`` with its ports replaced (``listen``, ``authz``,
    ``proxy``, ``upstream``); returns the nginx.conf to run with
    ``nginx -p <directory> -c nginx.conf``."""
    directory.mkdir(parents=True, exist_ok=True)
    text = (NGINX_DIR / "quotagate.conf").read_text()
    for name, port in ports.items():
        shipped = NGINX_PORTS[name]
        if name == "listen":
            old, new = f"listen {shipped};", f"listen 127.0.0.1:{port};"
        elif name == "authz":
            text = text.replace(f"set $quotagate_done_port {shipped};",
                                f"set $quotagate_done_port {port};")
            old, new = f"127.0.0.1:{shipped}", f"127.0.0.1:{port}"
        else:
            old, new = f"127.0.0.1:{shipped}", f"127.0.0.1:{port}"
        assert old in text, f"{old} is not in quotagate.conf"
        text = text.replace(old, new)
    (directory / "quotagate.conf").write_text(text)
    (directory / "nginx.conf").write_text((NGINX_DIR / "nginx.conf").read_text())
    return directory / "nginx.conf"
