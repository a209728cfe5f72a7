"""The limiter's interface to the gateway: ``decide`` before a request, ``release`` and
``meter`` after it, and the lease renewal of the slots this instance holds.

It knows Redis, Lua, meters, leases and the failure policy, and nothing of HTTP.

Slots (realtime watches, function invocations) are leased to this instance: ``held`` is what it
holds, per environment and slot; a renewal writes those counts, absolute, for all its
environments in one script call per batch, so the store converges on the truth every interval
whatever was lost in between (a timed-out call, a store restart, a lease reaped while this
instance could not reach the store).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Literal, NamedTuple

from quotagate.common import metrics
from quotagate.common.aio import stop_if_cancelling
from quotagate.common.clock import Clock, ScriptTime, StoreClock, script_arg
from quotagate.limiter import keys
from quotagate.limiter.cluster import ClusterStore, slot_of
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.errors import (
    NoFunctions,
    NoScript,
    OutOfMemory,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from quotagate.limiter.journal import COMPACT_BYTES, Journal
from quotagate.limiter.journal import recover as recover_journals
from quotagate.limiter.scripts import ALL, DECIDE, LIBRARY, LIBRARY_NAME, RENEW, SETTLE, Script
from quotagate.limiter.store import OptionalSetup, PipelinedStore, pack_command

log = logging.getLogger("quotagate.limiter")

FailurePolicy = Literal["open", "closed"]


class Decision(NamedTuple):
    """One decision, in decide.lua's reply order (a tuple: built once per request)."""

    outcome: Outcome
    flags: int = Flag.NONE
    qps_limit: int = 0
    qps_remaining: int = 0
    qps_reset_ms: int = 0
    #: The calls meter: plan quota, and what plan + valid packs still hold.
    quota: int = 0
    remaining: int = 0
    #: Until the billing cycle resets.
    reset_ms: int = 0
    retry_after_ms: int = 0
    #: The billing cycle's length.
    window_s: int = 0
    #: The meter that refused ("" when admitted).
    meter: str = ""
    #: For a slot: its cap, and the live slots (this one included when admitted).
    cap: int = 0
    in_use: int = 0
    #: Admitted without a decision because the store was unreachable (fail-open).
    store_bypassed: bool = False
    #: This instance holds the slot asked for: give it back with ``Limiter.release``.
    slot_held: bool = False

    @property
    def admitted(self) -> bool:
        """Let through: admitted, or refused only in shadow mode."""
        return self.outcome is Outcome.ADMITTED or bool(self.flags & Flag.SHADOW_REFUSAL)

    def charged_calls(self, kind: str) -> bool:
        """Whether decide.lua charged this request's calls, so a refund may give them back:
        not a bypassed one (its cost is in the write-back backlog), not one a database promo
        made free, not an early outcome shadow mode let through, not SMS (their cost went
        to SMS packs first)."""
        return not (self.store_bypassed or self.flags & Flag.DATABASE_FREE
                    or self.outcome in UNCHARGED or kind == "sms")

    @classmethod
    def from_reply(cls, r: list) -> Decision:
        return cls(_OUTCOMES[r[0]], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8],
                   r[9], r[10].decode(), r[11], r[12], False, False)


_OUTCOMES = tuple(Outcome)

BYPASSED = Decision(Outcome.ADMITTED, store_bypassed=True)
BYPASSED_HOLDING = Decision(Outcome.ADMITTED, store_bypassed=True, slot_held=True)


#: Fail-open usage is summed per slot of this length and written back at the slot's start, so
#: it lands on the right day and cycle (every zone's midnight is on a 15-minute boundary).
SLOT_MS = 15 * 60 * 1000
#: Write-back attempts that find no snapshot (store lost its data) before an entry is given up.
MAX_MISSING_ATTEMPTS = 20

#: env, what (a route kind: calls through decide.lua; or "meter:<name>": through settle.lua),
#: slot start (epoch ms)
BacklogKey = tuple[str, str, int]
METER_PREFIX = "meter:"
#: settle.lua reads a meter named "-<meter>@<ms>" as a refund of it.
REFUND_PREFIX = "-"
#: Environments remembered as known to exist (beyond it, only declared ones are added).
MAX_KNOWN = 1_000_000
#: A refund the store did not take is sent again this often, at most this many times.
REFUND_RETRY_S = 1.0
REFUND_ATTEMPTS = 120
#: Outcomes decide.lua returns before charging anything (shadow mode admits them).
UNCHARGED = frozenset({Outcome.ISOLATED, Outcome.NOT_FOUND, Outcome.NOT_STARTED})

#: Environments per renewal call: bounds how long one renewal holds the store.
RENEW_BATCH = 256
#: Renewal statuses (renew.lua) that end an environment's watches.
ENDED = {3: "isolated", 4: "not-found", 5: "not-started", 7: "missing"}


def new_instance_id() -> str:
    """Unique per process: host, pid and a random part (no ``|`` or ``=``, used in fields)."""
    host = "".join(c if c.isalnum() or c in "-." else "-" for c in socket.gethostname())[:40]
    return f"{host}-{os.getpid()}-{secrets.token_hex(4)}"


