"""The due index: when each environment next has lifecycle work, so that background work
reads what is due and never walks every environment.

An environment is put in the index (``qg:due:{dN}``, a sorted set per shard, scored by the
store-clock epoch ms it is due) whenever something about it changes: a record written through
the admin API, a snapshot written from the file, events a script left in its stream, a
capacity size reported, an invocation queued. The scheduler (``control.lifecycle``) takes
one shard at a time (a claim with a token), reads the entries due, does each environment's
work and scores it again with the next day something happens to it, or takes it out.

The scheduler's new score is written only if the entry still has the score it was read with
(``SETTLE``, a compare-and-set), so every mark must change the score: a mark scores its
environment "now" minus half a millisecond, and a little less again when the entry already
has a score in that millisecond (two marks in one millisecond). Days are whole
milliseconds, so a mark never equals one.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from quotagate.limiter import keys

#: Score the entry ARGV[1] again with ARGV[3] ("" = remove it), only if its score is still
#: ARGV[2], the one it was read with (a mark meanwhile scored it anew: it stays due).
SETTLE = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
if ARGV[3] == '' then return redis.call('ZREM', KEYS[1], ARGV[1]) end
redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
return 1
"""
#: Make ARGV[3...] due at ARGV[1] (now - 0.5 ms), each with a score it did not have before.
#: ARGV[2] = "nx": only those not in the index at all (the index filled in, nothing else).
MARK = """
local at, nx = tonumber(ARGV[1]), ARGV[2] == 'nx'
for i = 3, #ARGV do
  local had = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[i]))
  if not (nx and had) then
    local score = at
    if had and had > at - 1 and had <= at then score = had - 1 / 1024 end
    redis.call('ZADD', KEYS[1], score, ARGV[i])
  end
end
return 0
"""
#: ARGV[1] keeps a size to carry into each day's bill: due by ARGV[3] (the next local
#: midnight). An entry due already (a round may be at it: its score is changed, so that
#: round's compare-and-set fails and it is looked at again) is marked again at ARGV[2].
BY = """
local had = tonumber(redis.call('ZSCORE', KEYS[1], ARGV[1]))
local now, by = tonumber(ARGV[2]), tonumber(ARGV[3])
if had and had <= now + 0.5 then
  local score = now
  if had > now - 1 then score = had - 1 / 1024 end
  redis.call('ZADD', KEYS[1], score, ARGV[1])
elseif not had or had > by then
  redis.call('ZADD', KEYS[1], by, ARGV[1])
end
return 0
"""


def shard_of(env: str) -> int:
    return zlib.crc32(env.encode()) % keys.DUE_SHARDS


def changed_score(now_ms: int) -> float:
    """The score of an environment that changed at ``now_ms`` (due at once)."""
    return now_ms - 0.5


def by_shard(envs: Iterable[str]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = defaultdict(list)
    for env in envs:
        out[shard_of(env)].append(env)
    return out


def queue_marks(pipe: Any, envs: Iterable[str], now_ms: int, *, only_new: bool = False
                ) -> None:
    """Queue on a redis-py pipeline the commands that make ``envs`` due at once (one per
    shard); ``only_new``: only those not in the index."""
    score = repr(changed_score(now_ms))
    for shard, ids in by_shard(envs).items():
        pipe.eval(MARK, 1, keys.due(shard), score, "nx" if only_new else "", *ids)


def queue_removals(pipe: Any, envs: Iterable[str]) -> None:
    for shard, ids in by_shard(envs).items():
        pipe.zrem(keys.due(shard), *ids)


async def mark(redis: Any, envs: Iterable[str], now_ms: int, *, only_new: bool = False
               ) -> None:
    """Make ``envs`` due at once (they changed): one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        queue_marks(pipe, envs, now_ms, only_new=only_new)
        await pipe.execute()


async def due_by(redis: Any, env: str, now_ms: int, by_ms: int) -> None:
    """``env`` is due by ``by_ms`` at the latest (see ``BY``)."""
    shard = keys.due(shard_of(env))
    await redis.eval(BY, 1, shard, env, repr(changed_score(now_ms)), by_ms)
