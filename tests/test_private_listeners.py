"""The private listeners are bounded like the public one (issue 23), through ``quotagate serve``
as shipped: on ``authz_listen``, ``authz.grpc_listen`` and ``admin_listen`` idle sockets and
slowloris senders are closed within ``clients.header_timeout_ms`` (while real clients are
served), and a flood of idle sockets on one of them beyond its connection cap leaves the
public listener and the other private ones answering (each listener has its own share of the
descriptor limit)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import grpc
import h2.config
import h2.connection
import pytest
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    RateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitResponseCode,
)

from quotagate.limiter.embedded import free_ports
from quotagate.settings.schema import ClientSettings
from tests.deployed import (
    Deployed,
    days,
    raise_descriptor_limit,
    serve,
    shipped_config,
    upstream_process,
)

pytestmark = pytest.mark.deployed

HEADER_TIMEOUT_MS = 1500
#: However busy the machine, a socket the gateway should close is closed within this long.
CLOSED_WITHIN_S = 30
PRIVATE = ("authz", "grpc", "admin")
HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
GOAWAY = 0x7


@pytest.fixture(autouse=True)
def _enough_descriptors() -> None:
    """This test process holds over a thousand sockets itself."""
    raise_descriptor_limit()


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    with upstream_process() as origin:
        yield origin


class Gateway:
    """``quotagate serve`` with all four listeners, and a real client of each."""

    def __init__(self, deployed: Deployed, ports: dict[str, int]):
        self.deployed = deployed
        self.ports = ports

    async def public(self) -> int:
        return (await self.deployed.get(self.deployed.route("function") + "hello", "legit"))[0]

    async def authz(self) -> int:
        """As Traefik's ForwardAuth asks."""
        headers = {"X-Forwarded-Method": "GET", "X-Forwarded-Uri": "/database/q",
                   "X-Forwarded-Host": "api.example.com", "X-CloudBase-Env": "legit"}
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.ports['authz']}/authz/forward",
                headers=headers) as r:
            await r.read()
            return r.status

    async def admin(self) -> int:
        async with aiohttp.ClientSession() as s, s.get(
                f"http://127.0.0.1:{self.ports['admin']}/healthz") as r:
            await r.read()
            return r.status

    async def grpc(self) -> int:
        """As Envoy's rate limit filter asks (on a channel of its own: a new connection)."""
        def call() -> int:
            with grpc.insecure_channel(f"127.0.0.1:{self.ports['grpc']}") as channel:
                response = channel.unary_unary(
                    "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
                    RateLimitRequest.SerializeToString, RateLimitResponse.FromString,
                )(RateLimitRequest(domain="rl", descriptors=[RateLimitDescriptor(entries=[
                    RateLimitDescriptorEntry(key="env", value="legit"),
                    RateLimitDescriptorEntry(key="path", value="/database/q")])]),
                  timeout=20)
                return 200 if response.overall_code == RateLimitResponseCode.OK else 429
        return await asyncio.to_thread(call)

    def client(self, listener: str) -> Callable[[], Awaitable[int]]:
        return getattr(self, listener)  # type: ignore[no-any-return]

    async def all_answer(self, but: str = "") -> None:
        """A real request on every listener (but ``but``) is answered."""
        for listener in ("public", *PRIVATE):
            if listener != but:
                async with asyncio.timeout(30):
                    assert await self.client(listener)() == 200, listener


async def gateway(tmp_path: Path, origin: str, nofile: int | None = None,
                  **clients: int) -> Gateway:
    listen, admin, authz, rls = free_ports(4)
    config = shipped_config(
        tmp_path, origin, listen=f"127.0.0.1:{listen}", admin_listen=f"127.0.0.1:{admin}",
        authz_listen=f"127.0.0.1:{authz}",
        authz={"grpc_listen": f"127.0.0.1:{rls}", "ratelimit": {"domain": "rl"}},
        clients=clients)
    deployed = await serve(tmp_path, config, nofile=nofile, nofile_hard=nofile)
    deployed.put_env("legit", f"plan: standard\nanchor: {days(0)}\nexpires: {days(365)}\n")
    return Gateway(deployed, {"public": listen, "admin": admin, "authz": authz, "grpc": rls})


