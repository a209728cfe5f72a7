"""Headers every front door sends: RateLimit-Policy and RateLimit fields
(draft-ietf-httpapi-ratelimit-headers-11), and request ids.

Both RateLimit fields are Structured-Field lists: one item per policy, ``q`` quota and ``w``
window in seconds for the policy, ``r`` remaining and ``t`` seconds until reset for the
current state.
"""

from __future__ import annotations

import itertools
import math
import re
import secrets
from collections.abc import Mapping

from quotagate.limiter.limiter import Decision


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    if decision.qps_limit <= 0:  # bypassed or mode off: nothing known
        return {}
    policy = f'"qps";q={decision.qps_limit};w=1'
    if decision.qps_by_gateway:  # the gateway version's QPS, lower than the plan's, applies
        policy += ';by="gateway-version"'
    state = f'"qps";r={decision.qps_remaining};t={math.ceil(decision.qps_reset_ms / 1000)}'
    if decision.window_s > 0:
        reset_s = max(0, math.ceil(decision.reset_ms / 1000))
        policy += f', "calls";q={decision.quota};w={decision.window_s}'
        state += f', "calls";r={max(0, decision.remaining)};t={reset_s}'
    return {"RateLimit-Policy": policy, "RateLimit": state}


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
