"""Requests that may be answered with a stream (an AI chat over SSE costs 50 calls, SPEC §3).

The cost is decided on the request's intent, whatever else its headers say: ``Accept`` naming
``text/event-stream``, ``stream=true`` in the query, or a top-level ``"stream"`` member that is
not false in its JSON body (read up to the route's ``stream_probe_bytes``, as OpenAI-style
APIs take it). A request that asks for a stream is decided at ``stream_cost``, so a quota that
cannot cover it refuses before the upstream. So is one whose intent cannot be read (a body
longer than the probe, compressed, or not JSON to this parser): the difference is given back
after a response that is no stream. A request decided at ``cost`` that is answered with a
stream anyway (a flag spelled where nobody looks) is charged the difference after it: never
free.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

from aiohttp import web
from multidict import MultiMapping

#: Response media types that are streams.
STREAM_TYPES = frozenset({"text/event-stream", "application/x-ndjson", "application/jsonl",
                          "application/stream+json"})
#: Values of a ``stream`` member or parameter that do not ask for a stream.
_NOT_STREAM = frozenset({"", "0", "false", "no", "off", "null"})


def is_stream_type(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in STREAM_TYPES


def asks_by_headers(headers: Mapping[str, str], query: MultiMapping[str]) -> bool:
    """``Accept: text/event-stream`` (any case, any parameters) or ``?stream=true``."""
    if "text/event-stream" in headers.get("Accept", "").lower():
        return True
    return any(asks_by_value(value) for value in query.getall("stream", ()))


def asks_by_value(value: str) -> bool:
    """A ``stream`` parameter's value that asks for a stream."""
    return value.strip().lower() not in _NOT_STREAM


def _asks(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in _NOT_STREAM
    return value is not None and value is not False and value != 0


def asks_by_body(body: bytes) -> bool | None:
    """A top-level ``stream`` member (any case: some parsers match keys without it; any
    occurrence: parsers disagree on which of two wins) that is not false: True; none: False;
    None when the body cannot be read as JSON (another parser might read it, and find one)."""
    if b"tream" not in body.lower() and b"\\u" not in body and b"\x00" not in body[:4]:
        return False  # no parser could find the member (UTF-16/32 aside): the common case
    try:  # objects become ("pairs", [...]): every member seen, duplicates included
        decoded = json.loads(body, object_pairs_hook=lambda items: ("pairs", items))
    except (ValueError, RecursionError):
        return None
    if not (isinstance(decoded, tuple) and decoded[0] == "pairs"):
        return False  # JSON, not an object: no member at all
    return any(key.casefold() == "stream" and _asks(value) for key, value in decoded[1])


def readable(request: web.Request) -> bool:
    """Whether the body can be read as it is (not compressed or otherwise encoded)."""
    return request.headers.get("Content-Encoding", "identity").strip().lower() == "identity"


async def read_prefix(request: web.Request, limit: int) -> tuple[bytes, bool]:
    """The body if it is at most ``limit`` bytes (and True), else the first bytes read of it
    (and False: one more than ``limit`` tells it is longer)."""
    if not request.body_exists:
        return b"", True
    if limit == 0:
        return b"", False
    chunks: list[bytes] = []
    size = 0
    while size <= limit:
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks), False


async def rest_of_body(prefix: bytes, request: web.Request) -> AsyncIterator[bytes]:
    """The body as the client sends it: the prefix read already, then the rest as it comes."""
    if prefix:
        yield prefix
    async for chunk in request.content.iter_any():
        yield chunk
