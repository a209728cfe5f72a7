"""The as-deployed tier's harness: ``quotagate serve`` as a subprocess with the shipped config
(only ports, upstream and scheduler pace changed), the embedded store, the real clock, and no
injected anything; driven only through HTTP, the CLI and the admin API.

Dates are computed from the real today in the environments' zone, never written down: no test
may depend on the day it runs."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import os
import resource
import signal
import subprocess
import sys
import time
import zoneinfo
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiohttp
import yaml
from aiohttp import web

from quotagate.demo.staging import stage_shipped
from quotagate.limiter.embedded import free_port
from tests.helpers import QUOTAGATE, wait_ready

ZONE = zoneinfo.ZoneInfo("Asia/Shanghai")  # the shipped gateway.yaml's timezone
TOKEN = "deployed-token"


#: The longest a test module of this tier runs (they take seconds): no module starts closer to
#: the environments' midnight than this, so none sees two dates.
MODULE_SECONDS = 300


def hold_the_day(seconds: float = MODULE_SECONDS) -> None:
    """Wait for the next day when today (in the environments' zone) has less than ``seconds``
    left, so what starts now ends on the same date. Call it before laying out dates."""
    now = dt.datetime.now(ZONE)
    midnight = dt.datetime.combine(now.date() + dt.timedelta(days=1), dt.time(), ZONE)
    if (left := (midnight - now).total_seconds()) < seconds:
        time.sleep(left + 1)


def today() -> dt.date:
    """Today in the environments' zone (steady within a module: see hold_the_day)."""
    return dt.datetime.now(ZONE).date()


def days(n: int) -> str:
    """Today plus ``n`` days, as ISO."""
    return (today() + dt.timedelta(days=n)).isoformat()


@dataclass
class Webhook:
    """Receives the gateway's events (the public surface consumers use besides the stream)."""

    events: list[dict[str, Any]] = field(default_factory=list)
    runner: web.AppRunner | None = None
    port: int = 0
    #: Deliveries of an event already received (the same webhook-id), dropped as a receiver
    #: should: delivery is at least once, and a POST this receiver answered late (its loop
    #: blocked by a test's CLI call) is sent again.
    redelivered: int = 0

    async def start(self) -> Webhook:
        async def receive(request: web.Request) -> web.Response:
            event = await request.json()
            if any(e.get("event_id") == event.get("event_id") for e in self.events):
                self.redelivered += 1
            else:
                self.events.append(event)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/events", receive)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        self.port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def wait_for(self, env: str, kind: str, timeout: float = 15) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events:
                if event.get("env") == env and event.get("type") == kind:
                    return event
            await asyncio.sleep(0.1)
        raise AssertionError(f"no {kind} event for {env}; got {self.events}")


@dataclass
class Deployed:
    """A running ``quotagate serve`` as shipped."""

    directory: Path
    port: int
    admin: int
    proc: subprocess.Popen[str]
    config: dict[str, Any]
    #: The file its stderr (the log) goes to.
    log: IO[str]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def route(self, kind: str) -> str:
        """The URL prefix of the shipped config's first route of ``kind``."""
        prefix = next(r["prefix"] for r in self.config["routes"] if r["kind"] == kind)
        return self.base + prefix

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*QUOTAGATE, *args, "--admin", f"http://127.0.0.1:{self.admin}",
                               "--token", TOKEN], capture_output=True, text=True, timeout=60)

    def ok(self, *args: str) -> str:
        out = self.cli(*args)
        assert out.returncode == 0, (args, out.stdout, out.stderr)
        return out.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def put_env(self, env_id: str, yaml_text: str) -> None:
        """``quotagate env put`` of a file written as an operator writes it."""
        path = self.directory / f"{env_id}.yaml"
        path.write_text(yaml_text)
        assert "written" in self.ok("env", "put", env_id, str(path))

    async def admin_api(self, method: str, path: str, body: Any = None
                        ) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s, s.request(
                method, f"http://127.0.0.1:{self.admin}/admin/v1{path}", json=body,
                headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            return r.status, await r.json(content_type=None)

    async def get(self, url: str, env: str, n: int = 1, concurrent: bool = False
                  ) -> list[int]:
        """Statuses of ``n`` GETs of ``url`` as ``env`` (at once, or one after another)."""
        async with aiohttp.ClientSession() as s:
            async def one() -> int:
                async with s.get(url, headers={"X-CloudBase-Env": env}) as r:
                    await r.read()
                    return r.status
            if concurrent:
                return list(await asyncio.gather(*(one() for _ in range(n))))
            return [await one() for _ in range(n)]

    def log_text(self) -> str:
        """Its log so far."""
        return Path(self.log.name).read_text()

    def stop(self) -> str:
        """Stop it (SIGTERM); returns its log."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.seek(0)
        text = self.log.read()
        self.log.close()
        return text


def shipped_config(directory: Path, upstream: str, **changes: Any) -> dict[str, Any]:
    """config/ copied to ``directory``; gateway.yaml as shipped but for free ports, the
    upstream's address and ``changes``. Returns the gateway settings written."""
    return stage_shipped(directory, upstream, **changes)


async def serve(directory: Path, gateway: dict[str, Any], *args: str,
                nofile: int | None = None, nofile_hard: int | None = None) -> Deployed:
    """``nofile``: start it with this soft descriptor limit (the hard one stays, unless
    ``nofile_hard`` lowers it too: nothing to raise the soft one to), as a distribution's
    default of 1,024 would."""
    # Its log goes to a file: a pipe nobody reads until the end would fill and block it.
    log = open(directory / f"serve-{time.monotonic_ns()}.log", "w+")  # noqa: SIM115

    def limit() -> None:
        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile_hard or resource.getrlimit(
                resource.RLIMIT_NOFILE)[1]))

    proc = subprocess.Popen([*QUOTAGATE, "serve", "--config", str(directory / "gateway.yaml"),
                             *args], stdout=subprocess.DEVNULL, stderr=log, preexec_fn=limit,
                            text=True, env={**os.environ, "QUOTAGATE_ADMIN_TOKEN": TOKEN})
    port = int(gateway["listen"].rsplit(":", 1)[1])
    admin = int(gateway["admin_listen"].rsplit(":", 1)[1])
    try:
        await wait_ready(admin, proc, timeout=60)
    except (AssertionError, TimeoutError) as exc:  # exited, or never ready: why, from its log
        proc.kill()
        proc.wait()
        log.seek(0)
        raise AssertionError(f"quotagate serve did not start ({exc}); its log:\n"
                             f"{log.read()[-4000:]}") from None
    except BaseException:
        proc.kill()
        raise
    return Deployed(directory, port, admin, proc, gateway, log)


