"""Watch slots: each watch a realtime socket opens holds one leased realtime slot (``rt:``) of
its environment, taken in the same script call that checks lifecycle, QPS and calls.

- ``INIT_WATCH`` (and ``REBUILD_WATCH`` of a watch not held on this socket) takes one; refused,
  it is answered with an ``ERROR`` frame for that ``watchId``/``requestId`` and not forwarded —
  the socket and its other watches stay up; a refusal because the environment is isolated or
  gone ends the socket;
- ``CLOSE_WATCH``, the socket's close, or any upstream ``ERROR`` for a held watch frees it (the
  SDK drops a watch on a server ERROR without sending CLOSE_WATCH), and a watch no longer
  counted is closed upstream too.

``WatchSlots`` is the part of a socket (``relay.RealtimeSocket``) that does this: the socket
relays, these methods count.
"""

from __future__ import annotations

import asyncio
from typing import Any

from quotagate.common import metrics
from quotagate.gateway.decisions import decide
from quotagate.gateway.problems import Problem, refusal
from quotagate.gateway.realtime.frames import (
    ENDS_SOCKET,
    ERROR_CODES,
    MAX_WATCH_ID,
    close_watch_frame,
    decode,
    msg_env,
    watch_id,
)
from quotagate.gateway.routing import CompiledRoute
from quotagate.gateway.state import GatewayState
from quotagate.limiter.limiter import Decision

#: The realtime slot a watch (or, with ``realtime_unit: socket``, a socket) holds.
SLOT = "rt:"


class WatchSlots:
    """The watches of one socket that hold a slot, and the decisions that take them."""

    # The socket's, set by RealtimeSocket (relay.py).
    state: GatewayState
    route: CompiledRoute
    env: str | None
    counting: bool
    closing: bool

    def __init__(self) -> None:
        #: Watches of this socket holding a slot.
        self.held: set[str] = set()
        #: Held watches whose INIT_WATCH the upstream has not answered yet: watchId ->
        #: requestId. Only an upstream ERROR answering it frees the slot.
        self.unanswered: dict[str, Any] = {}

    # What the socket does for them (relay.py).

    async def _up(self, data: str | bytes) -> None:
        raise NotImplementedError

    async def _refuse(self, frame: dict[str, Any], code: str, message: str) -> None:
        raise NotImplementedError

    async def _send_error(self, wid: str | None, request_id: Any, code: str,
                          message: str) -> None:
        raise NotImplementedError

    def end_environment(self, status: str) -> None:
        raise NotImplementedError

    # ----------------------------------------------------------------------- taking a slot

    async def _open_watch(self, frame: dict[str, Any], data: str | bytes) -> None:
        wid = watch_id(frame)
        if wid is None:  # an uncountable watch is never forwarded
            await self._refuse(frame, "INVALID_FRAME",
                               f"{frame['msgType']} needs a watchId string of 1 to "
                               f"{MAX_WATCH_ID} characters")
            return
        # Frames of the protocol reach here only once the environment is named (the upgrade,
        # or a LOGIN before the upstream was connected).
        assert self.env is not None
        named = msg_env(frame)
        if named is not None and named != self.env:
            await self._refuse(frame, "ENVIRONMENT_MISMATCH",
                               f"this socket belongs to environment {self.env}")
            return
        if wid in self.held:  # a rebuild (or a repeat) of a held watch takes nothing more
            await self._up(data)
            return
        if not self.counting:
            await self._up(data)
            return
        decision = await self._decide(self.env, self.route.cost, SLOT, frame)
        if decision is None:
            return
        if self.closing:  # the socket ended while the store answered
            if decision.slot_held:
                self.state.limiter.release(self.env, SLOT)
            return
        if not await self._admitted(decision, frame):
            if decision.slot_held:  # (never: a refusal takes no slot)
                self.state.limiter.release(self.env, SLOT)
            return
        if decision.slot_held:
            self.held.add(wid)
            self.unanswered[wid] = frame.get("requestId")
            metrics.REALTIME_WATCHES.inc()
        await self._up(data)

    async def _decide(self, env: str, cost: int, slot: str,
                      frame: dict[str, Any]) -> Decision | None:
        """The decision, or None after answering a store failure (fail-closed)."""
        decision = await decide(self.state.limiter, env, "realtime", cost, slot)
        if isinstance(decision, Problem):
            await self._refuse(frame, "STORE_UNAVAILABLE", decision.detail)
            return None
        if decision.admitted:  # the environment's bandwidth, for the frames to this socket
            self.state.limiter.bandwidth.rate_of(env, decision.bandwidth,
                                                 decision.store_bypassed)
        return decision

    async def _admitted(self, decision: Decision, frame: dict[str, Any]) -> bool:
        """True if admitted; else answers with the ERROR frame (and ends the socket when the
        environment is isolated or gone)."""
        if decision.admitted:
            return True
        code = ERROR_CODES.get(decision.outcome, "REFUSED")
        metrics.REALTIME_REFUSED.labels(code).inc()
        problem = refusal(decision, self.env or msg_env(frame) or "")
        await self._send_error(watch_id(frame), frame.get("requestId"), code, problem.detail)
        if decision.outcome in ENDS_SOCKET:
            self.end_environment(code)
        return False

    # -------------------------------------------------------------------- giving one back

    def _close_watch(self, frame: dict[str, Any]) -> None:
        """A client's ``CLOSE_WATCH``: the watch's slot back, if it held one."""
        wid = watch_id(frame)
        if wid is not None and wid in self.held:
            self.held.discard(wid)
            self.unanswered.pop(wid, None)
            metrics.REALTIME_WATCHES.dec()
            if self.env is not None:
                self.state.limiter.release(self.env, SLOT)

    def _release_all(self) -> None:
        if self.held and self.env is not None:
            self.state.limiter.release(self.env, SLOT, len(self.held))
            metrics.REALTIME_WATCHES.dec(len(self.held))
        self.held.clear()
        self.unanswered.clear()

    def _upstream_answer(self, data: str) -> None:
        """An upstream ERROR for a held watch: the SDK drops that watch (it sends no
        CLOSE_WATCH), so its slot comes back now. The first event of a held watch marks it
        opened."""
        frame = decode(data)
        if not isinstance(frame, dict):
            return
        wid = frame.get("watchId")
        if not isinstance(wid, str) or wid not in self.held:
            return
        kind = frame.get("msgType")
        if kind == "ERROR":
            self.unanswered.pop(wid, None)
            self.held.discard(wid)
            metrics.REALTIME_WATCHES.dec()
            if self.env is not None:
                self.state.limiter.release(self.env, SLOT)
            # Uncounted from now on, so ended upstream too: a watch the ERROR did not end
            # there (a failed rebuild of an open one) must not go on uncounted. A client that
            # still wants it opens it again, counted.
            self._close_upstream_watch(wid)
        elif kind in ("INIT_EVENT", "NEXT_EVENT", "CHECK_EVENT"):
            self.unanswered.pop(wid, None)  # it opened

    def _close_upstream_watch(self, wid: str) -> None:
        task = asyncio.ensure_future(self._up(close_watch_frame(wid)))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