async def closed_by_peer(reader: asyncio.StreamReader, timeout: float) -> bytes | None:
    """What the gateway sent on this connection, if it closed it within ``timeout``."""
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while data := await reader.read(65536):
                received += data
        return received
    except TimeoutError:
        return None
    except ConnectionError:
        return received


CALL_HEADERS = [
    (":method", "POST"), (":scheme", "http"), (":authority", "127.0.0.1"),
    (":path", "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"),
    ("content-type", "application/grpc"), ("te", "trailers")]


def h2_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    return conn


def h2_call(message: bytes | None) -> tuple[bytes, bytes]:
    """A gRPC client's first bytes: the preface with its SETTINGS; and a ShouldRateLimit
    call: its HEADERS, then (``message`` not None) that request message, ending the call."""
    conn = h2_client()
    preface = conn.data_to_send()
    conn.send_headers(1, CALL_HEADERS)
    if message is not None:
        conn.send_data(1, b"\0" + struct.pack("!I", len(message)) + message, end_stream=True)
    return preface, conn.data_to_send()


def grpc_status(received: bytes) -> str | None:
    """The grpc-status the server ended the call (stream 1) with, in what it sent."""
    conn = h2_client()
    conn.send_headers(1, CALL_HEADERS)
    status = None
    for event in conn.receive_data(received):
        for name, value in getattr(event, "headers", None) or ():
            if name in (b"grpc-status", "grpc-status"):
                status = value.decode() if isinstance(value, bytes) else value
    return status


def anything(received: bytes) -> bool:
    return True


def slow_senders(listener: str) -> list[tuple[bytes, bytes, Callable[[bytes], bool]]]:
    """What hostile clients of this listener send at once, then trickle (a few bytes every
    half second, never completing what the listener waits for); and what the listener's
    answer before it closes them must be."""
    if listener == "grpc":
        preface, headers = h2_call(None)
        call = b"".join(h2_call(bytes(RateLimitRequest(domain="rl", descriptors=[
            RateLimitDescriptor(entries=[RateLimitDescriptorEntry(key="env", value="legit")])]))))
        data = struct.pack("!I", 1000)[1:] + bytes([0, 0]) + struct.pack("!I", 1)
        return [(b"", HTTP2_PREFACE, anything),  # the preface, trickled
                (preface, headers, anything),  # a call's HEADERS frame, trickled
                # its request message, trickled: the call ends, DEADLINE_EXCEEDED
                (preface + headers, data + b"\0" * 1000, lambda got: grpc_status(got) == "4"),
                # a call answered, then nothing more
                (call, b"", lambda got: grpc_status(got) == "0")]
    slow_head = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
    lines = b"".join(f"X-Slow-{i}: 1\r\n".encode() for i in range(100))
    kept_alive = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"  # answered, then nothing

    def answered(status: bytes) -> Callable[[bytes], bool]:
        return lambda got: got.startswith(b"HTTP/1.1 " + status)

    if listener == "admin":
        return [(slow_head, lines, anything), (kept_alive, b"", answered(b"200"))]
    slow_body = (b"POST /authz/forward HTTP/1.1\r\nHost: x\r\nX-CloudBase-Env: legit\r\n"
                 b"X-Forwarded-Uri: /database/q\r\nContent-Length: 1000\r\n\r\n")
    return [(slow_head, lines, anything), (slow_body, b"{" * 1000, answered(b"408")),
            (kept_alive, b"", answered(b"404"))]  # (/healthz is no decision endpoint)


