"""limiter/backlog.py on its own: the fail-open backlog is bounded in all and per environment,
gives back what it holds, and keeps every change in its journal."""

from __future__ import annotations

from pathlib import Path

from quotagate.limiter.backlog import Backlog
from quotagate.limiter.journal import Journal, replay


def test_bounded_in_all_and_per_environment():
    backlog = Backlog(max_entries=3, max_per_env=2)
    assert backlog.admit(("a", "function", 0), 1)
    assert backlog.admit(("a", "function", 900_000), 1)
    assert not backlog.admit(("a", "database", 0), 1)  # a's room is used up
    assert backlog.admit(("a", "function", 0), 5)  # an entry it holds still grows
    assert backlog.admit(("b", "function", 0), 1)
    assert not backlog.admit(("c", "function", 0), 1)  # all room used up
    backlog.add(("c", "function", 0), 4)  # already passed: dropped, and counted
    assert backlog.dropped == 4
    assert backlog.pending == {("a", "function", 0): 6, ("a", "function", 900_000): 1,
                               ("b", "function", 0): 1}
    assert backlog.total("a") == 7


def test_remove_gives_back_what_it_holds():
    backlog = Backlog()
    backlog.admit(("a", "function", 0), 5)
    assert backlog.remove(("a", "function", 0), 3) == 3
    assert backlog.remove(("a", "function", 0), 9) == 2
    assert backlog.pending == {} and backlog.per_env == {}
    assert backlog.admit(("a", "function", 0), 1)  # its room is free again


def test_every_change_is_journaled(tmp_path: Path):
    backlog = Backlog()
    backlog.journal = Journal(tmp_path, "gw-1").open()
    backlog.admit(("a", "function", 0), 5)
    backlog.admit(("b", "meter:gbs", 0), 700)
    backlog.remove(("a", "function", 0), 2)
    backlog.journal.close(remove=False)
    left = {key: amount for key, amount, _ in replay(tmp_path / "gw-1.journal")}
    assert left == {("a", "function", 0): 3, ("b", "meter:gbs", 0): 700}
