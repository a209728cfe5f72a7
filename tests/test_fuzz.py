"""The fuzz suite (issue 12): Hypothesis over the environment-id parser, the router, the
realtime frame reader and the admin API's bodies.

Two kinds of property: no input escapes as a 500 (or any exception from the parsers), and no
input reaches the upstream uncounted. The end-to-end ones send raw bytes to ``quotagate serve``
as shipped, in front of the demo upstream, which tells what it served; the gateway's /metrics
tells what it admitted. Brief in every run; ``scripts/test -m fuzz --hypothesis-profile=long``
runs 3,000 examples of each.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import make_mocked_request
from hypothesis import event, given
from hypothesis import strategies as st
from multidict import CIMultiDict

from quotagate.common.envids import ENV_ID
from quotagate.gateway.envid import all_domains, environment_of
from quotagate.gateway.problems import Problem
from quotagate.gateway.realtime import frames
from quotagate.gateway.routing import Router
from quotagate.settings import load_config
from tests.deployed import TOKEN, Deployed, days, serve, shipped_config, start_upstream

pytestmark = pytest.mark.fuzz

SHIPPED = Path(__file__).resolve().parent.parent / "config" / "gateway.yaml"
DOMAINS = ("api.tcloudbasegateway.com", "tcb-api.tencentcloudapi.com")
SUFFIXES = all_domains(DOMAINS, "")

# ------------------------------------------------------------------------- strategies

ENV_LIKE = st.sampled_from(["fz", "other", "FZ", "fz-", "-fz", "f" * 64, "f" * 63, "fz\n",
                            "", " fz", "fz.x", "é", "fz%00", "0"])
HOSTS = st.one_of(
    st.builds(lambda env, region, domain, tail: f"{env}{region}.{domain}{tail}",
              ENV_LIKE, st.sampled_from(["", ".ap-shanghai", ".a.b", ".-x"]),
              st.sampled_from([*DOMAINS, "API.TCLOUDBASEGATEWAY.COM", "example.com"]),
              st.sampled_from(["", ".", ":8080", ".:80", ":x"])),
    st.sampled_from(["127.0.0.1", "[::1]:80", "", "localhost"]),
)
QUERIES = st.sampled_from(["", "env=fz", "ENV=fz", "env=FZ", "env=fz&env=fz", "envName=fz",
                           "env=other", "stream=true", "env=", "env=fz%0a", "env=%66z",
                           "a=1&env=fz", "env"])
ENV_HEADERS = st.lists(st.sampled_from([
    ("X-CloudBase-Env", "fz"), ("X-CloudBase-Env", "other"), ("X-CloudBase-Env", "FZ"),
    ("X_CloudBase_Env", "other"), ("x-cloudbase-env", "fz "), ("X-CloudBase-Env", "")]),
    max_size=2)


def _request(method: str, target: str, headers: list[tuple[str, str]]) -> Any:
    return make_mocked_request(method, target, headers=CIMultiDict(headers))


# ---------------------------------------------------------------- the env-id parser (unit)


@given(host=HOSTS, query=QUERIES, headers=ENV_HEADERS)
def test_the_env_id_parser_names_a_valid_id_or_refuses_with_a_400(host, query, headers):
    request = _request("GET", "/functions/f" + (f"?{query}" if query else ""),
                       [("Host", host), *headers])
    try:
        env = environment_of(request, SUFFIXES)
    except Problem as problem:
        assert problem.status == 400 and problem.type_suffix == "invalid-environment"
        return
    if env is not None:
        assert ENV_ID.fullmatch(env), env
    # Every source that names an id names this one (or none names any).
    named = [v for k, v in headers if k.lower() == "x-cloudbase-env"]
    for value in named:
        assert value == env


# ---------------------------------------------------------------- the router (unit)

PREFIXES = ["/v1/functions/", "/v1/database/", "/v1/storages/", "/auth/", "/web", "/admin",
            "/", "/functions/", "/database/", "/storage/", "/sms/", "/ai/", "/x"]
SEGMENTS = st.sampled_from(["f", "echo", "..", ".", "%2e%2e", "%2E", "%2f", "", "a%00b", "é",
                            "sse", "x;y", "~", "web", "admin"])
PATHS = st.builds(lambda prefix, segments: prefix + "/".join(segments),
                  st.sampled_from(PREFIXES), st.lists(SEGMENTS, max_size=4))
METHODS = st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])


@given(path=PATHS, method=METHODS, accept=st.sampled_from(["", "*/*", "text/event-stream"]))
def test_the_router_matches_the_longest_prefix_that_fits(path, method, accept):
    routes = load_config(SHIPPED).gateway.routes
    route = Router(routes).match(path, method, accept)
    fitting = [r for r in routes if path.startswith(r.prefix)
               and (not r.exact or path == r.prefix) and (not r.methods or method in r.methods)]
    if route is None:
        assert fitting == []
    else:
        assert path.startswith(route.route.prefix)
        assert len(route.route.prefix) == max(len(r.prefix) for r in fitting)


# ------------------------------------------------------------- the frame reader (unit)

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=8),
                         st.floats(allow_nan=False))
MSG_TYPES = st.sampled_from([*sorted(frames.CLIENT_TYPES), "init_watch", "", "NEXT_EVENT"])


def _spelled(text: str, escapes: list[bool]) -> str:
    """``text`` as a JSON string, some characters written as \\u escapes."""
    out = []
    for ch, escape in zip(text, escapes + [False] * len(text), strict=False):
        out.append(f"\\u{ord(ch):04x}" if escape else json.dumps(ch)[1:-1])
    return '"' + "".join(out) + '"'


FRAMES = st.builds(
    lambda kind, kind_escapes, watch, data, extra, depth, binary: (
        ("{" + ",".join([f'"msgType":{_spelled(kind, kind_escapes)}',
                         f'"watchId":{json.dumps(watch)}',
                         f'"msgData":{json.dumps(data)}',
                         *[f'{json.dumps(k)}:{json.dumps(v)}' for k, v in extra]])
         + ',"deep":' + "[" * depth + "]" * depth + "}"),
        binary),
    MSG_TYPES, st.lists(st.booleans(), max_size=12),
    st.one_of(st.text(max_size=6), st.integers()),
    st.fixed_dictionaries({"envId": st.sampled_from(["fz", "other", 1])}),
    st.lists(st.tuples(st.sampled_from(["msgType", "watchId", "x"]), JSON_SCALARS),
             max_size=2),
    st.one_of(st.just(0), st.integers(0, 20), st.just(5000)),
    st.booleans(),
)


@given(frame=FRAMES)
def test_no_frame_the_upstream_reads_as_a_watch_passes_as_something_else(frame):
    text, binary = frame
    data = text.encode()
    # What a Node upstream does: JSON.parse(String(buffer)), duplicate keys last-wins.
    as_read = data.decode("utf-8", errors="replace") if binary else text
    try:
        upstream_sees = json.loads(as_read)
    except (ValueError, RecursionError):
        upstream_sees = None
    seen = frames.read_frame(as_read)
    a_message = (isinstance(upstream_sees, dict)
                 and upstream_sees.get("msgType") in frames.CLIENT_TYPES)
    # The gateway either reads the same message or refuses the frame unread.
    if a_message and seen is not frames.UNREADABLE:
        assert isinstance(seen, dict)
        assert seen["msgType"] == upstream_sees["msgType"]
        assert seen.get("watchId") == upstream_sees.get("watchId")
        assert seen.get("msgData") == upstream_sees.get("msgData")


# ---------------------------------------------------- end to end: quotagate serve, raw bytes


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Deployed, str]]:
    upstream, origin = start_upstream()
    directory = tmp_path_factory.mktemp("fuzz")
    config = shipped_config(directory, origin)
    deployed = asyncio.run(serve(directory, config))
    period = f"plan: standard\nanchor: {days(-5)}\nexpires: {days(300)}\n"
    deployed.put_env("fz", period)
    deployed.put_env("other", period)
    yield deployed, origin
    log = deployed.stop()
    upstream.kill()
    upstream.wait()
    assert "Traceback" not in log, log[-3000:]


def _get_json(url: str, token: bool = False) -> Any:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"}
                                     if token else {})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


_DECIDED = re.compile(r'^quotagate_decisions_total\{reason="[^"]*",result="(admitted)"'
                      r'\} ([0-9.e+]+)$', re.M)


def _passed_on(deployed: Deployed) -> float:
    """Requests the gateway admitted (decided and counted; free preflights too)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{deployed.admin}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(n) for _, n in _DECIDED.findall(text))


