"""Write environments.yaml into the store: one entitlement snapshot per environment.

Idempotent and safe with any number of instances starting at once: it rewrites snapshots only,
never usage or pack consumption (packs keep their ids), so re-applying the file resets nothing.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import Any

import msgspec

from quotagate import __version__
from quotagate.common.aio import off_loop
from quotagate.limiter import due, keys
from quotagate.limiter.entitlements import SNAPSHOT_VERSION, build_snapshot, encode
from quotagate.limiter.errors import StoreError
from quotagate.settings import Config
from quotagate.settings.load import environments_digest

log = logging.getLogger("quotagate.sync")


MIN_REDIS = (6, 2)


def parse_version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:3] if p.isdigit())


async def check_store_version(redis: Any) -> str:
    """Refuse Redis older than 6.2 (scripts need TIME with effects replication, SET … PX).

    Valkey reports a compatible ``redis_version`` too. Returns the server's description.
    """
    info = await redis.info("server")
    # A cluster client answers per node: {node: info}; check every one.
    infos = [info] if "redis_version" in info else list(info.values())
    described = []
    for node in infos:
        if "valkey_version" in node:
            described.append(f"Valkey {node['valkey_version']}")
            continue
        version = str(node.get("redis_version", "0"))
        if parse_version(version) < MIN_REDIS:
            raise StoreError(
                f"Redis {version} is too old: quotagate needs Redis >= 6.2 or Valkey")
        described.append(f"Redis {version}")
    return ", ".join(sorted(set(described)))


def snapshots(config: Config, only: Iterable[str] | None = None) -> dict[str, str]:
    """The encoded snapshot of each of the file's environments (``only`` these). CPU-bound:
    run off the event loop (``off_loop``) when there are many."""
    declared = config.environments.environments
    return {
        env_id: encode(build_snapshot(declared[env_id], config.plans, config.gateway.timezone))
        for env_id in (declared if only is None else only)
    }


#: Commands per pipelined round trip when many snapshots are written: the event loop packs
#: and reads one chunk at a time, and answers requests between chunks.
CHUNK = 1000


async def write_snapshots(redis: Any, blobs: dict[str, str], removed: Iterable[str],
                          digest: str, now_ms: int = 0) -> None:
    """Write these file-owned environments' snapshots (owned by the file from now on,
    whoever created them) and forget ``removed`` ones (the snapshot goes, requests get 404;
    usage stays for billing), a chunk of pipelined commands at a time; the store then holds
    the file whose ``file_digest`` is ``digest``. The digest is removed before the writes
    and set after them, so a write cut short is never taken for done. The environments
    written are due (``due``) at ``now_ms``, the removed ones leave the due index."""
    await redis.delete(keys.FILE_DIGEST)
    items = list(blobs.items())
    for start in range(0, len(items), CHUNK):
        chunk = items[start:start + CHUNK]
        ids = [env_id for env_id, _ in chunk]
        async with redis.pipeline(transaction=False) as pipe:
            for env_id, blob in chunk:
                pipe.set(keys.entitlements(env_id), blob)
            pipe.sadd(keys.FILE_OWNED_ENVS, *ids)
            pipe.srem(keys.API_OWNED_ENVS, *ids)
            due.queue_marks(pipe, ids, now_ms)
            await pipe.execute()
    gone = list(removed)
    for start in range(0, len(gone), CHUNK):
        batch = gone[start:start + CHUNK]
        async with redis.pipeline(transaction=False) as pipe:
            for env_id in batch:
                pipe.delete(keys.entitlements(env_id))
            pipe.srem(keys.FILE_OWNED_ENVS, *batch)
            due.queue_removals(pipe, batch)
            await pipe.execute()
    await redis.set(keys.FILE_DIGEST, digest)


def file_digest(config: Config) -> str:
    """What the file's snapshots are built from — its environments, the plans, the time
    zone — and the code that builds them (quotagate's version, the snapshot format), hashed.
    The environments' part is worked out where they are parsed, file by file
    (``Config.env_digest``: a reload reuses an unchanged file's); a config built otherwise
    has them hashed here (10^5 environments: ~0.1 s, off the event loop)."""
    h = hashlib.sha256()
    h.update(f"{__version__}\0{SNAPSHOT_VERSION}\0{config.gateway.timezone}\0".encode())
    h.update(msgspec.json.encode(config.plans))
    h.update(config.env_digest
             or environments_digest(config.environments.environments))
    return h.hexdigest()


async def sync_environments(redis: Any, config: Config, blobs: dict[str, str] | None = None,
                            *, digest: str | None = None, force: bool = False,
                            now_ms: int = 0) -> tuple[int, int]:
    """Apply the whole file (at start, and when the store lost its data): every
    environment's snapshot written (``blobs``, else built off the event loop), file-owned
    ones the file no longer declares forgotten. Returns (written, removed). ``redis`` is a
    redis-py asyncio client (plain or cluster).

    Unless ``force``d, nothing is built or written when the store says this very file was
    written whole already (``FILE_DIGEST``: a restart, or another instance, with the same
    files): a start with 10^5 unchanged environments skips seconds of work. ``digest``: the
    config's ``file_digest``, if already worked out; ``now_ms``: when those written are
    due."""
    if digest is None:
        digest = await off_loop(file_digest, config)
    if not force and await redis.get(keys.FILE_DIGEST) == digest.encode():
        log.info("environments applied: unchanged since they were last written whole "
                 "(%d; digest %s)", len(config.environments.environments), digest[:12])
        return 0, 0
    wanted = blobs if blobs is not None else await off_loop(snapshots, config)
    previous = {m.decode() if isinstance(m, bytes) else m
                for m in await redis.smembers(keys.FILE_OWNED_ENVS)}
    removed = sorted(previous - set(wanted))
    await write_snapshots(redis, wanted, removed, digest, now_ms)
    log.info("environments applied: %d written, %d removed", len(wanted), len(removed))
    return len(wanted), len(removed)
