"""The realtime watch protocol's frames (SPEC §8): what a client sends, read as the upstream
would read it, and the frames and close codes the gateway writes itself. No I/O here.

Every frame is JSON ``{watchId, requestId, msgType, msgData}``; the client's types are
``CLIENT_TYPES``. The gateway answers a refusal with an ``ERROR`` frame (``error_frame``, its
``msgData.code`` one of ``ERROR_CODES`` or a code of its own), a ``PING`` before ``LOGIN``
with a ``PONG``, and ends an upstream watch whose slot went back with its own
``CLOSE_WATCH``.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from quotagate.limiter.codes import Outcome

CLIENT_TYPES = frozenset(
    {"LOGIN", "INIT_WATCH", "REBUILD_WATCH", "CHECK_LAST", "CLOSE_WATCH", "PING"})
MAX_WATCH_ID = 256
#: Close code when the gateway ends a socket because its environment is isolated or gone: the
#: platform SDK's "stop, do not reconnect" code.
ENV_ENDED_CLOSE = 3050


def wire_close_code(code: int | None, *, lost: int) -> int:
    """A close code that may be sent (RFC 6455 §7.4.1 keeps 1005, 1006 and 1015 off the
    wire): ``lost`` for a peer that went away without a close frame (1006, 1015, none), 1000
    for a close frame without a code (1005)."""
    if code is None or code in (1006, 1015):
        return lost
    if code in (0, 1005):  # aiohttp reports a close frame without a code as 0
        return 1000
    return code


#: ERROR frame codes for refused decisions.
ERROR_CODES = {
    Outcome.CONCURRENCY_EXCEEDED: "REALTIME_CONNECTION_LIMIT_EXCEEDED",
    Outcome.QPS_EXCEEDED: "QPS_LIMIT_EXCEEDED",
    Outcome.QUOTA_EXCEEDED: "QUOTA_EXCEEDED",
    Outcome.ISOLATED: "ENVIRONMENT_ISOLATED",
    Outcome.NOT_STARTED: "ENVIRONMENT_ISOLATED",
    Outcome.NOT_FOUND: "ENVIRONMENT_NOT_FOUND",
}
#: Refusals that end the socket (its environment is isolated or gone), not only the frame.
ENDS_SOCKET = {Outcome.ISOLATED, Outcome.NOT_STARTED, Outcome.NOT_FOUND}

_decoder = msgspec.json.Decoder()
UNREADABLE = object()


def decode(data: str) -> Any:
    """JSON as the upstream would read it: msgspec first (fast); what it refuses but other
    parsers accept (lone surrogates, 1e400, NaN) through the stdlib's lenient parser;
    ``UNREADABLE`` if neither can (not JSON, or nested too deep to inspect)."""
    try:
        return _decoder.decode(data)
    except (msgspec.DecodeError, RecursionError):
        pass
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return UNREADABLE


def read_frame(data: str) -> dict[str, Any] | object | None:
    """The frame as a protocol message; None if it is not one; ``UNREADABLE`` if it cannot
    be read at all."""
    frame = decode(data)
    if frame is UNREADABLE:
        return UNREADABLE
    if isinstance(frame, dict) and frame.get("msgType") in CLIENT_TYPES:
        return frame
    return None


def watch_id(frame: dict[str, Any]) -> str | None:
    wid = frame.get("watchId")
    return wid if isinstance(wid, str) and 0 < len(wid) <= MAX_WATCH_ID else None


def msg_env(frame: dict[str, Any]) -> Any:
    data = frame.get("msgData")
    return data.get("envId") if isinstance(data, dict) else None


def error_frame(wid: str | None, request_id: Any, code: str, message: str) -> str:
    """The gateway's ``ERROR`` frame for a watch (``wid``) or the socket (None)."""
    return msgspec.json.encode({
        "watchId": wid, "requestId": request_id, "msgType": "ERROR",
        "msgData": {"code": code, "message": message},
    }).decode()


def pong_frame(request_id: Any) -> str:
    """The answer to a ``PING`` sent before ``LOGIN`` (nothing goes upstream before it)."""
    return msgspec.json.encode({
        "requestId": request_id, "msgType": "PONG", "msgData": None}).decode()


def close_watch_frame(wid: str) -> str:
    """The gateway's own ``CLOSE_WATCH``, to the upstream, for a watch no longer counted."""
    return msgspec.json.encode({"watchId": wid, "requestId": f"quotagate-close-{wid}",
                                "msgType": "CLOSE_WATCH", "msgData": None}).decode()
