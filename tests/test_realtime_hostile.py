"""Hostile realtime clients against a real Node ``ws`` upstream (issue 12): the stub platform
of tests/sdk/platform.js reads every frame as a realtime backend does, JSON.parse(String(data)),
binary or text, and counts the watches it opened. Through ``quotagate serve`` with the shipped
config (realtime at ``/``): no frame opens a watch there that the gateway did not count, and
no socket reaches it before a LOGIN names an admitted environment."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml

from tests.deployed import Deployed, days, serve, shipped_config

pytestmark = pytest.mark.deployed

SDK = Path(__file__).resolve().parent / "sdk"
CAP = 2


@pytest.fixture(scope="module")
def platform() -> Iterator[int]:
    node = shutil.which("node")
    assert node and (SDK / "node_modules" / "ws").is_dir(), \
        "Node and tests/sdk's packages (scripts/test runs npm ci) are needed"
    proc = subprocess.Popen([node, "platform.js", "0", ""], cwd=SDK, stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    yield json.loads(proc.stdout.readline())["port"]
    proc.terminate()
    proc.wait(10)


def saw(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/__stats", timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory, platform: int
                  ) -> AsyncIterator[Deployed]:
    directory = tmp_path_factory.mktemp("rt-hostile")
    config = shipped_config(directory, f"http://127.0.0.1:{platform}")
    for route in config["routes"]:
        if route["kind"] == "realtime":
            route["login_timeout_ms"] = 2000
    (directory / "gateway.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    period = f"anchor: {days(-5)}, expires: {days(300)}"
    (directory / "environments.yaml").write_text(f"""environments:
  live:  {{plan: standard, {period}, limits: {{realtime: {CAP}}}}}
  other: {{plan: standard, {period}}}
""")
    served = await serve(directory, config)
    yield served
    served.stop()


def watch(wid: str, env: str = "live", **extra: object) -> dict:
    return {"watchId": wid, "requestId": f"r-{wid}", "msgType": "INIT_WATCH",
            "msgData": {"envId": env, "collName": "c", "query": "{}"}, **extra}


async def answers(ws: aiohttp.ClientWebSocketResponse, n: int) -> list[dict]:
    out = []
    async with asyncio.timeout(10):
        while len(out) < n:
            msg = await ws.receive()
            assert msg.type is aiohttp.WSMsgType.TEXT, msg
            out.append(json.loads(msg.data))
    return out


async def logged_in(session: aiohttp.ClientSession, gateway: Deployed
                    ) -> aiohttp.ClientWebSocketResponse:
    ws = await session.ws_connect(f"ws://127.0.0.1:{gateway.port}/")
    await ws.send_str(json.dumps({"requestId": "login", "msgType": "LOGIN",
                                  "msgData": {"envId": "live"}}))
    [res] = await answers(ws, 1)
    assert res["msgType"] == "LOGIN_RES", res
    return ws


async def test_no_spelling_of_init_watch_opens_an_uncounted_watch(gateway, platform):
    before = saw(platform)["inits"]
    async with aiohttp.ClientSession() as session:
        ws = await logged_in(session, gateway)
        # Binary, as a Node upstream reads it too: counted, the first slot.
        await ws.send_bytes(json.dumps(watch("w1")).encode())
        # msgType spelled with a JSON escape: counted, the second.
        await ws.send_str(json.dumps(watch("w2")).replace("INIT_WATCH", "INIT_\\u0057ATCH"))
        opened = await answers(ws, 2)
        assert sorted(a["msgType"] for a in opened) == ["INIT_EVENT", "INIT_EVENT"], opened
        # Too deep for the gateway to read: refused unread, whatever it seems to say.
        deep = json.dumps(watch("w3"))[:-1] + ', "x": ' + "[" * 3000 + "]" * 3000 + "}"
        await ws.send_str(deep)
        # Not UTF-8 (read with replacement, as Node's String(buffer)): counted, over the cap.
        await ws.send_bytes(json.dumps(watch("w4", note="\udcff"), ensure_ascii=False)
                            .encode("utf-8", "surrogateescape"))
        await ws.send_str(json.dumps(watch("w5")))                 # plainly over the cap
        await ws.send_bytes(json.dumps(watch("w6")).encode())      # and binary
        refused = await answers(ws, 4)
        codes = [(a["msgType"], a["msgData"]["code"]) for a in refused]
        assert codes[0] == ("ERROR", "INVALID_FRAME"), codes
        assert codes[1:] == [("ERROR", "REALTIME_CONNECTION_LIMIT_EXCEEDED")] * 3, codes
        # A held watchId re-sent as another environment's.
        await ws.send_str(json.dumps(watch("w1", env="other")))
        [mismatch] = await answers(ws, 1)
        assert mismatch["msgData"]["code"] == "ENVIRONMENT_MISMATCH", mismatch
        await asyncio.sleep(0.3)  # anything forwarded would have reached the platform by now
        assert saw(platform)["inits"] - before == CAP  # the 2 counted, nothing else
        await ws.close()


async def test_sockets_that_never_log_in_never_reach_the_upstream(gateway, platform):
    for _ in range(100):  # the sockets of earlier tests are closed upstream
        before = saw(platform)
        if before["openSockets"] == 0:
            break
        await asyncio.sleep(0.05)
    assert before["openSockets"] == 0
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sockets = []
        for _ in range(200):  # each sends its frames at once (its login deadline runs)
            ws = await session.ws_connect(f"ws://127.0.0.1:{gateway.port}/")
            sockets.append(ws)
            await ws.send_str(json.dumps({"requestId": "p", "msgType": "PING",
                                          "msgData": None}))
            await ws.send_str(json.dumps({"requestId": "c", "msgType": "CHECK_LAST",
                                          "msgData": {"queryID": "q"}}))
            await ws.send_bytes(json.dumps(watch("sneak")).encode())
        for ws in sockets:
            got = await answers(ws, 3)
            assert [a["msgType"] for a in got] == ["PONG", "ERROR", "ERROR"], got
            assert {a["msgData"]["code"] for a in got[1:]} == {"ENVIRONMENT_REQUIRED"}
        now = saw(platform)
        assert now["openSockets"] == before["openSockets"]
        assert now["logins"] == before["logins"] and now["inits"] == before["inits"]
        # At the login deadline (2 s here) each is told why and closed, 1008: the code of the
        # close frame the gateway sent (the client's own close_code turns 1006 when its reply
        # to that frame cannot be written any more, as on a busy machine it may not be).
        async with asyncio.timeout(10):
            codes = set()
            for ws in sockets:
                [told] = await answers(ws, 1)
                assert told["msgData"]["code"] == "ENVIRONMENT_REQUIRED", told
                closing = await ws.receive()
                assert closing.type is aiohttp.WSMsgType.CLOSE, closing
                codes.add(closing.data)
        assert codes == {1008}
