"""How the limiter calls its Lua code (scripts.py): the function library (``FCALL``) while
the store takes it, the plain scripts (``EVALSHA``) where it is refused; code the store lost
(a restart, ``FUNCTION FLUSH``) is sent again at once, and the library reloaded behind it.

Every new store connection loads the code first (``store.setup``), so a restarted store has
it before the first request needs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from quotagate.common import metrics
from quotagate.limiter import keys
from quotagate.limiter.cluster import ClusterStore, slot_of
from quotagate.limiter.errors import NoFunctions, NoScript, StoreError, StoreUnavailable
from quotagate.limiter.scripts import ALL, DECIDE, LIBRARY, LIBRARY_NAME, SETTLE, Script
from quotagate.limiter.store import OptionalSetup, PipelinedStore, pack_command

log = logging.getLogger("quotagate.limiter")

#: Without REPLACE: a library of this name has this very code (the name carries its digest),
#: so one already there is kept — with its cache — and the store writes nothing.
LOAD_LIBRARY = pack_command("FUNCTION", "LOAD", LIBRARY)
#: How often "missing in store, reloading" may be logged.
RELOAD_LOG_INTERVAL_S = 60.0
#: Environments whose packed keys are cached (then the cache starts again).
KEY_CACHE = 65536
#: settle.lua's reply status when it refuses a call whole (an amount beyond 2^53 - 1, a
#: counter that would pass 2^62): nothing written.
SETTLE_REFUSED = 16


class SettleRefused(StoreError):
    """The store refused a settle call whole (``SETTLE_REFUSED``): nothing of it written."""


def log_refused_settle(env: str, args: Iterable[str | int]) -> None:
    """A settle call the store refused whole (settle.lua's status 16): nothing of it counted."""
    log.error("settle of %s refused by the store (an amount beyond 2^53 - 1 or a counter "
              "that would pass 2^62): nothing of it was counted; arguments %s", env,
              [str(a)[:40] for a in args][:24])


def _already_loaded(exc: BaseException | None) -> bool:
    return exc is None or "already exists" in str(exc)


class ScriptCalls:
    def __init__(self, store: PipelinedStore | ClusterStore):
        self.store = store
        store.setup = (*(pack_command("SCRIPT", "LOAD", s.body) for s in ALL),
                       OptionalSetup(LOAD_LIBRARY))
        #: Call the function library (FCALL); False once the store refused it: scripts.
        self.functions = True
        #: decide.lua's command up to its KEYS (the hot path packs the rest by hand); and
        #: the same with one argument more (ARGV[10], a pass while isolated).
        self.decide_head = b""
        self.decide_head_pass = b""
        self._set_heads()
        self._library_loading = False
        self._reload_logged_at = -RELOAD_LOG_INTERVAL_S
        self._key_cache: dict[str, tuple[bytes, int]] = {}
        self.script_reloads = 0

    def _set_heads(self) -> None:
        n = len(keys.decision_keys(""))
        count = b"$%d\r\n%d\r\n" % (len(str(n)), n)

        def head(args: int) -> bytes:
            if self.functions:
                name = DECIDE.function.encode()
                return b"*%d\r\n$5\r\nFCALL\r\n$%d\r\n%s\r\n%s" % (
                    3 + n + args, len(name), name, count)
            return b"*%d\r\n$7\r\nEVALSHA\r\n$40\r\n%s\r\n%s" % (
                3 + n + args, DECIDE.sha.encode(), count)

        self.decide_head = head(9)
        self.decide_head_pass = head(10)

    def keys_packed(self, env: str) -> tuple[bytes, int]:
        """decide.lua's KEYS part of the command and their cluster slot, cached per env
        (bounded)."""
        cached = self._key_cache.get(env)
        if cached is None:
            if len(self._key_cache) >= KEY_CACHE:
                self._key_cache.clear()
            names = keys.decision_keys(env)
            packed = b"".join(b"$%d\r\n%s\r\n" % (len(k), k) for k in map(str.encode, names))
            cached = self._key_cache[env] = (packed, slot_of(names[0]))
        return cached

    def key_slot(self, env: str) -> int:
        """The cluster slot of the environment's keys (all carry its hash tag)."""
        return self.keys_packed(env)[1]

    def command(self, script: Script, names: list[str], args: Iterable[str | int]) -> bytes:
        """One call of ``script``: its function, or the script where functions are refused."""
        if self.functions:
            return pack_command("FCALL", script.function, len(names), *names, *args)
        return pack_command("EVALSHA", script.sha, len(names), *names, *args)

    async def run(self, script: Script, env: str, names: list[str], args: list[str | int]
                  ) -> list:
        """One call of ``script`` for ``env``, awaited (sent again if the store lost it)."""
        key_slot = self.key_slot(env)
        try:
            return await self.store.submit(self.command(script, names, args), key_slot)
        except NoScript as exc:
            return await self.reload(script, names, key_slot, args, exc)

    async def settle(self, env: str, names: list[str], args: list[str | int]) -> list:
        """One settle.lua call, awaited (one the store refuses whole is logged here)."""
        reply = await self.run(SETTLE, env, names, args)
        if reply[0] == SETTLE_REFUSED:
            log_refused_settle(env, args)
        return reply

    def reload(self, script: Script, names: list[str], key_slot: int | None,
               args: Iterable[str | int], exc: NoScript) -> asyncio.Future:
        """The store lost the code (FUNCTION/SCRIPT FLUSH, a restart without our reconnect)
        or refuses functions: EVAL the body once (which caches the script again); load the
        library again for the next calls, or call scripts from now on."""
        self.script_reloads += 1
        metrics.SCRIPT_RELOADS.inc()
        if isinstance(exc, NoFunctions):
            self.no_functions(exc)
        else:
            now = time.monotonic()
            if now - self._reload_logged_at >= RELOAD_LOG_INTERVAL_S:
                self._reload_logged_at = now
                log.info("%s missing in store (%s), reloading", script.name, exc)
            if self.functions and not self._library_loading:  # one load at a time
                self._library_loading = True
                self.store.submit(LOAD_LIBRARY, key_slot).add_done_callback(
                    self._library_loaded)
        return self.store.submit(
            pack_command("EVAL", script.body, len(names), *names, *args), key_slot)

    def no_functions(self, exc: BaseException) -> None:
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
        self.no_functions(exc)

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
                    self.no_functions(exc)

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
            self.no_functions(exc)
            return True
        return all(bool(reply) for reply in listed)