def _served(origin: str) -> int:
    return sum(_get_json(origin + "/_served").values())


def _exchange(port: int, raw: bytes) -> int | None:
    """Send ``raw``, read to the end; the final (non-1xx) status, None if none came."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(raw)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    for status in re.findall(rb"^HTTP/1\.[01] (\d{3})", b"".join(chunks), re.M):
        if not status.startswith(b"1"):
            return int(status)
    return None


BODY_KEYS = st.sampled_from(["action", "Action", "env", "envName", "ENV", "function_name",
                             "stream", "STREAM", "data"])
BODY_VALUES = st.one_of(
    st.sampled_from(["functions.invokeFunction", "database.queryDocument", "storage.getFile",
                     "auth.signIn", "ai.chat", "FUNCTIONS.x", "bogus", "fz", "other", "FZ",
                     "f", "../x", "", True, False, "true", 1, None]),
    JSON_SCALARS)
BODIES = st.one_of(
    st.just(b""),
    st.builds(lambda pairs: ("{" + ",".join(f"{json.dumps(k)}:{json.dumps(v)}"
                                            for k, v in pairs) + "}").encode(),
              st.lists(st.tuples(BODY_KEYS, BODY_VALUES), max_size=6)),
    st.binary(max_size=64),
    st.integers(1, 4000).map(lambda n: b'{"action":' + b"[" * n + b"]" * n + b"}"),
)
EXTRA_HEADERS = st.lists(st.sampled_from([
    ("Accept", "text/event-stream"), ("Accept", "*/*"), ("Origin", "https://a.example"),
    ("Access-Control-Request-Method", "POST"), ("Content-Encoding", "gzip"),
    ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("Expect", "100-continue"),
    ("Transfer-Encoding", "chunked"), ("Content-Type", "application/json"),
    ("X-Invocation-Type", "Event")]), max_size=3, unique=True) | st.just(
        [("Origin", "https://a.example"), ("Access-Control-Request-Method", "POST")])


#: End to end, well-formed parts are drawn as often as hostile ones: else nearly every request
#: is a 400 and the paths past the environment check go untried.
_NAMED = st.sampled_from(["fz.api.tcloudbasegateway.com",
                          "fz.ap-shanghai.tcb-api.tencentcloudapi.com"])


@given(method=st.sampled_from(["GET", "POST", "OPTIONS", "PUT", "DELETE", "HEAD", "FOO"]),
       path=PATHS | st.sampled_from(PREFIXES).map(lambda p: p + "f"),
       query=st.just("") | QUERIES, host=_NAMED | HOSTS,
       env_headers=st.just([]) | ENV_HEADERS, extra=st.just([]) | EXTRA_HEADERS,
       body=BODIES)
def test_no_request_is_a_500_or_reaches_the_upstream_uncounted(served, method, path, query,
                                                               host, env_headers, extra, body):
    deployed, origin = served
    before = (_served(origin), _passed_on(deployed))
    headers = [("Host", host), *env_headers, *extra, ("Connection", "close")]
    if ("Transfer-Encoding", "chunked") in extra:
        payload = (f"{len(body):x}\r\n".encode() + body + b"\r\n" if body else b"") + b"0\r\n\r\n"
    else:
        payload = body
        headers.append(("Content-Length", str(len(body))))
    target = path + (f"?{query}" if query else "")
    raw = (f"{method} {target} HTTP/1.1\r\n".encode()
           + b"".join(f"{k}: {v}\r\n".encode() for k, v in headers) + b"\r\n" + payload)
    status = _exchange(deployed.port, raw)
    event(f"status {status}")
    assert status is not None and status != 500 and status < 502, status
    after = (_served(origin), _passed_on(deployed))
    reached, counted = after[0] - before[0], after[1] - before[1]
    assert reached == counted, (status, reached, counted)


ADMIN_VALUES = st.recursive(
    st.one_of(JSON_SCALARS, st.sampled_from(["standard", "free", "2026-11-01", "2099-01-01",
                                             "Asia/Shanghai", "enforce", 2**53, 2**64, -1])),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["calls", "qps", "capacity_gb", "id", "pack", "purchased",
                                 "meter", "amount", "start", "days", "memory_mb", "x"]),
                                inner, max_size=4)),
    max_leaves=12)
ENV_BODIES = st.dictionaries(
    st.sampled_from(["plan", "anchor", "expires", "overage", "limits", "packs", "promos",
                     "timezone", "mode", "functions", "bogus"]),
    ADMIN_VALUES, max_size=7)


def _admin(deployed: Deployed, method: str, path: str, body: bytes | None) -> tuple[int, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{deployed.admin}/admin/v1{path}", data=body, method=method,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@given(env_id=st.one_of(st.just("fzadmin"), st.text(max_size=8).map(
           lambda t: urllib.request.quote(t, safe=""))),
       body=st.one_of(ENV_BODIES.map(lambda d: json.dumps(d).encode()), st.binary(max_size=40)),
       what=st.sampled_from(["PUT ", "POST /packs", "POST /promos", "POST /plan/quote",
                             "PUT /overage", "POST /renew"]))
def test_no_admin_body_is_a_500_and_a_refused_one_changes_nothing(served, env_id, body, what):
    deployed, _ = served
    method, _, tail = what.partition(" ")
    target = "fz" if tail else env_id
    before = [_admin(deployed, "GET", f"/envs/{e}", None) for e in ("fz", target)]
    status, answer = _admin(deployed, method, f"/envs/{target}{tail}", body)
    assert status < 500, (status, answer)
    if status >= 400:
        assert answer["status"] == status and answer["detail"]  # a problem that says why
        assert [_admin(deployed, "GET", f"/envs/{e}", None) for e in ("fz", target)] == before
    elif not tail:  # a new environment that validated: remove nothing, it is harmless
        assert _admin(deployed, "GET", f"/envs/{target}", None)[0] == 200


@given(records=st.lists(st.dictionaries(
    st.sampled_from(["id", "env", "meter", "amount", "at"]),
    st.one_of(ADMIN_VALUES, st.sampled_from(["fz", "ai_tokens", "outbound_bytes",
                                             "capacity_bytes", "calls"])), max_size=5),
    max_size=4))
def test_no_ingestion_batch_is_a_500(served, records):
    deployed, _ = served
    status, answer = _admin(deployed, "POST", "/usage",
                            json.dumps({"records": records}).encode())
    assert status < 500, (status, answer)


async def test_the_demo_upstream_reads_a_body_nested_past_the_stack_as_no_stream() -> None:
    """The fuzz test's upstream (the demo's) parses an /ai/ body for {"stream": true}: a body
    nested deeper than Python's stack (found by the fuzz test: a 500 of the upstream's own,
    passed on) is no stream request, answered as any other."""
    from aiohttp.test_utils import TestClient, TestServer

    from quotagate.demo.upstream import make_upstream_app

    async with TestClient(TestServer(make_upstream_app())) as client:
        for n in (981, 5000):
            body = b'{"action":' + b"[" * n + b"]" * n + b"}"
            resp = await client.post("/ai/f", data=body,
                                     headers={"Content-Type": "application/json"})
            assert resp.status == 200, n
