"""Plugin mode for Envoy's rate limit filter: ``quotagate serve`` (shipped config,
``authz.grpc_listen`` on, real clock) answering ``RateLimitService/ShouldRateLimit`` to a real
gRPC client (grpcio, another gRPC stack than the server's) speaking Envoy's proto."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    RateLimitDescriptor,
    RateLimitDescriptorEntry,
)
from envoy_data_plane.envoy.service.ratelimit.v3 import (
    RateLimitRequest,
    RateLimitResponse,
    RateLimitResponseCode,
    RateLimitResponseRateLimitUnit,
    RateLimitServiceSyncStub,
)

from quotagate.limiter.embedded import free_port
from tests.deployed import Deployed, live_env, served

pytestmark = pytest.mark.deployed


def descriptor(**entries: str) -> RateLimitDescriptor:
    return RateLimitDescriptor(entries=[RateLimitDescriptorEntry(key=k, value=v)
                                        for k, v in entries.items()])


class Service:
    def __init__(self, deployed: Deployed, port: int):
        self.deployed = deployed
        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.stub = RateLimitServiceSyncStub(self.channel)

    async def ask(self, *descriptors: RateLimitDescriptor, domain: str = "rl",
                  hits: int = 0) -> RateLimitResponse:
        request = RateLimitRequest(domain=domain, descriptors=list(descriptors),
                                   hits_addend=hits)
        return await asyncio.to_thread(self.stub.should_rate_limit, request)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[Service]:
    port = free_port()
    async with served(tmp_path / "config", {
            "shop": live_env(calls=5, qps=1000),
            "fn": live_env(function_concurrency=1, qps=1000)},
            authz={"grpc_listen": f"127.0.0.1:{port}", "ratelimit": {"domain": "rl"}},
            authz_listen=f"127.0.0.1:{free_port()}") as (deployed, _):
        svc = Service(deployed, port)
        try:
            yield svc
        finally:
            svc.channel.close()


def headers(response: RateLimitResponse) -> dict[str, str]:
    return {h.key: h.value for h in response.response_headers_to_add}


async def test_a_request_shaped_like_envoyproxy_ratelimits_examples(service: Service):
    """Their example's descriptors (source and destination cluster, domain rl) name no
    environment: answered OK, untouched. Beside them one built by Envoy's request_headers
    actions (X-CloudBase-Env, :path, :method) is decided as the HTTP proxy would."""
    response = await service.ask(
        descriptor(source_cluster="proxy", destination_cluster="mock"),
        descriptor(env="shop", path="/database/query?limit=1", method="GET"))
    assert response.overall_code == RateLimitResponseCode.OK
    untouched, decided = response.statuses
    assert untouched.code == RateLimitResponseCode.OK and untouched.current_limit is None
    assert decided.code == RateLimitResponseCode.OK
    assert decided.current_limit is not None
    assert decided.current_limit.unit == RateLimitResponseRateLimitUnit.MONTH
    assert decided.current_limit.requests_per_unit == 5
    assert decided.limit_remaining == 4
    assert decided.duration_until_reset is not None
    assert decided.duration_until_reset.total_seconds() > 0
    assert '"calls";q=5' in headers(response)["RateLimit-Policy"]


async def test_a_request_is_charged_once_whatever_its_descriptors(service: Service):
    """Two rate_limits entries naming the same request: one decision, the second answered OK
    without charging it again."""
    response = await service.ask(descriptor(env="shop", kind="database"),
                                 descriptor(env="shop", path="/database/q", method="GET"))
    assert [s.code for s in response.statuses] == [RateLimitResponseCode.OK] * 2
    assert response.statuses[0].limit_remaining == 4
    again = await service.ask(descriptor(env="shop", kind="database"))
    assert again.statuses[0].limit_remaining == 3


async def test_over_limit_carries_the_problem(service: Service):
    asked = descriptor(env="shop", kind="database")
    for _ in range(2):
        assert (await service.ask(asked, hits=2)).overall_code == RateLimitResponseCode.OK
    response = await service.ask(asked, hits=2)  # 4 used of 5: 2 more do not fit
    assert response.overall_code == RateLimitResponseCode.OVER_LIMIT
    assert response.statuses[0].code == RateLimitResponseCode.OVER_LIMIT
    assert b'"code": "QUOTA_EXCEEDED"' in response.raw_body
    sent = headers(response)
    assert sent["X-Quotagate-Status"] == "429" and int(sent["Retry-After"]) >= 1
    assert sent["Content-Type"] == "application/problem+json"
    assert (await service.ask(asked)).overall_code == RateLimitResponseCode.OK  # the last one


async def test_unknown_and_invalid_environments_and_other_domains(service: Service):
    response = await service.ask(descriptor(env="nobody", kind="database"))
    assert response.overall_code == RateLimitResponseCode.OVER_LIMIT
    assert b"ENVIRONMENT_NOT_FOUND" in response.raw_body
    response = await service.ask(descriptor(env="Bad_Env", kind="database"))
    assert response.overall_code == RateLimitResponseCode.OVER_LIMIT
    assert b"INVALID_ENVIRONMENT" in response.raw_body
    response = await service.ask(descriptor(env="nobody", kind="database"), domain="other")
    assert response.overall_code == RateLimitResponseCode.OK  # not ours to decide


async def test_a_function_slot_ends_with_its_lease_or_a_done_call(service: Service):
    """No done call in this API: the slot is leased for the route's max_duration_ms; the
    platform's service may give it back sooner with the request header's ticket."""
    first = await service.ask(descriptor(env="fn", path="/functions/report", method="POST"))
    assert first.overall_code == RateLimitResponseCode.OK
    ticket = {h.key: h.value for h in first.request_headers_to_add}["X-Quotagate-Decision"]
    second = await service.ask(descriptor(env="fn", path="/functions/report", method="POST"))
    assert second.overall_code == RateLimitResponseCode.OVER_LIMIT
    assert b"CONCURRENCY_LIMIT_EXCEEDED" in second.raw_body
    status, _ = await done(service.deployed, ticket)
    assert status == 204
    third = await service.ask(descriptor(env="fn", path="/functions/report", method="POST"))
    assert third.overall_code == RateLimitResponseCode.OK


async def done(deployed: Deployed, ticket: str) -> tuple[int, bytes]:
    """The done call, as the platform's service would send it to the authz listener."""
    import aiohttp

    port = int(deployed.config["authz_listen"].rsplit(":", 1)[1])
    async with aiohttp.ClientSession() as s, s.post(
            f"http://127.0.0.1:{port}/authz/v1/done",
            json={"decision": ticket, "duration_ms": 20}) as r:
        return r.status, await r.read()