@pytest.mark.parametrize("listener", PRIVATE)
async def test_idle_and_slowloris_sockets_are_closed_while_real_clients_are_served(
        tmp_path, upstream, listener):
    gw = await gateway(tmp_path, upstream, header_timeout_ms=HEADER_TIMEOUT_MS,
                       body_timeout_ms=HEADER_TIMEOUT_MS)
    port = gw.ports[listener]
    try:
        await gw.all_answer()
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(30)]
        senders = slow_senders(listener)
        slow = []
        for first, trickle, expected in senders:
            for _ in range(30 // len(senders)):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(first)
                slow.append((reader, writer, trickle, expected))

        async def trickling() -> None:
            for i in range(2 * CLOSED_WITHIN_S):
                await asyncio.sleep(0.5)
                for _, writer, trickle, _ in slow:
                    if not writer.is_closing() and i < len(trickle) // 2:
                        with contextlib.suppress(ConnectionError):
                            writer.write(trickle[2 * i:2 * i + 2])

        trickle_task = asyncio.create_task(trickling())
        # While they are open, real clients of every listener are served.
        await gw.all_answer()
        answers = await asyncio.gather(*(closed_by_peer(r, CLOSED_WITHIN_S)
                                         for r, *_ in idle + slow))
        trickle_task.cancel()
        assert answers.count(None) == 0, f"{answers.count(None)} of {len(answers)} still open"
        for (*_, expected), answer in zip(slow, answers[len(idle):], strict=True):
            assert answer is not None and expected(answer), answer
        # And the listener serves after it closed them.
        assert await gw.client(listener)() == 200
        for _, writer, *_ in idle + slow:
            writer.close()
    finally:
        log = gw.deployed.stop()
    assert "Traceback" not in log, log


def frame_types(data: bytes) -> list[int]:
    """The HTTP/2 frames' types in what a server sent."""
    types = []
    while len(data) >= 9:
        length, kind = struct.unpack("!I", b"\0" + data[:3])[0], data[3]
        types.append(kind)
        data = data[9 + length:]
    return types


async def refused(gw: Gateway, listener: str) -> None:
    """One more connection on the flooded listener is refused at once: HTTP listeners answer
    503 too-many-connections, the gRPC one sends GOAWAY; both close it."""
    for _ in range(20):  # (a refusal may also be cut short while many are being refused)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports[listener])
        if listener == "grpc":
            writer.write(HTTP2_PREFACE)
        try:
            async with asyncio.timeout(10):
                answer = await reader.read()
        except ConnectionError:
            answer = b""
        writer.close()
        if listener == "grpc" and GOAWAY in frame_types(answer):
            return
        if answer.startswith(b"HTTP/1.1 503 "):
            problem = json.loads(answer.partition(b"\r\n\r\n")[2])
            assert problem["code"] == "TOO_MANY_CONNECTIONS", problem
            return
        await asyncio.sleep(0.5)
    raise AssertionError(f"no refusal on {listener}; last answer {answer[:200]!r}")


@pytest.mark.parametrize("listener", PRIVATE)
async def test_a_flood_on_one_private_listener_leaves_the_others_answering(
        tmp_path, upstream, listener):
    # Started with a descriptor limit of 1,024 (soft and hard: nothing to raise it to), and a
    # header timeout long enough that the flood is still open while the others are asked.
    gw = await gateway(tmp_path, upstream, nofile=1024, header_timeout_ms=60_000)
    port = gw.ports[listener]
    flood: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def connect() -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(5):
                flood.append(await asyncio.open_connection("127.0.0.1", port))

    try:
        await gw.all_answer()
        for _ in range(11):  # 1,100 idle sockets, more than the whole descriptor limit
            before = len(flood)
            await asyncio.gather(*(connect() for _ in range(100)))
            if len(flood) - before < 100:
                break  # (the listener no longer accepts: its backlog is full)
        await asyncio.sleep(1)
        await gw.all_answer(but=listener)
        await refused(gw, listener)
        await gw.all_answer(but=listener)
    finally:
        for _, writer in flood:
            writer.close()
        log = gw.deployed.stop()
    assert "Traceback" not in log, log


def test_each_listener_has_its_own_share_of_the_descriptor_limit():
    from quotagate.gateway.clients import connection_caps, descriptors_needed

    every = ["authz", "grpc", "admin"]
    caps = connection_caps(ClientSettings(), 1024, every)
    assert caps == {"public": 313, "authz": 120, "grpc": 120, "admin": 30}
    for nofile in (256, 1024, 4096, 65536, 1 << 20):
        for private in ([], ["admin"], ["authz", "admin"], ["grpc"], every):
            caps = connection_caps(ClientSettings(), nofile, private)
            assert set(caps) == {"public", *private}
            # Together they fit the limit (a proxied client holding two), the public
            # listener with the largest share.
            assert descriptors_needed(caps) <= nofile, (nofile, private, caps)
            assert caps["public"] == max(caps.values())
    explicit = ClientSettings(max_connections=500, authz_max_connections=50,
                              grpc_max_connections=40, admin_max_connections=10)
    assert connection_caps(explicit, 1024, every) == {
        "public": 500, "authz": 50, "grpc": 40, "admin": 10}
