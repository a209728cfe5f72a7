"""Where a request's environment id comes from, validated before it touches any key."""

from __future__ import annotations

from aiohttp import web

from quotagate.gateway.problems import Problem, invalid_environment
from quotagate.limiter.keys import ENV_ID

ENV_HEADER = "X-CloudBase-Env"


def _shown(value: str) -> str:
    return repr(value[:80]) + ("…" if len(value) > 80 else "")


def missing_environment(domain: str) -> Problem:
    return invalid_environment(
        f"no environment: send the {ENV_HEADER} header"
        + (f" or use {{env}}.{domain}" if domain else ""))


def environment_of(request: web.Request, domain: str) -> str | None:
    """The env id from the host ``{env}.<domain>`` (when configured), else the header; None
    when the request names none (realtime sockets name it in their LOGIN frame).

    Raises a 400 Problem for a malformed id.
    """
    if domain:
        host = (request.host or "").rsplit(":", 1)[0].lower() if request.host else ""
        suffix = "." + domain
        if host.endswith(suffix):
            candidate = host[: -len(suffix)]
            if ENV_ID.fullmatch(candidate):
                return candidate
            raise invalid_environment(
                f"host label {_shown(candidate)} is not an environment id "
                "([a-z0-9][a-z0-9-]{0,62})"
            )
    values = request.headers.getall(ENV_HEADER, [])
    if not values:
        return None
    if len(values) > 1:
        raise invalid_environment(f"more than one {ENV_HEADER} header")
    value = values[0]
    if not ENV_ID.fullmatch(value):
        raise invalid_environment(
            f"{ENV_HEADER} {_shown(value)} is not an environment id ([a-z0-9][a-z0-9-]{{0,62}})"
        )
    return value
