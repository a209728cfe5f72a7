"""A Valkey Cluster failover followed (issue 13): 3 primaries + 3 replicas, ``kill -9`` of the
primary serving some environments while decisions flow. A dead primary never answers MOVED:
the gateway's client finds the promoted replica by asking the other nodes (on failures, at
most every 0.5 s), and decides there again within 10 s of the kill; what it admitted is what
the cluster counts, in both failure policies."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster

from quotagate.common.addresses import StoreAddress
from quotagate.limiter import keys
from quotagate.limiter.cluster import ClusterStore, slot_of
from quotagate.limiter.errors import StoreUnavailable
from quotagate.limiter.limiter import Limiter
from quotagate.limiter.sync import sync_environments
from tests.helpers import at, env, write_config
from tests.test_cluster import _wait, valkey_cluster

ENVS = [f"fo-{i}" for i in range(12)]


@pytest.fixture
def cluster(tmp_path: Path):
    """Six nodes, three primaries with a replica each; a node missing for 1 s is failed."""
    with valkey_cluster(tmp_path / "cluster", 6, 1, "--cluster-node-timeout", "1000") as made:
        yield made


async def counted(port: int) -> dict[str, int]:
    rc = RedisCluster(host="127.0.0.1", port=port)
    try:
        return {e: sum(int(v) for v in (await rc.hgetall(keys.usage(e))).values())
                for e in ENVS}
    finally:
        await rc.aclose()


@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_a_killed_primary_is_replaced_within_10_s_and_nothing_is_lost(
        cluster, tmp_path: Path, policy: str):
    ports, procs, cli = cluster
    config = write_config(tmp_path, {e: env(limits={"calls": 10**9, "qps": 1_000_000})
                                     for e in ENVS})
    rc = RedisCluster(host="127.0.0.1", port=ports[0])
    await sync_environments(rc, config)
    await rc.aclose()
    probe = ClusterStore(StoreAddress(port=ports[0]))
    await probe.refresh()
    owners = {e: probe.slots[slot_of(e)][1] for e in ENVS}  # type: ignore[index]
    await probe.close()
    for port in set(owners.values()):  # replicas have the snapshots before the kill
        _wait(cli, port, "WAIT 1 2000", "1")
    victim = max(set(owners.values()), key=lambda p: list(owners.values()).count(p))
    shard = {e for e, p in owners.items() if p == victim}
    alive = next(p for p in ports if p != victim)

    store = ClusterStore(StoreAddress(port=alive), timeout_ms=200, connect_timeout_ms=200,
                         retry_interval_ms=100)
    lim = Limiter(store, clock=at("2026-11-26T12:00:00"), on_failure=policy)
    admitted = dict.fromkeys(ENVS, 0)
    outcomes = []  # (seconds since the kill, env, "decided" | "bypassed" | "unavailable")
    killed_at: float | None = None
    stop = asyncio.Event()

    async def load() -> None:  # about 100 decisions a second over the 12 environments
        i = 0
        while not stop.is_set():
            e = ENVS[i % len(ENVS)]
            i += 1
            try:
                d = await lim.decide(e, "function", 1)
                kind = "bypassed" if d.store_bypassed else "decided"
                if d.admitted:
                    admitted[e] += 1
            except StoreUnavailable:
                kind = "unavailable"
            since = time.monotonic() - killed_at if killed_at is not None else -1.0
            outcomes.append((since, e, kind))
            await asyncio.sleep(0.01)

    try:
        await store.refresh()
        loading = asyncio.create_task(load())
        await asyncio.sleep(1.5)
        procs[victim].kill()  # kill -9
        killed_at = time.monotonic()
        back_at = None
        while time.monotonic() - killed_at < 20:
            await asyncio.sleep(0.1)
            back = [s for s, e, k in outcomes if s > 0 and e in shard and k == "decided"]
            if back:
                back_at = back[0]
                break
        await asyncio.sleep(1.0)
        stop.set()
        await loading
        assert back_at is not None and back_at < 10.0, back_at
        # Nothing lost, nothing doubled: fail-open's write-back included.
        deadline = time.monotonic() + 15
        while lim.backlog.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not lim.backlog.pending
        await asyncio.sleep(0.5)  # the last settles
        assert await counted(alive) == admitted
        during = [k for s, e, k in outcomes if 0 < s < back_at and e in shard]
        print(f"\n{policy}: decided again on the promoted replica {back_at:.2f} s after the "
              f"kill; meanwhile {during.count('bypassed')} bypassed, "
              f"{during.count('unavailable')} refused 503 on that shard; "
              f"{store.refreshes} slot-map refreshes; {sum(admitted.values())} admitted")
    finally:
        await lim.close()
