"""The store's command counts (``INFO commandstats``) and its process, for the per-request
store figures."""

from __future__ import annotations

import redis

SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")


def script_calls(stats: dict) -> int:
    """Script and function calls in an ``INFO commandstats`` reply."""
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in SCRIPT_COMMANDS)


class StoreStats:
    def __init__(self, url: str, pid: int | None = None):
        self.client = redis.Redis.from_url(url)
        self.client.ping()
        #: The store's process, whose CPU per request the report gives.
        self.pid = pid

    def snapshot(self) -> dict[str, int]:
        stats = self.client.info("commandstats")
        return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}

    @staticmethod
    def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
        # INFO itself is the only command the benchmark sends during a run.
        return {k: after[k] - before.get(k, 0) for k in after
                if k != "info" and after[k] - before.get(k, 0) > 0}

    def close(self) -> None:
        self.client.close()
