"""Write environments.yaml into the store: one entitlement snapshot per environment.

Idempotent and safe with any number of instances starting at once: it rewrites snapshots only,
never usage or pack consumption (packs keep their ids), so re-applying the file resets nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from quotagate.limiter import keys
from quotagate.limiter.entitlements import build_snapshot, encode
from quotagate.limiter.errors import StoreError
from quotagate.settings import Config

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


def snapshots(config: Config) -> dict[str, str]:
    return {
        env_id: encode(build_snapshot(env, config.plans, config.gateway.timezone))
        for env_id, env in config.environments.environments.items()
    }


async def sync_environments(redis: Any, config: Config) -> tuple[int, int]:
    """Apply the file's environments; forget file-owned ones the file no longer declares.

    Returns (written, removed). ``redis`` is a redis-py asyncio client (plain or cluster).
    """
    wanted = snapshots(config)
    previous = {m.decode() if isinstance(m, bytes) else m
                for m in await redis.smembers(keys.FILE_OWNED_ENVS)}
    removed = sorted(previous - set(wanted))
    async with redis.pipeline(transaction=False) as pipe:
        for env_id, blob in wanted.items():
            pipe.set(keys.entitlements(env_id), blob)
        if wanted:
            pipe.sadd(keys.FILE_OWNED_ENVS, *wanted)
            # Declared in the file: owned by the file from now on, whoever created it.
            pipe.srem(keys.API_OWNED_ENVS, *wanted)
        for env_id in removed:
            # The snapshot goes (requests get 404); usage stays for billing.
            pipe.delete(keys.entitlements(env_id))
            pipe.srem(keys.FILE_OWNED_ENVS, env_id)
        await pipe.execute()
    log.info("environments applied: %d written, %d removed", len(wanted), len(removed))
    return len(wanted), len(removed)
