"""The gateway's one way to ask for a decision: counted in the metrics, store failures turned
into the fail-closed problem."""

from __future__ import annotations

import logging
import time

from quotagate.common import metrics
from quotagate.gateway.problems import Problem, store_unavailable
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.errors import StoreError, StoreUnavailable
from quotagate.limiter.limiter import Decision, Limiter

log = logging.getLogger("quotagate.gateway")

_REASONS = {o: o.name.lower().replace("_", "-") for o in Outcome}
# Bound once: the hot path must not look labels up per request.
_ADMITTED = metrics.DECISIONS.labels("admitted", "")


def decided_now(limiter: Limiter, env: str, kind: str, cost: int, needs: str = ""
                ) -> Decision | None:
    """A request without a slot decided in memory now (a hot environment's lease), counted
    in the metrics; None: ask ``decide`` (with ``in_memory=False``: this was tried). No
    coroutine and no store: the hot path of a hot environment."""
    decision = limiter.decide_now(env, kind, cost, needs)
    if decision is not None:
        _count(env, decision, limiter)
    return decision


async def decide(limiter: Limiter, env: str, kind: str, cost: int, slot: str = "",
                 needs: str = "", holder: str = "", holder_lease_ms: int = 0,
                 while_isolated: bool = False, in_memory: bool = True) -> Decision | Problem:
    """One decision, counted in the metrics; a Problem when the store fails closed.

    A refused decision is returned as it is (the caller words the refusal). ``holder``:
    plugin mode's slot holder; ``while_isolated``: the request may pass, at no cost, while
    the environment is isolated (``Limiter.decide``); ``in_memory=False``: ``decided_now``
    was asked already.
    """
    started = time.perf_counter()
    try:
        decision = await limiter.decide(env, kind, cost, slot, needs, holder, holder_lease_ms,
                                        while_isolated, in_memory)
    except StoreUnavailable:  # (counted in quotagate_store_errors_total by the limiter)
        metrics.DECISIONS.labels("refused", "store-unavailable").inc()
        return store_unavailable(env)
    except StoreError as exc:
        log.error("decision failed for %s: %s", env, exc)
        metrics.DECISIONS.labels("refused", "store-unavailable").inc()
        return store_unavailable(env)
    if not decision.flags & Flag.LEASED:  # (one from a lease asked the store nothing)
        metrics.DECISION_SECONDS.observe(time.perf_counter() - started)
    _count(env, decision, limiter)
    return decision


def _count(env: str, decision: Decision, limiter: Limiter) -> None:
    if decision.store_bypassed:
        result = "bypassed"
        metrics.DECISIONS.labels("bypassed", "store-unavailable").inc()
        metrics.BACKLOG.set(len(limiter.backlog))
    elif not decision.admitted:
        result = "refused"
        metrics.DECISIONS.labels("refused", _REASONS[decision.outcome]).inc()
    elif decision.flags & Flag.SHADOW_REFUSAL:
        result = "shadow_refused"
        metrics.DECISIONS.labels("shadow_refused", _REASONS[decision.outcome]).inc()
    elif decision.flags & Flag.WHILE_ISOLATED:
        result = "passed"  # at no cost: the SDK's sign call, so it learns the state
        metrics.DECISIONS.labels("passed", _REASONS[decision.outcome]).inc()
    else:
        result = "admitted"
        _ADMITTED.inc()
    if env in metrics.labelled_envs:
        metrics.ENV_DECISIONS.labels(env, result).inc()
