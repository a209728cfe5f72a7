"""Headers every front door sends: RateLimit-Policy and RateLimit fields
(draft-ietf-httpapi-ratelimit-headers-11), and request ids.

Both RateLimit fields are Structured-Field lists: one item per policy, ``q`` quota and ``w``
window in seconds for the policy, ``r`` remaining and ``t`` seconds until reset for the
current state.
"""

from __future__ import annotations

import itertools
import re
import secrets
from collections.abc import Mapping

from quotagate.limiter.limiter import Decision


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    if decision.qps_limit <= 0:  # bypassed or mode off: nothing known
        return {}
    # The policy is the same for every request of an environment until its plan changes.
    policy_of = (decision.qps_limit, decision.qps_by_gateway, decision.quota, decision.window_s)
    policy = _POLICIES.get(policy_of)
    if policy is None:
        policy = _policy(*policy_of)
    state = f'"qps";r={decision.qps_remaining};t={-(-decision.qps_reset_ms // 1000)}'
    if decision.window_s > 0:
        state += (f', "calls";r={max(0, decision.remaining)};'
                  f't={max(0, -(-decision.reset_ms // 1000))}')
    return {"RateLimit-Policy": policy, "RateLimit": state}


#: RateLimit-Policy values by (qps, by the gateway version, quota, window): bounded by the
#: plans and limits in force, cleared when it grows past _POLICIES_MAX.
_POLICIES: dict[tuple[int, bool, int, int], str] = {}
_POLICIES_MAX = 4096


def _policy(qps: int, by_gateway: bool, quota: int, window_s: int) -> str:
    policy = f'"qps";q={qps};w=1'
    if by_gateway:  # the gateway version's QPS, lower than the plan's, applies
        policy += ';by="gateway-version"'
    if window_s > 0:
        policy += f', "calls";q={quota};w={window_s}'
    if len(_POLICIES) >= _POLICIES_MAX:
        _POLICIES.clear()
    _POLICIES[qps, by_gateway, quota, window_s] = policy
    return policy


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: Request ids: 16 random hex digits per process, then a counter (unique, and far cheaper per
#: request than uuid4).
_ID_PREFIX = secrets.token_hex(8)
_ids = itertools.count(1)


def request_id(headers: Mapping[str, str]) -> str:
    """The client's X-Request-Id when it is a sane one, else a new id."""
    given = headers.get("X-Request-Id", "")
    if given and _REQUEST_ID.fullmatch(given):
        return given
    return f"{_ID_PREFIX}{next(_ids):016x}"
