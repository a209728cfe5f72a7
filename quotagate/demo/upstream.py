"""A small upstream that stands in for the platform's function, database, storage, AI and
realtime endpoints: used by ``quotagate demo``, the tests and the benchmark."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

PAYLOAD = b'{"ok":true}'


async def _ok(request: web.Request) -> web.Response:
    return web.Response(body=PAYLOAD, content_type="application/json")


async def _echo(request: web.Request) -> web.Response:
    """Echo what arrived: method, path, headers and the body's size and content."""
    body = await request.read()
    return web.json_response({
        "method": request.method,
        "path": request.raw_path,
        "headers": {k: v for k, v in request.headers.items()},
        "body_bytes": len(body),
        "body": body.decode(errors="replace")[:1000],
    })


async def _sse(request: web.Request) -> web.StreamResponse:
    """An AI chat answer as server-sent events, one token per event (``pad``: that many more
    bytes in each, for traffic)."""
    events = int(request.query.get("events", "5"))
    delay = float(request.query.get("delay_ms", "20")) / 1000
    pad = "x" * min(int(request.query.get("pad", "0")), 1024 * 1024)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(events):
        event = {"token": f"tok{i}", **({"pad": pad} if pad else {})}
        await response.write(f"data: {json.dumps(event)}\n\n".encode())
        await asyncio.sleep(delay)
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(float(request.query.get("ms", "100")) / 1000)
    return web.Response(body=PAYLOAD, content_type="application/json")


async def _bytes(request: web.Request) -> web.StreamResponse:
    size = int(request.query.get("n", "1024"))
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
    response.content_length = size
    await response.prepare(request)
    chunk = b"x" * 65536
    left = size
    while left > 0:
        await response.write(chunk[: min(left, len(chunk))])
        left -= min(left, len(chunk))
    await response.write_eof()
    return response