class Backlog:
    """Usage admitted while the store was unreachable, summed per (env, kind, 15-min slot),
    written back later.

    Bounded: past ``max_entries`` keys further usage is counted in ``dropped`` and logged,
    never held without limit.
    """

    def __init__(self, max_entries: int = 100_000, max_per_env: int = 10_000):
        self.max_entries = max_entries
        #: Entries one environment may hold (kinds x 15-minute slots: about ten days of an
        #: outage), so one environment cannot take the room of all others.
        self.max_per_env = max_per_env
        self.per_env: dict[str, int] = {}
        self.pending: dict[BacklogKey, int] = {}
        self.missing_attempts: dict[BacklogKey, int] = {}
        self.dropped = 0
        self.written = 0
        #: Every change is also written here (journal.py), when the gateway keeps one.
        self.journal: Journal | None = None
        #: Write-backs sent and not answered yet (they may have run): (record id, amount),
        #: sent again exactly so until answered.
        self.in_doubt: dict[BacklogKey, tuple[str, int]] = {}

    def _journal(self, key: BacklogKey, write: Callable[[Journal], None] | None = None
                 ) -> None:
        """Write this change (the entry's new value, or ``write``) to the journal."""
        journal = self.journal
        if journal is None:
            return
        try:
            if not self.pending and not self.in_doubt:
                journal.reset({}, {})  # all written back: nothing to keep
            elif journal.size > COMPACT_BYTES:
                journal.reset(self.pending, self.in_doubt)
            elif write is not None:
                write(journal)
            else:
                journal.value(key, self.pending.get(key, 0))
        except OSError as exc:  # a full or failing disk must not fail the request
            log.error("the fail-open journal %s failed (%s): it is no longer kept, the "
                      "backlog stays in memory only", journal.path, exc)
            journal.abandon()  # nobody may replay what this process still holds
            self.journal = None

    def note_intent(self, key: BacklogKey, record_id: str, cost: int) -> None:
        self._journal(key, lambda j: j.intent(key, cost, record_id))

    def note_done(self, key: BacklogKey, record_id: str) -> None:
        """A write-back answered: its intent closed, with the entry's value now."""
        self._journal(key, lambda j: j.value(key, self.pending.get(key, 0), record_id))

    def add(self, key: BacklogKey, cost: int) -> None:
        """Keep usage that has passed already (metered after a response): dropped, and
        logged, only when full."""
        if not self.admit(key, cost):
            self.dropped += cost
            log.error("fail-open backlog full (%d entries): usage of %s dropped",
                      self.max_entries, key[0])

    def admit(self, key: BacklogKey, cost: int) -> bool:
        """Keep a request's cost if there is room; False (nothing kept) when full: the
        request is then refused rather than admitted uncounted."""
        if key in self.pending:
            self.pending[key] += cost
        elif (len(self.pending) < self.max_entries
              and self.per_env.get(key[0], 0) < self.max_per_env):
            self.pending[key] = cost
            self.per_env[key[0]] = self.per_env.get(key[0], 0) + 1
        else:
            return False
        self._journal(key)
        return True

    def remove(self, key: BacklogKey, cost: int, done: str | None = None) -> int:
        """Take ``cost`` out (what is there of it); returns what was taken. ``done``: the
        write-back (record id) that took it, closed in the journal on the same line."""
        held = self.pending.get(key, 0)
        if held > cost:
            self.pending[key] = held - cost
        elif self.pending.pop(key, None) is not None:
            self.missing_attempts.pop(key, None)
            left = self.per_env.get(key[0], 1) - 1
            if left > 0:
                self.per_env[key[0]] = left
            else:
                self.per_env.pop(key[0], None)
        if done is None:
            self._journal(key)
        else:
            self.note_done(key, done)
        return min(held, cost)

    def total(self, env: str) -> int:
        return sum(c for (e, _, _), c in self.pending.items() if e == env)

    def __len__(self) -> int:
        return len(self.pending)


_DEL_IF_MINE = ("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) "
                "end return 0")


class _RenewCall(NamedTuple):
    envs: list[str]
    fut: asyncio.Future
    names: list[str]
    args: list[str | int]
    key_slot: int


#: Without REPLACE: a library of this name has this very code (the name carries its digest),
#: so one already there is kept — with its cache — and the store writes nothing.
_LOAD_LIBRARY = pack_command("FUNCTION", "LOAD", LIBRARY)
#: How often "missing in store, reloading" may be logged.
RELOAD_LOG_INTERVAL_S = 60.0


def _already_loaded(exc: BaseException | None) -> bool:
    return exc is None or "already exists" in str(exc)


