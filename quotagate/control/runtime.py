"""What keeps one gateway process in step with its config files and its store, whatever front
door the requests come through: the limiter and the control plane's store client built from
the config, the config reloaded (SIGHUP, a file that changed, the admin API), the environments
and API-owned records written to the store, the store's clock sampled, the journals of
stopped gateways written back, the lifecycle scheduler and webhook delivery run.

A front door (the HTTP proxy, the realtime relay, plugin mode) holds its own small state and
is told of every config applied (``on_config``); it never reloads or syncs anything itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import time
import zoneinfo
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import msgspec
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from quotagate.billing import versions
from quotagate.common import calendar as cal
from quotagate.common import metrics
from quotagate.common.addresses import StoreAddress
from quotagate.common.aio import off_loop, pause, stop_if_cancelling
from quotagate.common.clock import SYNC_INTERVAL_S, Clock, StoreClock
from quotagate.control import events as control_events
from quotagate.control.audit import Audit
from quotagate.control.envs import Environments, local_today
from quotagate.control.lifecycle import Scheduler
from quotagate.limiter import due, keys
from quotagate.limiter.cluster import ClusterStore
from quotagate.limiter.entitlements import build_snapshot, encode
from quotagate.limiter.errors import StoreError
from quotagate.limiter.limiter import Limiter
from quotagate.limiter.store import PipelinedStore
from quotagate.limiter.sync import (
    CHUNK,
    check_store_version,
    file_digest,
    snapshots,
    sync_environments,
    write_snapshots,
)
from quotagate.settings import Config, ConfigError, load_config
from quotagate.settings.load import check_environments, environment_files, gc_paused
from quotagate.settings.schema import BYTES_PER_MBPS, Environment, EnvironmentsFile

log = logging.getLogger("quotagate.gateway")

#: How long a stopping gateway waits for its background tasks.
STOP_WAIT_S = 10.0
#: At most this many API-owned environments are read at start to be admitted fail-open.
KNOWN_AT_START = 100_000
#: The event loop's lag is probed this often; a lag this long is logged.
LAG_PROBE_S = 0.1
LAG_LOG_S = 0.02
LAG_LOG_EVERY_S = 10.0
#: Settings a reload cannot change in a running process (logged when they differ).
RESTART_ONLY = ("listen", "admin_listen", "store", "upstream", "leases", "events",
                "lifecycle_interval_ms", "reload_poll_ms", "drain_timeout_ms")
RESTART_ONLY_CLIENTS = ("header_timeout_ms", "max_connections", "authz_max_connections",
                        "grpc_max_connections", "admin_max_connections", "grpc_idle_timeout_ms")


def _mtimes(config: Config) -> dict[str, float]:
    """Modification times of the config's files, and of every file now in its
    ``environments_dir`` (one added since the config was loaded — a reload refused because of
    it, say — is watched too, so fixing it in place is seen)."""
    files: list[Path] = list(config.files)
    if config.gateway.environments_dir is not None:
        with contextlib.suppress(OSError):  # (gone, unreadable: its own mtime says so)
            files += environment_files(config.resolve(config.gateway.environments_dir))
    out = {}
    for f in files:
        try:
            out[str(f)] = f.stat().st_mtime
        except OSError:
            out[str(f)] = -1.0
    return out


#: More versioned environments than this: their rates are worked out off the event loop.
OFF_LOOP_RATES = 2_000


def declared_rates(config: Config, now_ms: int) -> tuple[dict[str, int], float]:
    """The bytes per second each versioned environment of the file is shaped at now (those
    enforced, with a version in effect), and the epoch ms until which that holds: the
    first midnight at which one of their versions starts or ends (inf: none ever does)."""
    rates: dict[str, int] = {}
    until = math.inf
    enforcement = config.gateway.enforcement
    for env_id, env in config.versioned.items():
        grant = env.gateway
        if grant is None or (env.mode or enforcement) != "enforce":
            continue
        today = local_today(config, env, now_ms)
        now = versions.status(grant, config.plans, today)
        if now.in_effect:  # (a version bought for later caps nothing yet)
            rates[env_id] = now.mbps * BYTES_PER_MBPS
        change = (grant.purchased if now.state == "pending" else
                  now.expires if now.state == "active" and not grant.auto_renew else None)
        if change is not None:
            until = min(until, cal.local_midnight_ms(
                change, zoneinfo.ZoneInfo(env.timezone or config.gateway.timezone)))
    return rates, until


@dataclass
class ReloadChange:
    """What a reload changes in the store, worked out off the event loop."""

    #: plans.yaml or the time zone changed: every snapshot (file and API-owned) is rewritten.
    everything: bool
    #: The environments whose snapshot is (re)written -> it, encoded.
    blobs: dict[str, str]
    #: File-owned environments the file no longer declares.
    removed: list[str]
    #: The new config's ``sync.file_digest``.
    digest: str
    #: Environments the file declares now and did not before.
    added: list[str]
    #: Which of the config's other files changed what they say: "gateway.yaml",
    #: "plans.yaml" (as the config names them).
    files: list[str] = field(default_factory=list)


def prepare_reload(path: Path, current: Config) -> tuple[Config, ReloadChange]:
    """Load the config files and compare their environments with ``current``'s: CPU-bound
    (10^5 environments: seconds), run in a thread. Raises ConfigError."""
    with gc_paused():  # (a collection would hold the event loop's thread as long as it walks)
        return _prepare_reload(path, current)


def _prepare_reload(path: Path, current: Config) -> tuple[Config, ReloadChange]:
    config = load_config(path, current.sources)  # (files unchanged since: not parsed again)
    new, old = config.environments.environments, current.environments.environments
    everything = (config.plans != current.plans
                  or config.gateway.timezone != current.gateway.timezone)
    changed = []
    for env_id, env in new.items():
        before = old.get(env_id)
        if before is not None and (before is env or before == env):
            # The one in force is kept (this copy is freed here, a little at a time): when
            # the config in force is dropped, on the event loop, its environments live on.
            new[env_id] = before
            if everything:
                changed.append(env_id)
        else:
            changed.append(env_id)
    removed = [env_id for env_id in old if env_id not in new]
    config.modes, config.versioned  # noqa: B018 (derived here, not on the event loop)
    added = [env_id for env_id in changed if env_id not in old]
    files = [path.name for path, differs in (
        (config.files[0], config.gateway != current.gateway),
        (config.files[1], config.plans != current.plans),
        (Path(config.gateway.tokens_file or current.gateway.tokens_file),
         config.tokens != current.tokens))
        if differs]
    return config, ReloadChange(everything, snapshots(config, changed), removed,
                                file_digest(config), added, files)


def _broken_records(records: dict[str, Environment], config: Config) -> list[str]:
    """API-owned records that the new plans would make invalid."""
    return [f"{env_id}: {issue.path}: {issue.reason}"
            for env_id, env in records.items()
            for issue in check_environments(
                EnvironmentsFile(environments={env_id: env}), config.plans,
                "store (API-owned)")]


@dataclass
class Runtime:
    config: Config
    store_url: str
    limiter: Limiter
    redis: aredis.Redis | RedisCluster
    #: The environments are written to the store (``/readyz``).
    synced: bool = False
    sync_task: asyncio.Task[None] | None = None
    #: monotonic time of the last re-sync asked for by a missing snapshot (debounce).
    resync_at: float = 0.0
    #: The lifecycle scheduler (set at ``start``).
    scheduler: Scheduler | None = None
    #: Told every config applied (at a reload; the first is the one built with).
    on_config: list[Callable[[Config], None]] = field(default_factory=list)
    #: Config files' modification times at the last (attempted) load.
    mtimes: dict[str, float] = field(default_factory=dict)
    reload_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    #: The environments whose bandwidth rate the file set (``_declared_bandwidth``).
    _declared_rates: set[str] = field(default_factory=set)
    #: The store-clock ms those rates were worked out at, and until which they hold.
    _rates_between: tuple[int, float] = (0, 0.0)
    #: A reload changed plans.yaml or the time zone and the API-owned environments'
    #: snapshots are still to be written again (by ``_sync_until_done``).
    api_plans_changed: bool = False
    #: The next sync writes every snapshot, whatever the store's digest says.
    _force_sync: bool = False
    _audit: Audit | None = None

    @property
    def audit(self) -> Audit:
        """The audit trail (control/audit.py): admin changes, and the reloads applied here."""
        if self._audit is None:
            self._audit = Audit(self.redis, self.limiter.clock.now_ms,
                                lambda: self.config.gateway.audit_retention_days,
                                self.limiter.instance)
        return self._audit

    # ------------------------------------------------------------------------- reload

    async def reload(self, why: str = "requested") -> bool:
        """Load the config files again; apply them if valid, else keep the last good config.

        The files are parsed, checked and compared with the config in force in a thread, off
        the event loop (requests are answered meanwhile); what changed is then applied: the
        snapshots of the environments that changed, were added or removed, or all of them
        (and the API-owned ones) when plans.yaml or the time zone changed. Routes,
        environments, plans, modes and the failure policy apply at once; listeners, the
        store and worker count need a restart (logged). Returns whether it was applied.
        """
        async with self.reload_lock:
            path = self.config.files[0] if self.config.files else None
            if path is None:
                return False
            self.mtimes = await self._watched()
            try:
                config, change = await off_loop(prepare_reload, path, self.config)
            except ConfigError as exc:
                metrics.RELOADS.labels("failure").inc()
                for issue in exc.issues:
                    log.error("config reload (%s) refused, the last good config stays: %s",
                              why, issue)
                return False
            except Exception:  # a bug, or a failure no check foresaw: never the reloader's end
                metrics.RELOADS.labels("failure").inc()
                log.exception("config reload (%s) failed, the last good config stays", why)
                return False
            api_owned: dict[str, Environment] = {}
            if change.everything:  # API-owned snapshots depend on plans.yaml too
                api_owned = await self._api_records()
                broken = await off_loop(_broken_records, api_owned, config)
                if broken:
                    metrics.RELOADS.labels("failure").inc()
                    for line in broken:
                        log.error("config reload (%s) refused, the last good config stays: "
                                  "an API-owned environment would be invalid: %s", why, line)
                    return False
            old = self.config.gateway
            new = config.gateway
            for key in RESTART_ONLY:
                if getattr(old, key) != getattr(new, key):
                    log.warning("config reload: %s changed; it takes effect at the next "
                                "restart", key)
            for key in RESTART_ONLY_CLIENTS:  # the listener's
                if getattr(old.clients, key) != getattr(new.clients, key):
                    log.warning("config reload: clients.%s changed; it takes effect at the "
                                "next restart", key)
            self.config = config
            for env_id in change.blobs:  # (a rate learned while API-owned, say: the file's
                self.limiter.bandwidth.rates.pop(env_id, None)  # version decides now)
            self.limiter.known.update(change.added)  # (the others were known already)
            self._apply_to_limiter(config)
            await self._declared_bandwidth(config)
            for listener in self.on_config:
                listener(config)
            self.mtimes = await self._watched()
            if change.everything:
                self.api_plans_changed = True
            if not self.synced:  # the last write has not finished: it writes this config
                self._sync_soon()
            else:
                try:
                    if change.everything:
                        # Forced: another instance that reloaded first wrote this digest,
                        # but this one's due times may have been worked out from the old
                        # plans in the meantime (a pack's days): all are due again.
                        await sync_environments(self.redis, config, change.blobs,
                                                digest=change.digest, force=True,
                                                now_ms=self.limiter.clock.now_ms())
                        await self._rewrite_api_snapshots(api_owned, config)
                        self.api_plans_changed = False
                    else:
                        await write_snapshots(self.redis, change.blobs, change.removed,
                                              change.digest, self.limiter.clock.now_ms())
                    await self._declared_bandwidth(config)
                except (aredis.RedisError, OSError, StoreError) as exc:
                    log.warning("config reload: environments not written yet (%s); the "
                                "whole file is written again", exc)
                    self.synced = False
                    self._sync_soon()
            metrics.RELOADS.labels("success").inc()
            if change.blobs or change.removed or change.files:
                # (once across instances: by the digest of what the files say)
                said = hashlib.sha256(change.digest.encode()
                                      + msgspec.json.encode(config.gateway)
                                      + msgspec.json.encode(config.tokens)).hexdigest()
                await self.audit.record_reload(said, why, list(change.blobs),
                                               change.removed, change.everything,
                                               change.files)
            parsed = config.sources.parsed if config.sources is not None else []
            log.info("config reloaded (%s): %d routes, %d environments (%s; %d environments "
                     "file%s parsed)", why, len(new.routes), len(config.environments.environments),
                     "all written again" if change.everything else
                     f"{len(change.blobs)} written, {len(change.removed)} removed",
                     len(parsed), "" if len(parsed) == 1 else "s")
            return True

    def _apply_to_limiter(self, config: Config) -> None:
        gw = config.gateway
        self.limiter.on_failure = gw.on_store_failure
        metrics.label_envs(gw.metrics_envs)
        self.limiter.set_burst_ms(gw.qps_burst_ms)
        self.limiter.hot.rate = gw.hot_rate
        self.limiter.mode = "shadow" if gw.enforcement == "shadow" else "enforce"

    async def _declared_bandwidth(self, config: Config) -> None:
        """The rate each environment of the file is shaped at, by its gateway version today,
        so that an instance that has not heard from the store (started or reloaded while it
        is away: a decision bypassed fail-open tells no rate) shapes it all the same, alone.
        Each decision the store makes says the rate again; this runs at start, on each reload
        and sync (after it: a decision on the old snapshot may have told the old rate) and
        when the store's clock reaches the next day a version starts or ends
        (``_rates_changed``). Worked out off the event loop when there are many (10^5
        versioned environments: ~2 s)."""
        now_ms = self.limiter.clock.now_ms()
        declared = config.versioned  # (only those with a version: never every environment)
        if len(declared) > OFF_LOOP_RATES:
            worked, until = await off_loop(declared_rates, config, now_ms)
        else:
            worked, until = declared_rates(config, now_ms)
        if config is not self.config:
            return  # (reloaded meanwhile: the new config's own call applies its rates)
        rates = self.limiter.bandwidth.rates
        # The file's environments, now and before (one may have left it or lost its version).
        for env_id in self._declared_rates | declared.keys():
            rates.pop(env_id, None)
        self._declared_rates = set(declared)
        rates.update(worked)
        self._rates_between = (now_ms, until)

    def _rates_changed(self) -> bool:
        """The declared rates may differ now: the store's clock reached the next day a version
        starts or ends, or went back past when they were worked out (a stepped clock)."""
        worked_at, until = self._rates_between
        now_ms = self.limiter.clock.now_ms()
        return now_ms >= until or now_ms < worked_at

    async def _watched(self) -> dict[str, float]:
        """``_mtimes`` of the config in force: off the event loop when it has a directory of
        environments files (one stat each)."""
        if self.config.gateway.environments_dir is None:
            return _mtimes(self.config)
        return await off_loop(_mtimes, self.config)

    async def files_changed(self) -> bool:
        return bool(self.config.files) and await self._watched() != self.mtimes

    async def _watch_files(self) -> None:
        """Reload when a config file changes (polled every ``reload_poll_ms``)."""
        while True:
            await pause(self.config.gateway.reload_poll_ms / 1000)
            if self.config.gateway.reload_poll_ms and await self.files_changed():
                await self.reload("a config file changed")

    # ------------------------------------------------------------ environments in the store

    async def learn_api_owned(self) -> None:
        """The API-owned environments exist: admitted fail-open like the declared ones. Read
        when the environments are written (at start, after the store lost its data), a
        thousand at a time (``SSCAN``: no reply of 10^6 ids that holds the store up), at
        most KNOWN_AT_START of them; any other is known once this instance has seen its
        snapshot in the store (its first decision) or put it. Never read periodically: that
        walked every API-owned environment every 30 s in every process."""
        known = self.limiter.known
        learned = 0
        async for member in self.redis.sscan_iter(keys.API_OWNED_ENVS, count=1000):
            known.add(member.decode() if isinstance(member, bytes) else member)
            learned += 1
            if learned >= KNOWN_AT_START:
                log.info("%d API-owned environments read at start; the others are known "
                         "once this instance has seen them in the store", learned)
                return

    async def _api_records(self) -> dict[str, Environment]:
        """API-owned environments' records (their snapshots depend on plans.yaml too)."""
        out: dict[str, Environment] = {}
        try:
            ids = [m.decode() if isinstance(m, bytes) else m
                   for m in await self.redis.smembers(keys.API_OWNED_ENVS)]
            for env_id in ids:
                raw = await self.redis.get(keys.definition(env_id))
                if raw is None:
                    continue
                try:
                    out[env_id] = msgspec.json.decode(raw, type=Environment)
                except msgspec.ValidationError as exc:  # e.g. stored before a bound existed
                    log.error("config reload: the stored record of %s is no longer valid "
                              "(%s); its snapshot is left as it is: put it again", env_id, exc)
        except (aredis.RedisError, OSError) as exc:
            log.warning("config reload: API-owned environments not read (%s)", exc)
        return out

    async def _rewrite_api_snapshots(self, records: dict[str, Environment],
                                     config: Config) -> None:
        declared = config.environments.environments

        def build() -> list[tuple[str, str]]:
            return [(env_id, encode(build_snapshot(env, config.plans, config.gateway.timezone)))
                    for env_id, env in records.items()
                    if env_id not in declared]  # (else the file owns it now)

        blobs = await off_loop(build)
        now_ms = self.limiter.clock.now_ms()  # (a pack's days may have changed: when due)
        for start in range(0, len(blobs), CHUNK):
            async with self.redis.pipeline(transaction=False) as pipe:
                for env_id, blob in blobs[start:start + CHUNK]:
                    pipe.set(keys.entitlements(env_id), blob)
                due.queue_marks(pipe, [e for e, _ in blobs[start:start + CHUNK]], now_ms)
                await pipe.execute()

    async def _sync_until_done(self) -> None:
        delay = 0.2
        self.limiter.known.update(self.config.environments.environments)
        while True:
            try:
                await check_store_version(self.redis)
                await self.sync_store_clock()
                config, force = self.config, self._force_sync
                await sync_environments(self.redis, config, force=force,
                                        now_ms=self.limiter.clock.now_ms())
                if force:
                    self._force_sync = False
                if self.api_plans_changed:  # (a reload changed plans while this ran)
                    self.api_plans_changed = False
                    await self._rewrite_api_snapshots(await self._api_records(), config)
                await self.limiter.load_scripts()
                await self.learn_api_owned()
                if config is not self.config:
                    continue  # reloaded meanwhile (it left the writing to this task): again
                self.synced = True
                await self._declared_bandwidth(self.config)
                return
            except (aredis.RedisError, OSError, StoreError) as exc:
                stop_if_cancelling(exc)
                log.warning("store not ready for the environment sync (%s); retrying", exc)
                await pause(delay)
                delay = min(delay * 2, 5.0)

    def _sync_soon(self) -> None:
        """Write the whole config in force to the store in the background, retrying until
        it is done (unless that is already under way: it reads the config in force)."""
        if self.sync_task is None or self.sync_task.done():
            self.sync_task = asyncio.get_running_loop().create_task(self._sync_until_done())

    def resync_if_declared(self, env: str) -> None:
        """The store has no snapshot of an environment the file declares: it lost its data
        (restart without persistence, flush). Write the file again, at most every 5 s."""
        if env not in self.config.environments.environments:
            return
        now = time.monotonic()
        if now - self.resync_at < 5.0 or (self.sync_task and not self.sync_task.done()):
            return
        self.resync_at = now
        log.warning("store has no snapshot of %s: writing the environments again", env)
        self._force_sync = True  # (its digest may have outlived a snapshot)
        self.synced = False
        self.sync_task = asyncio.get_running_loop().create_task(self._sync_until_done())

    async def carry_capacity(self, env: str) -> bool:
        """Report the last capacity size again for today (its excess is billed per day);
        whether there is one (then it is carried again tomorrow)."""
        size = await self.redis.hget(keys.usage(env), "gauge:capacity_bytes")
        if size is not None and int(size) > 0:
            self.limiter.meter(env, "capacity_bytes", int(size))
            return True
        return False

    def renewed(self, env: str) -> None:
        """An environment was renewed: replay its queued invocations now."""
        if self.scheduler is not None:
            task = asyncio.get_running_loop().create_task(self.scheduler.replay(env))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ the store's clock

    async def sync_store_clock(self) -> None:
        """Sample the store's TIME (production clock only; a test's manual clock stays)."""
        clock = self.limiter.clock
        if not isinstance(clock, StoreClock):
            return

        async def store_time() -> tuple[int, int]:
            seconds, micros = await self.limiter.store.execute("TIME")
            return int(seconds), int(micros)

        await clock.sync(store_time)
        metrics.CLOCK_SKEW.set(clock.skew_ms / 1000)

    async def _follow_store_clock(self) -> None:
        """Sample the store's clock again every SYNC_INTERVAL_S (a stepped clock, a
        failover)."""
        while True:
            await pause(SYNC_INTERVAL_S)
            try:
                await self.sync_store_clock()
            except Exception as exc:  # never the end of following it
                stop_if_cancelling(exc)
                log.warning("could not sample the store's clock (%r); dates run on the last "
                            "sample", exc)
            if self._rates_changed():  # (the store away too: the day may change)
                await self._declared_bandwidth(self.config)

    async def _watch_loop_lag(self) -> None:
        """How late the event loop runs a callback due every LAG_PROBE_S (a metric; a log
        line when it held every request for LAG_LOG_S or more)."""
        loop = asyncio.get_running_loop()
        logged_at, times, longest = 0.0, 0, 0.0
        while True:
            due = loop.time() + LAG_PROBE_S
            await asyncio.sleep(LAG_PROBE_S)
            now = loop.time()
            lag = max(now - due, 0.0)
            metrics.LOOP_LAG_SECONDS.observe(lag)
            if lag >= LAG_LOG_S:
                times, longest = times + 1, max(longest, lag)
            if times and now - logged_at >= LAG_LOG_EVERY_S:  # (a line at most so often)
                log.warning("the event loop was blocked %d time(s) for %.0f ms or more "
                            "(longest %.0f ms): no request of this process was served "
                            "meanwhile", times, LAG_LOG_S * 1000, longest * 1000)
                logged_at, times, longest = now, 0, 0.0

    # --------------------------------------------------------------------------- journals

    def journal_dir(self) -> Path | None:
        store = self.config.gateway.store
        if not store.journal:
            return None
        return self.config.resolve(store.journal_dir or str(Path(store.data_dir) / "journal"))

    async def _recover_journals(self) -> None:
        """Write back what gateways that stopped during a store outage left in their journals
        (journal.py); the store being away again only delays it."""
        directory = self.journal_dir()
        if directory is None:
            return
        delay = 0.5
        while True:
            try:
                await self.limiter.recover_journals(directory)
                return
            except (StoreError, OSError) as exc:
                stop_if_cancelling(exc)
                log.warning("journals of stopped gateways not written back yet (%s); "
                            "retrying", exc)
                await pause(delay)
                delay = min(delay * 2, 10.0)

    # -------------------------------------------------------------------------- lifecycle

    async def _once_synced(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work()`` once the store is synced (environments written, clock sampled)."""
        assert self.sync_task is not None
        await asyncio.shield(self.sync_task)
        await work()

    async def start(self, *, upstream_base: Callable[[str], str | None],
                    session: aiohttp.ClientSession | None,
                    admit: Callable[[str, dict], Awaitable[bool]]) -> None:
        """Start the background work. ``upstream_base``, ``session`` and ``admit`` are the
        front door's: where a queued invocation is replayed, with which client, counted how."""
        journal = self.journal_dir()
        if journal is not None:
            try:
                self.limiter.open_journal(journal)
            except (OSError, RuntimeError) as exc:
                log.error("no journal for the fail-open backlog (%s): usage admitted while "
                          "the store is away is lost if this process dies before writing it "
                          "back", exc)
        self.limiter.start_renewing()
        await self._declared_bandwidth(self.config)
        self.mtimes = await self._watched()
        loop = asyncio.get_running_loop()
        gw = self.config.gateway
        tasks = self._tasks
        if gw.reload_poll_ms:
            tasks.append(loop.create_task(self._watch_files()))
        self.sync_task = loop.create_task(self._sync_until_done())
        tasks.append(loop.create_task(self._follow_store_clock()))
        tasks.append(loop.create_task(self._watch_loop_lag()))
        self.scheduler = Scheduler(
            Environments(self.redis, lambda: self.config, self.limiter.clock),  # type: ignore[arg-type]
            self.limiter.clock, upstream_base, session,
            forward=self.limiter.forward_events, admit=admit, carry=self.carry_capacity,
            forward_soon=self.limiter.forward_events_soon, audit=self.audit)
        tasks.append(loop.create_task(self._once_synced(self._recover_journals)))
        if gw.lifecycle_interval_ms:
            # Not before the clock is sampled: its dates are the store's.
            tasks.append(loop.create_task(self._once_synced(functools.partial(
                self.scheduler.run, gw.lifecycle_interval_ms / 1000))))
        if gw.events.webhook_url:
            delivery = control_events.WebhookDelivery(
                self.redis, gw.events, self.limiter.instance)  # type: ignore[arg-type]
            tasks.append(loop.create_task(delivery.run()))
        with contextlib.suppress(TimeoutError):
            # Usually done at once; a store that is down must not block the start.
            async with asyncio.timeout(2.0):  # (not wait_for: it can lose a cancel on 3.11)
                await asyncio.shield(self.sync_task)

    async def stop(self) -> None:
        """Stop the background work (bounded), write back what it can, give slots back,
        close the store connections."""
        # The loops, the first sync, and replays started by renewals (they use the store
        # connection closed below).
        tasks = [*self._tasks, *([self.sync_task] if self.sync_task is not None else []),
                 *self._background]
        self._tasks = []
        for task in tasks:
            task.cancel()
        if tasks:
            # Bounded, and whatever they ended with: the rest of the cleanup (slots given
            # back, the backlog written) must run.
            done, pending = await asyncio.wait(tasks, timeout=STOP_WAIT_S)
            for task in pending:
                log.error("background task %s did not stop within %.0f s", task.get_coro(),
                          STOP_WAIT_S)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("background task %s had failed: %r", task.get_coro(),
                              task.exception())
        if self.limiter.backlog.pending:  # flush_backlog holds a lock: never twice at once
            with contextlib.suppress(StoreError):
                await self.limiter.flush_backlog()
        await self.limiter.close()
        await self.redis.aclose()


def build_runtime(config: Config, store_url: str, clock: Clock | None = None) -> Runtime:
    """The limiter (on the hot-path store connection) and the control plane's client, as
    ``config`` says."""
    gw = config.gateway
    tls = [str(config.resolve(f)) if f else ""
           for f in (gw.store.tls.ca_file, gw.store.tls.cert_file, gw.store.tls.key_file)]
    address = StoreAddress.from_url(store_url).with_tls(*tls)
    store_class = ClusterStore if gw.store.cluster else PipelinedStore
    store = store_class(address, timeout_ms=gw.store.timeout_ms,
                        connect_timeout_ms=gw.store.connect_timeout_ms,
                        retry_interval_ms=gw.store.retry_interval_ms)
    mode: Literal["enforce", "shadow"] = "shadow" if gw.enforcement == "shadow" else "enforce"
    limiter = Limiter(
        store, clock=clock, mode=mode, burst_ms=gw.qps_burst_ms, on_failure=gw.on_store_failure,
        lease_ms=gw.leases.ttl_ms, renew_interval_ms=gw.leases.renew_interval_ms,
    )
    limiter.hot.rate = gw.hot_rate
    timeout_s = max(gw.store.timeout_ms, gw.store.connect_timeout_ms) / 1000
    client_class = RedisCluster if gw.store.cluster else aredis.Redis
    # The control plane's client: the same TLS (the server verified by the URL's host).
    tls_kwargs: dict[str, Any] = {"ssl_ca_certs": tls[0] or None, "ssl_certfile": tls[1] or None,
                                  "ssl_keyfile": tls[2] or None,
                                  "ssl_check_hostname": True} if address.tls else {}
    client = client_class.from_url(
        store_url, socket_timeout=timeout_s * 5, socket_connect_timeout=timeout_s * 5,
        **tls_kwargs)
    runtime = Runtime(config, store_url, limiter, client)
    limiter.on_missing = runtime.resync_if_declared
    metrics.label_envs(gw.metrics_envs)
    return runtime
