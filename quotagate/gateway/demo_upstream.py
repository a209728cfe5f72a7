"""A small upstream that stands in for the platform's function, database, storage and AI
endpoints: used by ``quotagate demo``, the tests and the benchmark."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web

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
    """An AI chat answer as server-sent events, one token per event."""
    events = int(request.query.get("events", "5"))
    delay = float(request.query.get("delay_ms", "20")) / 1000
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    for i in range(events):
        await response.write(f"data: {json.dumps({'token': f'tok{i}'})}\n\n".encode())
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


async def _dispatch(request: web.Request) -> web.StreamResponse:
    path = request.path
    if "text/event-stream" in request.headers.get("Accept", ""):
        return await _sse(request)
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
    app.router.add_route("*", "/{tail:.*}", _dispatch)
    return app
