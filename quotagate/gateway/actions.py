"""Action endpoints: the platform SDKs' ``/web`` (js-sdk's CLOUD_API mode) and ``/admin``
(node-sdk) carry the operation in a JSON body, ``{"action": "functions.invokeFunction",
"function_name": "f", "env": "...", ...}``.

The body is read whole, up to the route's ``max_body_bytes`` (a larger one is refused rather
than guessed), decoded once, and counted as the kind its ``action`` names (ACTION_KINDS:
functions, database, storage, auth) exactly as a path route of that kind would be —
an invocation with its function's concurrency slot and GBs. The bytes go to the upstream
unchanged. Only requests on action routes pay for this.

An action the route lists in ``pass_while_isolated`` (the shipped ``/web``:
``auth.wsWebSign``, js-sdk's realtime sign call) is marked so: the store lets it through, at
no cost, while the environment is isolated — so the SDK opens its realtime socket, where the
gateway tells it the state (3050) — and refuses the rest.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from aiohttp import web

from quotagate.gateway.envid import with_body_env
from quotagate.gateway.problems import (
    body_too_large,
    invalid_action,
    invalid_function,
)
from quotagate.gateway.routing import CompiledRoute
from quotagate.gateway.streams import read_prefix
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
    #: The route lets this action through while the environment is isolated (at no cost).
    while_isolated: bool = False


async def read_body(request: web.Request, limit: int) -> bytes | None:
    """The whole body, or None when it is longer than ``limit`` (it may arrive in pieces:
    ``read(n)`` returns what has come so far)."""
    if (request.content_length or 0) > limit:
        return None
    body, whole = await read_prefix(request, limit)
    return body if whole else None


#: The members that decide how a request is counted: each must appear once, spelled so.
_DECIDING = {"action": "action", "env": "env", "envname": "envName",
             "function_name": "function_name"}


def _members(body: bytes, env: str | None) -> dict[str, object]:
    """The top-level members of a JSON object body. Refused (400) when not JSON, not an
    object, or when a deciding member appears twice or in another case: parsers disagree on
    which of two wins (and some match keys without case), so the upstream could read another
    action or environment than the one counted."""
    request_is_encoded = body[:2] == b"\x1f\x8b"  # gzip's magic
    top: list[list[tuple[str, object]]] = []

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        top[:] = [items]  # the outermost object closes last
        return dict(items)

    try:
        decoded = json.loads(body, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        hint = " (compressed? send it uncompressed)" if request_is_encoded else ""
        raise invalid_action(f"the body is not JSON{hint} ({str(exc)[:120]}); an action "
                             'endpoint takes {"action": "<group>.<name>", ...}', env) from None
    if not isinstance(decoded, dict) or not top:
        raise invalid_action('an action endpoint takes a JSON object {"action": '
                             '"<group>.<name>", ...}', env)
    seen: set[str] = set()
    for key, _ in top[0]:
        folded = key.casefold()  # some parsers match keys without case
        if folded in _DECIDING:
            if key != _DECIDING[folded] or folded in seen:
                raise invalid_action(f"the body names {_DECIDING[folded]!r} more than once "
                                     "or in another case: ambiguous", env)
            seen.add(folded)
    return decoded


async def read_action(request: web.Request, route: CompiledRoute,
                      env: str | None) -> ActionRequest:
    """Read and classify an action request; raises a Problem (400, 413) when it cannot be."""
    assert route.actions is not None
    limit = route.route.max_body_bytes
    body = await read_body(request, limit)
    if body is None:
        raise body_too_large(limit, env)
    return classify_action(route, body, request.headers.get("Content-Encoding", ""), env)


def classify_action(route: CompiledRoute, body: bytes, content_encoding: str,
                    env: str | None) -> ActionRequest:
    """An action request's body counted as its action (the body read already, within the
    route's ``max_body_bytes``); raises a Problem (400) when it cannot be."""
    assert route.actions is not None
    if (content_encoding or "identity").lower() != "identity":
        raise invalid_action("an action request's body is read to count it: send it "
                             "without Content-Encoding", env)
    decoded = _members(body, env)
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
    return ActionRequest(route.actions[kind], body, env, function,
                         action in route.route.pass_while_isolated)

