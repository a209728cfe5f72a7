"""The listing's paging against the store itself (issue 24, item 5): a filtered page looks at
a bounded number of environments, ids stored before the index existed are listed, stale index
entries are skipped and dropped, and the same paging works on a cluster (the set and its index
in one hash slot)."""

from __future__ import annotations

from pathlib import Path

import msgspec
import redis.asyncio as aredis
from redis.asyncio.cluster import RedisCluster

from quotagate.control.envs import API_ENV_INDEX, Environments, Filters
from quotagate.limiter import keys
from quotagate.limiter.sync import sync_environments
from quotagate.settings.schema import Environment
from tests.helpers import at, env, write_config
from tests.test_cluster import cluster  # noqa: F401  (the module's cluster fixture)


def record(**extra: object) -> Environment:
    return msgspec.convert(env(**extra), Environment)  # type: ignore[arg-type]


async def everything(envs: Environments, limit: int, filters: Filters | None = None,
                     budget: int = 5000) -> list[list[str]]:
    pages, after = [], ""
    while True:
        records, reached = await envs.page(after, limit, filters, budget=budget)
        pages.append([r.env_id for r in records])
        if reached is None:
            return pages
        assert reached > after  # always forward
        after = reached


async def test_a_filtered_page_looks_at_a_bounded_number(tmp_path: Path, store: aredis.Redis
                                                         ) -> None:
    config = write_config(tmp_path, {f"f{i:03d}": env() for i in range(40)})
    envs = Environments(store, lambda: config, at("2026-11-26T12:00:00"))
    for i in range(40):
        await envs.put(f"a{i:03d}", record(plan="personal" if i % 8 else "free"))
    pages = await everything(envs, 5, Filters(plan="free"), budget=10)
    assert [e for p in pages for e in p] == [f"a{i:03d}" for i in range(0, 40, 8)]
    assert len(pages) >= 8  # 80 environments, at most 10 looked at a page
    assert any(p == [] for p in pages)  # empty pages before the end: go on while a cursor
    assert await everything(envs, 1000, Filters(state="not-started")) == [[]]


async def test_ids_stored_before_the_index_are_listed_and_stale_entries_dropped(
        tmp_path: Path, store: aredis.Redis) -> None:
    config = write_config(tmp_path, {"m-file": env()})
    old = Environments(store, lambda: config, at("2026-11-26T12:00:00"))
    for e in ("z-old", "b-old"):  # as a version without the index wrote them
        await store.set(keys.definition(e), msgspec.json.encode(record()))
        await store.sadd(keys.API_OWNED_ENVS, e)
    await old.put("c-new", record())
    await store.srem(keys.API_OWNED_ENVS, "c-new")  # released: only the index still has it
    assert await everything(old, 2) == [["b-old", "m-file"], ["z-old"]]
    assert await store.zrange(API_ENV_INDEX, 0, -1) == [b"b-old", b"z-old"]


async def test_the_ids_before_the_index_are_walked_once_per_store(
        tmp_path: Path, store: aredis.Redis) -> None:
    """Issue 24: the backfill of the index walks the API-owned set (SSCAN) once for the
    store, not once in each process: another process's first listing only asks."""
    config = write_config(tmp_path, {"m-file": env()})
    for e in ("z-old", "b-old"):  # as a version without the index wrote them
        await store.set(keys.definition(e), msgspec.json.encode(record()))
        await store.sadd(keys.API_OWNED_ENVS, e)
    first = Environments(store, lambda: config, at("2026-11-26T12:00:00"))
    assert await everything(first, 10) == [["b-old", "m-file", "z-old"]]
    await store.config_resetstat()
    other = Environments(store, lambda: config, at("2026-11-26T12:00:00"))  # another process
    assert await everything(other, 10) == [["b-old", "m-file", "z-old"]]
    assert "cmdstat_sscan" not in await store.info("commandstats")


async def test_listing_on_a_cluster(cluster: list[int], tmp_path: Path) -> None:  # noqa: F811
    config = write_config(tmp_path, {"m-filed": env(), "zz-filed": env()})
    rc = RedisCluster(host="127.0.0.1", port=cluster[0])
    try:
        await rc.initialize()
        await rc.delete(keys.API_OWNED_ENVS, API_ENV_INDEX)
        await sync_environments(rc, config)
        envs = Environments(rc, lambda: config, at("2026-11-26T12:00:00"))  # type: ignore[arg-type]
        ids = [f"c{i:02d}" for i in range(12)]
        for e in ids:  # several slots / nodes
            await envs.put(e, record())
        await rc.srem(keys.API_OWNED_ENVS, "c05")
        pages = await everything(envs, 3)
        assert all(len(p) <= 3 for p in pages)
        assert [e for p in pages for e in p] == [
            *(e for e in ids if e != "c05"), "m-filed", "zz-filed"]
        assert await everything(envs, 100, Filters(owner="file")) == [["m-filed", "zz-filed"]]
    finally:
        await rc.aclose()