def start_upstream() -> tuple[subprocess.Popen[bytes], str]:
    """The demo upstream as its own process (as compose runs it)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "quotagate.demo.upstream",
                             "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    import socket

    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the demo upstream did not start")


@contextlib.contextmanager
def upstream_process() -> Iterator[str]:
    """``start_upstream()``'s origin, the process killed after."""
    proc, origin = start_upstream()
    try:
        yield origin
    finally:
        proc.kill()
        proc.wait()


def raise_descriptor_limit() -> None:
    """For a test process that holds thousands of sockets itself: its soft limit to the hard."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def live_env(**limits: Any) -> dict[str, Any]:
    """A standard-plan environment bought three days ago, for a year, with ``limits``."""
    return {"plan": "standard", "anchor": days(-3), "expires": days(360), "limits": limits}


@contextlib.asynccontextmanager
async def served(directory: Path, environments: dict[str, Any], **changes: Any
                 ) -> AsyncIterator[tuple[Deployed, str]]:
    """``quotagate serve`` as shipped (``changes`` to gateway.yaml, these environments) in
    front of the demo upstream; yields it and the upstream's URL. Stopped after, and its log
    must hold no traceback."""
    hold_the_day()
    upstream, upstream_url = start_upstream()
    try:
        settings = shipped_config(directory, upstream_url, **changes)
        (directory / "environments.yaml").write_text(
            yaml.safe_dump({"environments": environments}))
        deployed = await serve(directory, settings)
        try:
            yield deployed, upstream_url
        finally:
            log = deployed.stop()
            assert "Traceback" not in log, log
    finally:
        upstream.kill()