async def _upload(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response({"received": total})


@dataclass
class RealtimeStats:
    """What the realtime stub saw: tests read it at ``GET /_realtime``."""

    sockets: int = 0
    open_watches: int = 0
    frames: int = 0
    inits: int = 0
    by_env: dict[str, int] = field(default_factory=dict)
    #: The close code each socket ended with, as this server saw it.
    close_codes: list[int | None] = field(default_factory=list)


REALTIME = web.AppKey("realtime", RealtimeStats)
#: Bodies POSTed to any path ending in /record, in arrival order (GET /_recorded).
RECORDED = web.AppKey("recorded", list)
#: Requests served, by the X-CloudBase-Env the gateway set (GET /_served): what reached the
#: upstream, to hold against what the gateway counted.
SERVED = web.AppKey("served", dict)


async def _realtime(request: web.Request) -> web.WebSocketResponse:
    """The watch protocol (SPEC §8), as a platform's realtime server speaks it.

    LOGIN -> LOGIN_RES; INIT_WATCH / REBUILD_WATCH -> INIT_EVENT, then a NEXT_EVENT every
    ``event_ms`` (query, default 1000; ``pad``: that many more bytes in each, for traffic)
    until CLOSE_WATCH; a watch of collection ``fail`` gets an
    ERROR instead; CHECK_LAST -> CHECK_EVENT; PING -> PONG (a PING with ``msgData.cut``
    drops the connection without a close frame, as a crashed server would); anything else is
    echoed back.
    """
    stats = request.app[REALTIME]
    period = float(request.query.get("event_ms", "1000")) / 1000
    pad = "x" * min(int(request.query.get("pad", "0")), 1024 * 1024)
    ws = web.WebSocketResponse(protocols=("watch.v1",), max_msg_size=64 * 1024 * 1024)
    await ws.prepare(request)
    stats.sockets += 1
    watches: dict[str, asyncio.Task[None]] = {}
    env = request.headers.get("X-CloudBase-Env", "")

    async def send(watch_id: object, request_id: object, kind: str, data: object) -> None:
        await ws.send_str(json.dumps({"watchId": watch_id, "requestId": request_id,
                                      "msgType": kind, "msgData": data}))

    async def events(watch_id: str) -> None:
        seq = 0
        while True:
            await asyncio.sleep(period)
            seq += 1
            await send(watch_id, None, "NEXT_EVENT", {"seq": seq, **({"pad": pad} if pad else {})})

    def stop(watch_id: str) -> None:
        task = watches.pop(watch_id, None)
        if task is not None:
            task.cancel()
            stats.open_watches -= 1

    try:
        async for msg in ws:
            stats.frames += 1
            if msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
                continue
            if msg.type is not WSMsgType.TEXT:
                break
            try:
                frame = json.loads(msg.data)
                kind, wid, rid = frame["msgType"], frame.get("watchId"), frame.get("requestId")
                data = frame.get("msgData") or {}
            except (ValueError, KeyError, TypeError, AttributeError):
                await ws.send_str(msg.data)  # not the protocol: echoed
                continue
            if kind == "LOGIN":
                env = data.get("envId", env)
                await send(None, rid, "LOGIN_RES", {"envId": env, "ok": True})
            elif kind in ("INIT_WATCH", "REBUILD_WATCH"):
                stats.inits += 1
                if data.get("collName") == "fail":
                    await send(wid, rid, "ERROR", {"code": "WATCH_FAILED", "message": "no"})
                    continue
                await send(wid, rid, "INIT_EVENT", {"docs": [], "envId": env})
                if wid not in watches:
                    stats.open_watches += 1
                    stats.by_env[env] = stats.by_env.get(env, 0) + 1
                    watches[wid] = asyncio.ensure_future(events(wid))
            elif kind == "CLOSE_WATCH":
                stop(wid)
            elif kind == "CHECK_LAST":
                await send(wid, rid, "CHECK_EVENT", {})
            elif kind == "PING" and isinstance(data, dict) and data.get("cut"):
                if request.transport is not None:
                    request.transport.abort()
                break
            elif kind == "PING":
                await send(None, rid, "PONG", {})
            else:
                await ws.send_str(msg.data)
    finally:
        for wid in list(watches):
            stop(wid)
        stats.sockets -= 1
        stats.close_codes.append(ws.close_code)
    return ws


async def _realtime_stats(request: web.Request) -> web.Response:
    stats = request.app[REALTIME]
    return web.json_response({"sockets": stats.sockets, "open_watches": stats.open_watches,
                              "frames": stats.frames, "inits": stats.inits,
                              "close_codes": stats.close_codes})


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    if path == "/_served":
        return web.json_response(request.app[SERVED])
    served = request.app[SERVED]
    env = request.headers.get("X-CloudBase-Env", "")
    served[env] = served.get(env, 0) + 1
    if request.headers.get("Upgrade", "").lower() == "websocket":
        return await _realtime(request)
    if path == "/_realtime":
        return await _realtime_stats(request)
    if path == "/_recorded":
        return web.json_response(request.app[RECORDED])
    if path.endswith("/record"):
        request.app[RECORDED].append({"path": request.raw_path,
                                      "body": (await request.read()).decode(errors="replace"),
                                      "replayed": request.headers.get("X-Quotagate-Replayed")})
        return await _ok(request)
    if request.method == "HEAD":  # headers only (a streamed body would break the exchange)
        return web.Response(content_type="application/json")
    if "text/event-stream" in request.headers.get("Accept", "") or path.endswith("/sse"):
        return await _sse(request)
    if path.startswith("/ai/") and request.can_read_body:  # OpenAI-style {"stream": true}
        try:
            asked = json.loads(await request.read()).get("stream") is True
        except (ValueError, AttributeError, RecursionError):  # (nested past the C stack: not
            asked = False                                     # a stream request either)
        if asked:
            return await _sse(request)
    demo = request.query.get("demo")  # for fixed paths (the SDKs' /web, /admin)
    if demo == "echo":
        return await _echo(request)
    if demo == "slow":
        return await _slow(request)
    if path.endswith("/echo"):
        return await _echo(request)
    if path.endswith("/slow"):
        return await _slow(request)
    if path.endswith("/bytes"):
        return await _bytes(request)
    if path.endswith("/upload"):
        return await _upload(request)
    return await _ok(request)


def make_upstream_app() -> web.Application:
    app = web.Application(client_max_size=1024**3)
    app[REALTIME] = RealtimeStats()
    app[RECORDED] = []
    app[SERVED] = {}
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app


def main(argv: list[str] | None = None) -> None:
    """``python -m quotagate.demo.upstream --port 9001`` (the compose file's upstream)."""
    import argparse

    parser = argparse.ArgumentParser(description="quotagate's demo upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9001)
    args = parser.parse_args(argv)
    web.run_app(make_upstream_app(), host=args.host, port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
