"""Action endpoints: the platform SDKs' ``/web`` (js-sdk's CLOUD_API mode) and ``/admin``
(node-sdk) carry the operation in a JSON body, ``{"action": "functions.invokeFunction",
"function_name": "f", "env": "...", ...}``.

The body is read whole, up to the route's ``max_body_bytes`` (a larger one is refused rather
than guessed), decoded once, and counted as the kind its ``action`` names (ACTION_KINDS:
functions, database, storage, auth, ai) exactly as a path route of that kind would be —
an invocation with its function's concurrency slot and GBs. The bytes go to the upstream
unchanged. Only requests on action routes pay for this.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import msgspec
from aiohttp import web

from quotagate.gateway.envid import with_body_env
from quotagate.gateway.problems import (
    body_too_large,
    invalid_action,
    invalid_function,
)
from quotagate.gateway.routing import CompiledRoute
from quotagate.settings.schema import ACTION_KINDS, FUNCTION_NAME

_FUNCTION_NAME = re.compile(FUNCTION_NAME)
_GROUPS = ", ".join(f"{group}.*" for group in ACTION_KINDS)


@dataclass(frozen=True, slots=True)
class ActionRequest:
    #: The route as this action's kind is counted and metered.
    route: CompiledRoute
    #: The body, forwarded as it came.
    body: bytes
    #: The env id the request names, the body's included (checked to agree).
    env: str | None
    #: The function an invocation runs ("" for other actions).
    function: str


async def read_action(request: web.Request, route: CompiledRoute,
                      env: str | None) -> ActionRequest:
    """Read and classify an action request; raises a Problem (400, 413) when it cannot be."""
    assert route.actions is not None
    limit = route.route.max_body_bytes
    if (request.content_length or 0) > limit:
        raise body_too_large(limit, env)
    body = await request.content.read(limit + 1)
    if len(body) > limit:
        raise body_too_large(limit, env)
    try:
        decoded = msgspec.json.decode(body) if body else None
    except msgspec.DecodeError as exc:
        raise invalid_action(f"the body is not JSON ({exc}); an action endpoint takes "
                             '{"action": "<group>.<name>", ...}', env) from None
    if not isinstance(decoded, dict):
        raise invalid_action('an action endpoint takes a JSON object {"action": '
                             '"<group>.<name>", ...}', env)
    action = decoded.get("action")
    if not isinstance(action, str) or "." not in action:
        raise invalid_action(f"no action ('<group>.<name>'; groups: {_GROUPS})", env)
    group = action.split(".", 1)[0]
    kind = ACTION_KINDS.get(group)
    if kind is None:
        raise invalid_action(f"unknown action {action[:100]!r} (groups: {_GROUPS})", env)
    env = with_body_env(env, decoded)
    function = ""
    if kind == "function":
        name = decoded.get("function_name")
        if not isinstance(name, str) or not _FUNCTION_NAME.fullmatch(name):
            raise invalid_function(f"function_name {str(name)[:100]!r} of {action}",
                                   env or "")
        function = name
    return ActionRequest(route.actions[kind], body, env, function)