async def test_the_environment_from_the_host_and_none_is_never_uncounted(service: Service):
    """Envoy's request_headers actions on :authority and :path, no X-CloudBase-Env: the host
    names the environment, as on the HTTP front doors; a request naming none is refused."""
    by_host = descriptor(host="shop.api.tcloudbasegateway.com", path="/database/q",
                         method="GET")
    response = await service.ask(by_host)
    assert response.overall_code == RateLimitResponseCode.OK
    assert response.statuses[0].limit_remaining == 4  # shop's: 1 of 5 used
    response = await service.ask(descriptor(host="cdn.example.com", path="/database/q",
                                            method="GET"))
    assert response.overall_code == RateLimitResponseCode.OVER_LIMIT
    assert b"INVALID_ENVIRONMENT" in response.raw_body
    response = await service.ask(descriptor(host="x.example.com", path="/database/q?env=shop",
                                            method="GET"))
    assert response.overall_code == RateLimitResponseCode.OK
    assert response.statuses[0].limit_remaining == 3


def test_the_descriptor_set_is_what_envoys_protos_compile_to(tmp_path: Path):
    """gateway/plugin/rls.py builds its messages from the rls.binpb beside it: it must be the
    protos vendored in third_party/envoy compiled (scripts/protos), not an edited or stale
    file."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    api = root / "third_party" / "envoy"
    out = tmp_path / "rls.binpb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I", str(api),
                    "--include_imports", f"--descriptor_set_out={out}",
                    "envoy/service/ratelimit/v3/rls.proto"], check=True, timeout=60)
    shipped = root / "quotagate" / "gateway" / "plugin" / "rls.binpb"
    assert out.read_bytes() == shipped.read_bytes()
