"""Redis / Valkey Cluster for the hot path: one auto-pipelined connection per primary, each
decision sent to the primary that serves its environment's slot, redirections followed.

Every key of an environment carries the ``{env}`` hash tag, so one decision is one slot on one
node; the slot map comes from ``CLUSTER SLOTS`` (asked of any node that answers) and is
refreshed when a node answers ``MOVED`` (resharding), when a node fails or times out or
answers ``CLUSTERDOWN`` / ``TRYAGAIN`` (a failover: a dead primary never sends ``MOVED``, its
promoted replica is found only by asking the others), and every ``REFRESH_EVERY_S`` while
there is traffic; failure-driven refreshes at most every ``REFRESH_MIN_S``. ``ASK`` (a slot
being migrated) is followed for that one command.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any

from redis.crc import key_slot

from quotagate.common.addresses import StoreAddress
from quotagate.limiter.errors import Redirected, StoreError, StoreTimeout, StoreUnavailable
from quotagate.limiter.store import LateCallback, PipelinedStore, pack_command

log = logging.getLogger("quotagate.cluster")

SLOTS = 16384
MAX_REDIRECTS = 3
#: Failure-driven slot-map refreshes at most this often (a dead node fails every request).
REFRESH_MIN_S = 0.5
#: And one at least this often while commands flow (a failover nobody's request noticed).
REFRESH_EVERY_S = 5.0
HostPort = tuple[str, int]


def slot_of(key: str) -> int:
    return int(key_slot(key.encode()))


class ClusterStore:
    """The PipelinedStore interface over a cluster (``submit`` takes the key's slot)."""

    def __init__(self, seed: StoreAddress, *, timeout_ms: int = 200,
                 connect_timeout_ms: int = 500, retry_interval_ms: int = 250):
        self.seed = seed
        self._options = {"timeout_ms": timeout_ms, "connect_timeout_ms": connect_timeout_ms,
                         "retry_interval_ms": retry_interval_ms}
        self.timeout = timeout_ms / 1000
        self.retry_interval = retry_interval_ms / 1000
        self._setup: tuple[bytes, ...] = ()
        self.nodes: dict[HostPort, PipelinedStore] = {}
        self.slots: list[HostPort | None] = [None] * SLOTS
        self._refresh: asyncio.Task[None] | None = None
        #: monotonic time of the last slot-map refresh started.
        self._refreshed_at = 0.0
        self.refreshes = 0
        self._tasks: set[asyncio.Task[None]] = set()
        #: Outer futures that timed out -> the node future that did.
        self._timed_out: dict[asyncio.Future[Any], tuple[PipelinedStore, asyncio.Future[Any]]] = {}

    @property
    def setup(self) -> tuple[bytes, ...]:
        return self._setup

    @setup.setter
    def setup(self, commands: tuple[bytes, ...]) -> None:
        self._setup = commands
        for node in self.nodes.values():
            node.setup = commands

    def node(self, where: HostPort) -> PipelinedStore:
        store = self.nodes.get(where)
        if store is None:
            address = dataclasses.replace(self.seed, host=where[0], port=where[1], db=0)
            store = PipelinedStore(address, setup=self._setup, **self._options)
            self.nodes[where] = store
        return store

    # -------------------------------------------------------------------- slot map

    async def refresh(self) -> None:
        """Load the slot map from any node that answers (one refresh at a time)."""
        self._background_refresh()
        assert self._refresh is not None
        await asyncio.shield(self._refresh)

    async def _load_slots(self) -> None:
        self.refreshes += 1
        # Nodes that served a slot last time first, the seed last; each fails fast if down.
        candidates = [*self.nodes, (self.seed.host, self.seed.port)]
        errors = []
        for where in dict.fromkeys(candidates):
            try:
                reply = await self.node(where).execute("CLUSTER", "SLOTS")
            except StoreError as exc:
                errors.append(f"{where[0]}:{where[1]}: {exc}")
                continue
            slots: list[HostPort | None] = [None] * SLOTS
            for entry in reply:
                start, end, primary = entry[0], entry[1], entry[2]
                host = primary[0].decode() if primary[0] else where[0]
                for slot in range(start, end + 1):
                    slots[slot] = (host, int(primary[1]))
            self.slots = slots
            return
        raise StoreUnavailable("no cluster node answered CLUSTER SLOTS: " + "; ".join(errors))

    # -------------------------------------------------------------------- commands

    def submit(self, packed: bytes, slot: int | None = None) -> asyncio.Future[Any]:
        outer: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        if time.monotonic() - self._refreshed_at > REFRESH_EVERY_S:
            self._background_refresh()
        self._dispatch(packed, slot, outer, 0, None)
        return outer

    def _dispatch(self, packed: bytes, slot: int | None, outer: asyncio.Future[Any],
                  redirects: int, ask: HostPort | None) -> None:
        where = ask or (self.slots[slot] if slot is not None else self._any())
        if where is None:  # no slot map yet: load it, then send
            task = asyncio.get_running_loop().create_task(
                self._dispatch_after_refresh(packed, slot, outer, redirects))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        store = self.node(where)
        if ask is not None:
            store.submit(pack_command("ASKING"))  # same connection, so it precedes the command
        inner = store.submit(packed)
        inner.add_done_callback(
            lambda f: self._done(f, store, packed, slot, outer, redirects))

    async def _dispatch_after_refresh(self, packed: bytes, slot: int | None,
                                      outer: asyncio.Future[Any], redirects: int) -> None:
        try:
            if (self._refresh is not None and self._refresh.done()
                    and time.monotonic() - self._refreshed_at < REFRESH_MIN_S):
                raise StoreUnavailable(f"cluster slot {slot} is not served (a failover?)")
            await self.refresh()
        except StoreError as exc:
            if not outer.done():
                outer.set_exception(exc)
            return
        where = self.slots[slot] if slot is not None else self._any()
        if where is None:
            if not outer.done():
                outer.set_exception(StoreUnavailable(f"cluster slot {slot} is not served"))
            return
        self._dispatch(packed, slot, outer, redirects, None)

    def _done(self, inner: asyncio.Future[Any], store: PipelinedStore, packed: bytes,
              slot: int | None, outer: asyncio.Future[Any], redirects: int) -> None:
        if outer.done():
            return
        if inner.cancelled():
            outer.cancel()
            return
        exc = inner.exception()
        if exc is None:
            outer.set_result(inner.result())
            return
        if isinstance(exc, Redirected) and redirects < MAX_REDIRECTS:
            target = (exc.host or store.address.host, exc.port)
            if exc.kind == "MOVED":
                self.slots[exc.slot] = target
                self._background_refresh()
                self._dispatch(packed, slot, outer, redirects + 1, None)
            else:
                self._dispatch(packed, slot, outer, redirects + 1, target)
            return
        if isinstance(exc, StoreTimeout):
            if len(self._timed_out) > 100_000:
                self._timed_out.clear()
            self._timed_out[outer] = (store, inner)
        # Down, hung, CLUSTERDOWN: a failover? (A dead primary never answers MOVED.)
        if (isinstance(exc, StoreUnavailable)
                and time.monotonic() - self._refreshed_at >= REFRESH_MIN_S):
            self._background_refresh()
        outer.set_exception(exc)

    def _background_refresh(self) -> None:
        if self._refresh is None or self._refresh.done():
            self._refreshed_at = time.monotonic()
            self._refresh = asyncio.get_running_loop().create_task(self._load_slots())
            self._refresh.add_done_callback(
                lambda t: t.cancelled() or t.exception())  # a failed refresh is retried later

    def node_of(self, slot: int) -> HostPort | None:
        """The primary serving ``slot`` in the slot map as last read (None: not known yet)."""
        return self.slots[slot]

    def _any(self) -> HostPort | None:
        for where in self.slots:
            if where is not None:
                return where
        return None

    def when_late(self, fut: asyncio.Future[Any], callback: LateCallback) -> None:
        found = self._timed_out.pop(fut, None)
        if found is not None:
            found[0].when_late(found[1], callback)
        else:  # not a command a node timed out on: it never ran
            callback(None)

    async def execute(self, *args: bytes | str | int) -> Any:
        return await self.submit(pack_command(*args))

    async def execute_all(self, *args: bytes | str | int) -> list[Any]:
        """Run a command on every primary (SCRIPT LOAD, SCRIPT EXISTS)."""
        if self._any() is None:
            await self.refresh()
        primaries = {w for w in self.slots if w is not None}
        return list(await asyncio.gather(*(self.node(w).execute(*args) for w in primaries)))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for store in self.nodes.values():
            await store.close()
