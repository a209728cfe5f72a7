"""limiter/decision.py on its own: what a decision says, and what its call reports."""

from __future__ import annotations

from pathlib import Path

import pytest

from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.decision import BYPASSED, Decision
from tests.helpers import at, env, write_config
from tests.parts import build


@pytest.mark.parametrize(("decision", "kind", "charged"), [
    (Decision(Outcome.ADMITTED), "function", True),
    (Decision(Outcome.QPS_EXCEEDED, flags=Flag.SHADOW_REFUSAL), "function", True),  # shadow
    (BYPASSED, "function", False),  # its cost is in the fail-open backlog
    (Decision(Outcome.ADMITTED, flags=Flag.DATABASE_FREE), "database", False),
    (Decision(Outcome.NOT_FOUND, flags=Flag.SHADOW_REFUSAL), "function", False),
    (Decision(Outcome.ISOLATED, flags=Flag.SHADOW_REFUSAL), "function", False),
    (Decision(Outcome.ISOLATED, flags=Flag.WHILE_ISOLATED), "auth", False),  # at no cost
    (Decision(Outcome.ADMITTED), "sms", False),  # charged to SMS packs first: no refund path
])
def test_charged_calls(decision: Decision, kind: str, charged: bool):
    """Of requests let through: whose calls a refund may give back."""
    assert decision.charged_calls(kind) is charged


async def test_a_missing_snapshot_is_reported(tmp_path: Path, valkey_url: str):
    clock = at("2026-11-26T12:00:00")
    parts = await build(valkey_url, write_config(tmp_path, {"shop": env()}), clock)
    try:
        known = await parts.decider.run("shop", "function", 1, "enforce", clock.script_time())
        assert known.outcome is Outcome.ADMITTED and parts.missing == []
        ghost = await parts.decider.run("ghost", "function", 1, "enforce", clock.script_time())
        assert ghost.outcome is Outcome.NOT_FOUND and not ghost.admitted
        assert parts.missing == ["ghost"]
    finally:
        await parts.close()
