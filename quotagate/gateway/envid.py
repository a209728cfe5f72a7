"""Where a request's environment id comes from, validated before it touches any key.

Wherever the platform's SDKs put it (SPEC §13): the host ``{env}.<domain>`` or
``{env}.{region}.<domain>`` for each configured domain, the ``env`` query parameter, the
``X-CloudBase-Env`` header, and on action routes the JSON body's ``env`` / ``envName``
(``with_body_env``). Each is checked against ``[a-z0-9][a-z0-9-]{0,62}``; two that disagree are
refused (400), before any store call.
"""

from __future__ import annotations

import re

from aiohttp import web
from multidict import MultiMapping

from quotagate.common.envids import ENV_ID
from quotagate.gateway.problems import Problem, invalid_environment

ENV_HEADER = "X-CloudBase-Env"
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")


def _shown(value: str) -> str:
    return repr(value[:80]) + ("…" if len(value) > 80 else "")


def _checked(value: str, where: str) -> str:
    if not ENV_ID.fullmatch(value):
        raise invalid_environment(
            f"{where} {_shown(value)} is not an environment id ([a-z0-9][a-z0-9-]{{0,62}})")
    return value


def missing_environment(suffixes: tuple[str, ...]) -> Problem:
    """``suffixes``: ``all_domains(...)``."""
    hosts = ", ".join(f"{{env}}{s}" for s in suffixes)
    return invalid_environment(
        f"no environment: send the {ENV_HEADER} header or the env query parameter"
        + (f", or use {hosts}" if hosts else ""))


def all_domains(domains: tuple[str, ...], domain: str) -> tuple[str, ...]:
    """The configured domains (``domains`` and the older single ``domain``), most specific
    first, each with its leading dot."""
    every = {*domains, *([domain] if domain else [])}
    return tuple(sorted(("." + d.lower() for d in every), key=len, reverse=True))


def _from_host(host: str, suffixes: tuple[str, ...]) -> str | None:
    if not host or not suffixes:
        return None
    if host.startswith("["):  # an IPv6 literal is no environment's host
        return None
    host = host.rsplit(":", 1)[0].lower()
    if host.endswith("."):  # the fully qualified form names the same host
        host = host[:-1]
    for suffix in suffixes:
        if host.endswith(suffix):
            labels = host[: -len(suffix)].split(".")
            if len(labels) > 2 or (len(labels) == 2 and not _REGION.fullmatch(labels[1])):
                raise invalid_environment(
                    f"host {_shown(host)}: expected {{env}}{suffix} or "
                    f"{{env}}.{{region}}{suffix}")
            return _checked(labels[0], "host label")
    return None


def environment_of(request: web.Request, suffixes: tuple[str, ...]) -> str | None:
    """The env id the request names (host, ``env`` parameter, header), or None when it names
    none (realtime sockets name it in their LOGIN frame, action routes maybe in their body).

    ``suffixes``: ``all_domains(...)``. Raises a 400 Problem for a malformed id, a repeated
    parameter or header, or two sources that disagree.
    """
    return environment_from(request.host, request.query_string, request.query,
                            request.headers, suffixes)


def environment_from(host: str, query_string: str, query: MultiMapping[str],
                     headers: MultiMapping[str], suffixes: tuple[str, ...]) -> str | None:
    """``environment_of`` for a request described by its parts (plugin mode: the proxy's
    original host, query and headers)."""
    found = _from_host(host, suffixes)
    where = "the host"
    if query_string and "env" in query_string.lower():
        keys = [k for k in query if k.casefold() in ("env", "envname")]
        if any(k != "env" for k in keys):  # another spelling the upstream may read
            raise invalid_environment("the environment is the env query parameter, spelled "
                                      "so: another spelling (ENV, envName) is ambiguous")
        values = query.getall("env", [])
        if len(values) > 1:
            raise invalid_environment("more than one env query parameter")
        if values:
            found, where = _agree(found, where, _checked(values[0], "env parameter"),
                                  "the env parameter")
    values = headers.getall(ENV_HEADER, [])
    if values:
        if len(values) > 1:
            raise invalid_environment(f"more than one {ENV_HEADER} header")
        found, where = _agree(found, where, _checked(values[0], ENV_HEADER), ENV_HEADER)
    return found


def with_body_env(env: str | None, body: dict[str, object]) -> str | None:
    """``env`` checked against an action body's ``env`` and ``envName`` (each optional)."""
    where = "the request"
    for key in ("env", "envName"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise invalid_environment(f"the body's {key} is not a string")
        env, where = _agree(env, where, _checked(value, f"the body's {key}"),
                            f"the body's {key}")
    return env


def _agree(found: str | None, found_where: str, value: str, where: str) -> tuple[str, str]:
    if found is not None and found != value:
        raise invalid_environment(f"{found_where} names environment {found!r} but {where} "
                                  f"names {value!r}")
    return value, (found_where if found is not None else where)