class Limiter:
    def __init__(
        self,
        store: PipelinedStore | ClusterStore,
        *,
        clock: Clock | None = None,
        mode: Literal["enforce", "shadow"] = "enforce",
        burst_ms: int = 100,
        on_failure: FailurePolicy = "open",
        on_missing: Callable[[str], None] | None = None,
        instance: str | None = None,
        lease_ms: int = 15_000,
        renew_interval_ms: int = 5_000,
    ):
        self.store = store
        # Every new connection loads the code first: a restarted store has it at once. The
        # function library is what the limiter calls (FCALL); the scripts are the fallback.
        store.setup = (*(pack_command("SCRIPT", "LOAD", s.body) for s in ALL),
                       OptionalSetup(_LOAD_LIBRARY))
        self.clock = clock or StoreClock()
        self.mode = mode
        self.burst_ms = burst_ms
        self.on_failure = on_failure
        self.script = DECIDE
        #: Called with an env id whose snapshot the store does not have (e.g. it lost its data).
        self.on_missing = on_missing
        self.backlog = Backlog()
        #: Call the function library (FCALL); False once the store refused it: scripts.
        self.functions = True
        self._decide_head = b""
        self._set_heads()
        self._library_loading = False
        self._reload_logged_at = -RELOAD_LOG_INTERVAL_S
        self._burst = str(burst_ms).encode()
        self._drainer: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._key_cache: dict[str, tuple[bytes, int]] = {}
        self.script_reloads = 0

        # ---- leased slots
        self.instance = instance or new_instance_id()
        self.lease_ms = lease_ms
        self.renew_interval = renew_interval_ms / 1000
        self._tail = b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (
            self.instance.encode(), str(lease_ms).encode()))
        #: env -> slot -> slots this instance holds (admitted ones, and acquisitions in flight).
        self.held: dict[str, dict[str, int]] = {}
        #: env -> renewals submitted: an acquisition refused after a renewal counted it must
        #: be given back.
        self._renewals: dict[str, int] = {}
        #: env -> (slot -> count to give back, meter -> amount to charge), flushed next tick.
        self._settle: dict[str, tuple[dict[str, int], dict[str, int]]] = {}
        self._settle_scheduled = False
        #: Environments known to exist (declared, or a snapshot seen): only they are
        #: admitted fail-open while the store is away.
        self.known: set[str] = set()
        #: Refunds being sent again (cancelled at close).
        self._refund_tasks: set[asyncio.Task[None]] = set()
        self._write_ids = itertools.count(1)
        self._closing = False
        self._renewer: asyncio.Task[None] | None = None
        #: Told (env, status) when a renewal finds an environment isolated, released or unknown.
        self.on_ended: Callable[[str, str], None] | None = None
        self.renewals = 0
        self.renew_commands = 0
        self._forwarding: set[str] = set()
        self._forward_again: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def _set_heads(self) -> None:
        if self.functions:
            name = DECIDE.function.encode()
            self._decide_head = b"*%d\r\n$5\r\nFCALL\r\n$%d\r\n%s\r\n$1\r\n9\r\n" % (
                3 + 9 + 9, len(name), name)
        else:
            self._decide_head = b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n$1\r\n9\r\n" % (
                3 + 9 + 9, DECIDE.sha.encode())

    def _call(self, script: Script, names: list[str], args: Iterable[str | int]) -> bytes:
        """One call of ``script``: its function, or the script where functions are refused."""
        if self.functions:
            return pack_command("FCALL", script.function, len(names), *names, *args)
        return pack_command("EVALSHA", script.sha, len(names), *names, *args)

    def set_burst_ms(self, burst_ms: int) -> None:
        self.burst_ms = burst_ms
        self._burst = str(burst_ms).encode()

    def _keys_packed(self, env: str) -> tuple[bytes, int]:
        """The KEYS part of the command and their cluster slot, cached per env (bounded)."""
        cached = self._key_cache.get(env)
        if cached is None:
            if len(self._key_cache) >= 65536:
                self._key_cache.clear()
            names = keys.decision_keys(env)
            packed = b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in map(str.encode, names))
            cached = self._key_cache[env] = (packed, slot_of(names[0]))
        return cached

    def _packed(self, env: str, kind: str, cost: int, mode: str, at: ScriptTime, slot: str,
                needs: str) -> bytes:
        parts = [self._decide_head, self._keys_packed(env)[0]]
        for arg in (script_arg(at).encode(), kind.encode(), str(cost).encode(), mode.encode(),
                    self._burst, slot.encode()):
            parts.append(b"$%d\r\n%s\r\n" % (len(arg), arg))
        parts.append(self._tail)
        parts.append(b"$%d\r\n%s\r\n" % (len(needs), needs.encode()))
        return b"".join(parts)

    async def _run(self, env: str, kind: str, cost: int, mode: str, at: ScriptTime,
                   late: Callable[[Decision | None], None] | None = None, slot: str = "",
                   needs: str = "",
                   abandoned: Callable[[Decision | None], None] | None = None) -> Decision:
        """One decision. ``late``: told the outcome of a command that timed out, if it ran.
        ``abandoned``: told the outcome of a call whose caller was cancelled meanwhile."""
        key_slot = self._keys_packed(env)[1]
        fut = self.store.submit(self._packed(env, kind, cost, mode, at, slot, needs),
                                key_slot)
        try:
            if abandoned is None:  # the plain path: one coroutine frame less than _reply
                try:
                    reply = await fut
                except StoreTimeout:
                    self._watch_late(fut, late)
                    raise
            else:
                reply = await self._reply(fut, late, abandoned)
        except (NoScript, OutOfMemory) as exc:
            # OutOfMemory: at maxmemory a function (which may write) is refused before it
            # runs; a script runs until it writes. So as a script a refusal, which writes
            # nothing, is still decided, as it was before functions; an admission fails its
            # write as before.
            if isinstance(exc, OutOfMemory) and not self.functions:
                raise
            reply = await self._decide_again(env, key_slot, (
                script_arg(at), kind, cost, mode, self.burst_ms, slot, self.instance, self.lease_ms,
                needs), late, abandoned, exc)
        decision = Decision.from_reply(reply)
        if decision.outcome is Outcome.NOT_FOUND and self.on_missing is not None:
            self.on_missing(env)
        if decision.flags & Flag.EVENTS:
            self._forward_soon(env)
        return decision

    async def _decide_again(self, env: str, key_slot: int, args: tuple,
                            late: Callable[[Decision | None], None] | None,
                            abandoned: Callable[[Decision | None], None] | None,
                            exc: StoreError) -> list:
        """decide.lua as a script, after the function call failed with ``exc``: the store
        lost the code (NoScript), or is at maxmemory (OutOfMemory)."""
        names = keys.decision_keys(env)
        if isinstance(exc, NoScript):
            return await self._reply(self._reload(DECIDE, names, key_slot, args, exc), late,
                                     abandoned)
        fut = self.store.submit(pack_command("EVALSHA", DECIDE.sha, 9, *names, *args),
                                key_slot)
        try:
            return await self._reply(fut, late, abandoned)
        except NoScript as missing:
            return await self._reply(self._reload(DECIDE, names, key_slot, args, missing),
                                     late, abandoned)

    async def _reply(self, fut: asyncio.Future,
                     late: Callable[[Decision | None], None] | None,
                     abandoned: Callable[[Decision | None], None] | None) -> list:
        try:
            # Shielded when the outcome matters after a cancellation (a slot): the reply is
            # then handed to ``abandoned``.
            return await (fut if abandoned is None else asyncio.shield(fut))
        except StoreTimeout:
            self._watch_late(fut, late)
            raise
        except asyncio.CancelledError:
            if abandoned is not None:
                def told(f: asyncio.Future) -> None:
                    ok = not f.cancelled() and f.exception() is None
                    abandoned(Decision.from_reply(f.result()) if ok else None)
                fut.add_done_callback(told)
            raise

    def _reload(self, script: Script, names: list[str], key_slot: int | None,
                args: Iterable[str | int], exc: NoScript) -> asyncio.Future:
        """The store lost the code (FUNCTION/SCRIPT FLUSH, a restart without our reconnect)
        or refuses functions: EVAL the body once (which caches the script again); load the
        library again for the next calls, or call scripts from now on."""
        self.script_reloads += 1
        if isinstance(exc, NoFunctions):
            self._no_functions(exc)
        else:
            now = time.monotonic()
            if now - self._reload_logged_at >= RELOAD_LOG_INTERVAL_S:
                self._reload_logged_at = now
                log.info("%s missing in store (%s), reloading", script.name, exc)
            if self.functions and not self._library_loading:  # one load at a time
                self._library_loading = True
                self.store.submit(_LOAD_LIBRARY, key_slot).add_done_callback(
                    self._library_loaded)
        return self.store.submit(
            pack_command("EVAL", script.body, len(names), *names, *args), key_slot)

    def _no_functions(self, exc: BaseException) -> None:
        """Call scripts from now on (this process): the store refuses or cannot load the
        library."""
        if self.functions:
            self.functions = False
            self._set_heads()
            log.warning("the store refuses functions (%s): calling scripts (EVALSHA) instead, "
                        "which cost the store about 1.5x as much per decision", exc)

    def _library_loaded(self, fut: asyncio.Future) -> None:
        self._library_loading = False
        exc = StoreUnavailable("cancelled") if fut.cancelled() else fut.exception()
        if _already_loaded(exc) or isinstance(exc, StoreUnavailable):
            return  # loaded, or the store cannot serve now (OOM, down): try again later
        # Refused for good (ACL, a renamed command, a server that cannot compile it): without
        # this every call would miss, load and EVAL.
        assert exc is not None
        self._no_functions(exc)

    def _watch_late(self, fut: asyncio.Future, late: Callable[[Decision | None], None] | None
                    ) -> None:
        if late is None:
            return

        def told(reply: object) -> None:
            ok = isinstance(reply, list)
            late(Decision.from_reply(reply) if ok else None)  # type: ignore[arg-type]

        self.store.when_late(fut, told)

    async def decide(self, env: str, kind: str, cost: int, slot: str = "",
                     needs: str = "") -> Decision:
        """Admit or refuse one request; on an unreachable store apply the failure policy.

        ``slot`` ("rt:" or "fn:<name>"): also take a leased concurrency slot, given back with
        ``release``. ``needs``: a metered meter the request will use (refused once used up).
        Raises ``StoreUnavailable`` only when the policy is ``closed``.
        """
        key: BacklogKey | None = None
        finish: Callable[[Decision], bool] | None = None
        abandoned: Callable[[Decision | None], None] | None = None
        if slot:
            if env in self._settle:  # slots given back first: they may make room
                self._flush_env(env)
            # Held from now on: a renewal sent while this is in flight counts it.
            self._hold(env, slot, 1)
            finish, abandoned = self._slot_outcome(env, slot, self._renewals.get(env, 0))

        def late(decision: Decision | None) -> None:
            # The timed-out call ran after all (it was charged just now, by the store).
            if decision is None or not decision.admitted or decision.flags & Flag.MODE_OFF:
                return
            refundable = decision.charged_calls(kind)
            if key is not None:
                # Admitted fail-open, and its cost is in the backlog (perhaps in a write-back
                # in flight, or journaled): the backlog keeps it, and what the store just
                # charged is given back — one rule whatever came first. SMS (no refund): taken
                # out of the backlog instead.
                if refundable:
                    self.refund(env, "calls", cost, self.clock.now_ms())
                elif kind == "sms":
                    self.backlog.remove(key, cost)
                return
            # Refused (503): nothing it counted may stay — the slot given back, the calls
            # too (once: this runs once per timed-out call).
            if slot and decision.in_use > 0:
                self._queue(env, slot, None, 1)
            if refundable:
                self.refund(env, "calls", cost, self.clock.now_ms())

        try:
            decision = await self._run(env, kind, cost, self.mode, self.clock.script_time(), late,
                                       slot, needs, abandoned)
        except StoreUnavailable:
            if self.on_failure == "closed":
                if slot:
                    self._hold(env, slot, -1)
                raise
            # Fail-open, only for environments known to exist (the config, the store's
            # snapshots seen, the API's list), and while the backlog has room: anything else
            # is refused (503), not admitted uncounted. A slot stays held here; the next
            # renewal writes it to the store.
            passed = self.clock.now_ms()
            entry = (env, kind, passed - passed % SLOT_MS)
            if env not in self.known or not self.backlog.admit(entry, cost):
                if slot:
                    self._hold(env, slot, -1)
                raise StoreUnavailable(
                    "store unreachable" + ("" if env in self.known else
                                           f"; {env} is not known to exist here")) from None
            key = entry  # kept: a late reply takes it out again
            self._start_drainer()
            return BYPASSED_HOLDING if slot else BYPASSED
        except StoreError:
            if slot:
                self._hold(env, slot, -1)
            raise
        if env not in self.known and decision.outcome is not Outcome.NOT_FOUND \
                and len(self.known) < MAX_KNOWN:
            self.known.add(env)  # its snapshot is in the store: it exists
        if finish is not None and finish(decision):
            return Decision._make((*decision[:-1], True))  # (_replace is slow)
        return decision

    def _slot_outcome(self, env: str, slot: str, renewals: int
                      ) -> tuple[Callable[[Decision], bool], Callable[[Decision | None], None]]:
        """How a slot decision ends: ``finish`` (the reply came) and ``abandoned`` (the
        caller was cancelled first; told the reply when it comes)."""

        def finish(decision: Decision) -> bool:
            """Whether the store took the slot; if not, undo the local hold."""
            if (decision.admitted and not decision.flags & Flag.MODE_OFF
                    and decision.in_use > 0):
                return True
            self._hold(env, slot, -1)
            if self._renewals.get(env, 0) != renewals:
                # A renewal sent while this was in flight counted it: take it back out.
                self._queue(env, slot, None, 1)
            return False

        def abandoned(decision: Decision | None) -> None:
            if decision is None:
                self._hold(env, slot, -1)  # never answered: the next renewal is the truth
            elif finish(decision):
                self.release(env, slot)

        return finish, abandoned

    # ------------------------------------------------------------------ slots and settling

    def _hold(self, env: str, slot: str, n: int) -> None:
        held = self.held.get(env)
        if held is None:
            held = self.held[env] = {}
        held[slot] = max(0, held.get(slot, 0) + n)  # zeros stay until a renewal sends them

    def release(self, env: str, slot: str, n: int = 1) -> None:
        """Give back ``n`` slots taken by ``decide`` (or held through a store outage)."""
        self._hold(env, slot, -n)
        self._queue(env, slot, None, n)

    def meter(self, env: str, meter: str, amount: int) -> None:
        """Charge ``amount`` of a metered meter after the response (never refuses)."""
        if amount > 0:
            self._queue(env, None, meter, amount)

    def refund(self, env: str, meter: str, amount: int, charged_at_ms: int) -> None:
        """Give back ``amount`` of ``meter`` that ``decide`` charged at ``charged_at_ms``
        (settle.lua: the last taken first; nothing if the environment's day has changed
        since). Lost, not kept, if the store cannot take it: never written back later."""
        if amount > 0:
            self._queue(env, None, f"{REFUND_PREFIX}{meter}@{charged_at_ms}", amount)

    def _queue(self, env: str, slot: str | None, meter: str | None, n: int) -> None:
        pending = self._settle.get(env)
        if pending is None:
            pending = self._settle[env] = ({}, {})
        if slot is not None:
            pending[0][slot] = pending[0].get(slot, 0) + n
        if meter is not None:
            pending[1][meter] = pending[1].get(meter, 0) + n
        if not self._settle_scheduled:
            self._settle_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush_settle)

    def _flush_settle(self) -> None:
        """Everything finished in one loop iteration: one settle call per environment."""
        self._settle_scheduled = False
        for env in list(self._settle):
            self._flush_env(env)

    def _flush_env(self, env: str) -> None:
        releases, meters = self._settle.pop(env)
        args: list[str | int] = [script_arg(self.clock.script_time()), self.instance, self.mode,
                                 len(releases)]
        for slot, n in releases.items():
            args += (slot, n)
        for meter, amount in meters.items():
            args += (meter, amount)
        names = keys.settle_keys(env)
        key_slot = self._keys_packed(env)[1]
        fut = self.store.submit(self._call(SETTLE, names, args), key_slot)
        fut.add_done_callback(lambda f: self._settled(env, meters, names, key_slot, args, f))

    def _settled(self, env: str, meters: dict[str, int], names: list[str], key_slot: int,
                 args: list[str | int], fut: asyncio.Future, retried: bool = False) -> None:
        exc = fut.exception() if not fut.cancelled() else StoreUnavailable("cancelled")
        if isinstance(exc, NoScript) and not retried:
            again = self._reload(SETTLE, names, key_slot, args, exc)
            again.add_done_callback(
                lambda f: self._settled(env, meters, names, key_slot, args, f, True))
            return
        no_snapshot = False
        if exc is None:
            reply = fut.result()
            if reply[1] & Flag.EVENTS:
                self._forward_soon(env)
            if reply[0] != 4 or not meters:
                return
            no_snapshot = True  # (yet): keep the usage for later
            exc = StoreError(f"no snapshot of {env}")
        refunds = {m: meters.pop(m) for m in [m for m in meters if m.startswith(REFUND_PREFIX)]}
        if no_snapshot:
            refunds = {}  # nothing to give back from
        # When it passed, for the write-back (its day decides plan, packs or pay-as-you-go).
        passed = self.clock.now_ms()
        entries = [((env, METER_PREFIX + m, passed - passed % SLOT_MS), a)
                   for m, a in meters.items()]
        for key, amount in entries:
            self.backlog.add(key, amount)
        if entries:
            log.warning("metered usage of %s kept for write-back: %s", env, exc)
        if isinstance(exc, StoreTimeout):
            # It may still run: its late reply decides (never both the call and a retry).
            def late(reply: object) -> None:
                if isinstance(reply, list) and reply[0] == 0:  # it ran: not twice
                    for key, amount in entries:
                        self.backlog.remove(key, amount)
                elif refunds:
                    self._retry_refunds(env, refunds)
            self.store.when_late(fut, late)
        elif refunds:
            self._retry_refunds(env, refunds)
        if entries:
            self._start_drainer()

    def _retry_refunds(self, env: str, refunds: dict[str, int]) -> None:
        """Refunds the store did not take (it was away, and their first try did not run):
        sent again in a settle call of their own under one id the store remembers, so a
        try that times out and runs late is not given back twice; every ``REFUND_RETRY_S``
        until taken or ``REFUND_ATTEMPTS`` have failed (then logged and dropped)."""
        if self._closing:
            log.warning("refunds to %s not sent (stopping): %s", env, refunds)
            return
        seen = keys.seen(env, f"r:{self.instance}.{next(self._write_ids)}")
        pairs = [x for meter_amount in refunds.items() for x in meter_amount]

        async def again() -> None:
            for _ in range(REFUND_ATTEMPTS):
                await asyncio.sleep(REFUND_RETRY_S)
                try:
                    await self._settle_now(env, [*keys.settle_keys(env), seen], [
                        script_arg(self.clock.script_time()), self.instance, self.mode, 0,
                        *pairs])
                    return
                except StoreError as exc:
                    stop_if_cancelling(exc)
            log.error("refunds to %s dropped after %d attempts: %s", env, REFUND_ATTEMPTS,
                      refunds)

        task = asyncio.get_running_loop().create_task(again())
        self._refund_tasks.add(task)
        task.add_done_callback(self._refund_tasks.discard)

    # ------------------------------------------------------------------------- events

    def _forward_soon(self, env: str) -> None:
        if env in self._forwarding:  # running: it makes one more pass for these
            self._forward_again.add(env)
            return
        self._forwarding.add(env)
        task = asyncio.get_running_loop().create_task(self._forward_task(env))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward_task(self, env: str) -> None:
        try:
            while True:
                self._forward_again.discard(env)
                await self.forward_events(env)
                if env not in self._forward_again:
                    return
        except StoreError as exc:
            log.warning("events of %s stay in its stream for now (%s)", env, exc)
        finally:
            self._forwarding.discard(env)
            self._forward_again.discard(env)

    async def forward_events(self, env: str) -> int:
        """Move the events the scripts wrote to the environment's stream onto the global
        stream (a script can write only its environment's hash slot). One instance at a time
        per environment (a short lock), so each event is moved once; only a crash between
        the two writes can move one twice — consumers can tell by ``event_id``
        (``<env>/<stream id>``)."""
        source, lock = keys.env_events(env), keys.forward_lock(env)
        key_slot, events_slot = self._keys_packed(env)[1], slot_of(keys.EVENTS)
        token = f"{self.instance}:{secrets.token_hex(4)}"
        for _ in range(10):
            got = await self.store.submit(
                pack_command("SET", lock, token, "NX", "PX", 30_000), key_slot)
            if got is not None:
                break
            await asyncio.sleep(0.2)  # another instance is moving them; look again after
        else:
            return 0
        moved = 0
        try:
            while True:
                entries = await self.store.submit(
                    pack_command("XRANGE", source, "-", "+", "COUNT", 100), key_slot)
                if not entries:
                    return moved
                for entry_id, fields in entries:
                    await self.store.submit(pack_command(
                        "XADD", keys.EVENTS, "MAXLEN", "~", 1_000_000, "*",
                        "event_id", f"{env}/{entry_id.decode()}", "env", env, *fields),
                        events_slot)
                await self.store.submit(pack_command("XDEL", source, *(e[0] for e in entries)),
                                        key_slot)
                moved += len(entries)
                metrics.EVENTS_FORWARDED.inc(len(entries))
        finally:  # only our own lock (one that expired may be another instance's now)
            await self.store.submit(pack_command("EVAL", _DEL_IF_MINE, 1, lock, token),
                                    key_slot)

    def slots_held(self, env: str, slot: str) -> int:
        return self.held.get(env, {}).get(slot, 0)

    async def renew(self, lease_ms: int | None = None) -> dict[str, int]:
        """Renew the lease of every slot this instance holds; returns env -> status (renew.lua).

        One script call per ``RENEW_BATCH`` environments (per cluster slot); counts are
        absolute. ``lease_ms=0`` gives everything back (shutdown).
        """
        ms = self.lease_ms if lease_ms is None else lease_ms
        groups: dict[int, list[str]] = {}
        clustered = isinstance(self.store, ClusterStore)  # one script call: one hash slot
        for env in self.held:
            groups.setdefault(self._keys_packed(env)[1] if clustered else 0, []).append(env)
        calls: list[_RenewCall] = []
        now = script_arg(self.clock.script_time())
        for key_slot, envs in groups.items():
            for i in range(0, len(envs), RENEW_BATCH):
                batch = envs[i:i + RENEW_BATCH]
                names: list[str] = []
                args: list[str | int] = [self.instance, ms, now]
                for env in batch:
                    names += keys.renew_keys(env)
                    held = self.held[env]
                    args.append(len(held))
                    for slot, n in held.items():
                        args += (slot, n)
                    # What was queued to give back is in these absolute counts already.
                    pending = self._settle.get(env)
                    if pending is not None:
                        pending[0].clear()
                    self._renewals[env] = self._renewals.get(env, 0) + 1
                fut = self.store.submit(self._call(RENEW, names, args), key_slot)
                calls.append(_RenewCall(batch, fut, names, args, key_slot))
                self.renew_commands += 1
                metrics.LEASE_RENEW_CALLS.inc()
        self.renewals += 1
        statuses: dict[str, int] = {}
        errors: list[StoreError] = []
        for call in calls:
            try:
                try:
                    reply = await call.fut
                except NoScript as exc:
                    reply = await self._reload(RENEW, call.names, call.key_slot, call.args,
                                               exc)
            except StoreError as exc:
                errors.append(exc)
                continue
            statuses.update(zip(call.envs, reply, strict=True))
            for env in call.envs:  # zeros written: forget them (unless taken again since)
                kept = self.held.get(env)
                if kept is not None:
                    for slot in [s for s, n in kept.items() if n == 0]:
                        del kept[slot]
                    if not kept:
                        del self.held[env]
        metrics.LEASE_RENEWALS.labels("failed" if errors else "ok").inc()
        if errors:
            raise errors[0]
        if self.on_ended is not None:
            for env, status in statuses.items():
                if status in ENDED:
                    self.on_ended(env, ENDED[status])
        return statuses

    def start_renewing(self) -> None:
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_loop())

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self.renew_interval)
            if not self.held:
                continue
            try:
                await self.renew()
            except StoreError as exc:
                stop_if_cancelling(exc)
                log.warning("lease renewal failed (%s); slots of %d environments held here, "
                            "renewed when the store answers", exc, len(self.held))

    async def load_scripts(self) -> None:
        """Load the function library and cache the scripts in the store (``/readyz``)."""
        for script in ALL:
            await self.store.execute_all("SCRIPT", "LOAD", script.body)
        if self.functions:
            try:
                await self.store.execute_all("FUNCTION", "LOAD", LIBRARY)
            except StoreUnavailable:
                raise
            except StoreError as exc:
                if not _already_loaded(exc):
                    self._no_functions(exc)

    async def scripts_loaded(self) -> bool:
        """The scripts, and the library unless functions are refused, on every primary."""
        replies = await self.store.execute_all("SCRIPT", "EXISTS", *(s.sha for s in ALL))
        if not all(reply and all(r == 1 for r in reply) for reply in replies):
            return False
        if not self.functions:
            return True
        try:
            listed = await self.store.execute_all("FUNCTION", "LIST", "LIBRARYNAME",
                                                  LIBRARY_NAME)
        except NoFunctions as exc:  # cannot even look: scripts it is
            self._no_functions(exc)
            return True
        return all(bool(reply) for reply in listed)

    # ------------------------------------------------------------- fail-open write-back

    def _start_drainer(self) -> None:
        if self._closing:  # stopping: what is pending stays in the journal
            return
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.get_running_loop().create_task(self._drain_loop())

    async def _drain_loop(self) -> None:
        delay = self.store.retry_interval
        while self.backlog.pending or self.backlog.in_doubt:
            await asyncio.sleep(delay)
            try:
                await self.flush_backlog()
            except StoreError as exc:
                stop_if_cancelling(exc)
                log.warning(
                    "store still unavailable (%s); %d usage entries held for write-back",
                    exc, len(self.backlog),
                )
            delay = (min(delay * 2, 5.0) if self.backlog.pending or self.backlog.in_doubt
                     else self.store.retry_interval)

    async def flush_backlog(self) -> int:
        """Write back what passed while the store was down; returns the entries written.

        Each entry is recorded at its slot's start time (its day and cycle), through the same
        script in ``record`` mode (no QPS, never refused). One flush at a time.
        """
        async with self._flush_lock:
            written = 0
            backlog = self.backlog
            for key in list({**backlog.pending, **backlog.in_doubt}):
                env, what, slot_ms = key
                # Under an id the store remembers: a write-back that timed out (it may have
                # run) is sent again as it was, same id, same amount, until it is answered;
                # and one the journal replays after a crash is not counted twice.
                doubt = backlog.in_doubt.get(key)
                if doubt is None:
                    cost = backlog.pending.get(key, 0)
                    if cost <= 0:
                        continue
                    doubt = backlog.in_doubt[key] = (f"{self.instance}.{next(self._write_ids)}",
                                                     cost)
                    backlog.note_intent(key, *doubt)
                record_id, cost = doubt
                found = await self.write_back(env, what, cost, slot_ms, record_id)
                del backlog.in_doubt[key]
                if not found:
                    attempts = backlog.missing_attempts.get(key, 0) + 1
                    backlog.missing_attempts[key] = attempts
                    if attempts >= MAX_MISSING_ATTEMPTS:
                        log.error("usage of %s (%d %s) lost: the store has no such environment",
                                  env, cost, what)
                        backlog.dropped += cost
                        backlog.remove(key, backlog.pending.get(key, 0), done=record_id)
                    else:
                        backlog.note_done(key, record_id)
                    continue
                # Only what was written leaves the backlog; more may have been added meanwhile.
                backlog.remove(key, cost, done=record_id)
                written += 1
            self.backlog.written += written
            if written:
                log.info("wrote back %d usage entries admitted while the store was down",
                         written)
            return written

    async def ingest(self, env: str, record_id: str, meter: str, amount: int, at_ms: int
                     ) -> int:
        """Count one ingested usage record once, whatever the retries: 0 counted, 4 no such
        environment, 8 seen before. Raises StoreError when the store cannot be reached (the
        caller retries the batch; ids make that safe)."""
        reply = await self._settle_now(env, [*keys.settle_keys(env), keys.seen(env, record_id)],
                                       [at_ms, self.instance, self.mode, 0, meter, amount])
        if reply[1] & Flag.EVENTS:
            self._forward_soon(env)
        return int(reply[0])

    async def _settle_now(self, env: str, names: list[str], args: list[str | int]) -> list:
        """One settle.lua call, awaited (EVAL again if the store lost the script)."""
        key_slot = self._keys_packed(env)[1]
        try:
            return await self.store.submit(self._call(SETTLE, names, args), key_slot)
        except NoScript as exc:
            return await self._reload(SETTLE, names, key_slot, args, exc)

    async def write_back(self, env: str, what: str, amount: int, at_ms: int,
                         record_id: str) -> bool:
        """Record usage that passed at ``at_ms`` while the store was away (``what``: a route
        kind, through decide.lua; ``meter:<name>``, through settle.lua), once per
        ``record_id`` whatever the retries. False if the store has no such environment."""
        seen = keys.seen(env, "j:" + record_id)
        if what.startswith(METER_PREFIX):
            reply = await self._settle_now(env, [*keys.settle_keys(env), seen], [
                at_ms, self.instance, "record", 0, what[len(METER_PREFIX):], amount])
        else:
            names = [*keys.decision_keys(env), seen]
            args = (at_ms, what, amount, "record", self.burst_ms, "", self.instance,
                    self.lease_ms, "")
            key_slot = self._keys_packed(env)[1]
            try:
                reply = await self.store.submit(self._call(DECIDE, names, args), key_slot)
            except NoScript as exc:
                reply = await self._reload(DECIDE, names, key_slot, args, exc)
        if reply[0] == 4:  # no snapshot: the store lost its data? (the gateway re-syncs)
            if self.on_missing is not None:
                self.on_missing(env)
            return False
        return True

    def open_journal(self, directory: Path) -> None:
        """Keep the fail-open backlog in a journal in ``directory`` too (journal.py)."""
        self.backlog.journal = Journal(directory, self.instance).open()

    async def recover_journals(self, directory: Path) -> int:
        """Write back what gateways that stopped during an outage left in their journals."""
        return await recover_journals(directory, self.instance, self.write_back)

    async def close(self, give_back: bool = True) -> None:
        """Stop; with ``give_back`` hand every held slot back first (a clean shutdown)."""
        self._closing = True  # no new drainer or refund retries from here on
        for task in (self._drainer, self._renewer, *self._refund_tasks):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._settle:
            self._flush_settle()
        if give_back and self.held:
            try:
                await self.renew(lease_ms=0)
            except StoreError as exc:
                log.warning("could not give slots back (%s): they expire with the lease", exc)
        await asyncio.sleep(0)
        if self._tasks:  # events being moved to the global stream
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.store.close()
        await asyncio.sleep(0)  # the callbacks of what the close failed (kept, journaled)
        for task in [*self._refund_tasks, *([self._drainer] if self._drainer else [])]:
            task.cancel()
        if self.backlog.journal is not None:
            # What is still pending stays in the file: the next start writes it back.
            self.backlog.journal.close(
                remove=not self.backlog.pending and not self.backlog.in_doubt)
            self.backlog.journal = None
