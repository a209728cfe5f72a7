"""RateLimit-Policy and RateLimit fields (draft-ietf-httpapi-ratelimit-headers-11).

Both are Structured-Field lists: one item per policy, ``q`` quota and ``w`` window in seconds
for the policy, ``r`` remaining and ``t`` seconds until reset for the current state.
"""

from __future__ import annotations

import math

from quotagate.limiter.limiter import Decision


def ratelimit_headers(decision: Decision) -> dict[str, str]:
    if decision.qps_limit <= 0:  # bypassed or mode off: nothing known
        return {}
    policy = f'"qps";q={decision.qps_limit};w=1'
    state = f'"qps";r={decision.qps_remaining};t={math.ceil(decision.qps_reset_ms / 1000)}'
    if decision.window_s > 0:
        reset_s = max(0, math.ceil(decision.reset_ms / 1000))
        policy += f', "calls";q={decision.quota};w={decision.window_s}'
        state += f', "calls";r={max(0, decision.remaining)};t={reset_s}'
    return {"RateLimit-Policy": policy, "RateLimit": state}
