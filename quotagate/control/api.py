"""The admin API: JSON over HTTP under ``/admin/v1`` on the admin listener (never the public
port), bearer token compared in constant time. docs/openapi.yaml describes every route (a test
checks it against these)."""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import os
import re
import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import msgspec
from aiohttp import web
from redis import exceptions as redis_errors

from quotagate.billing import versions
from quotagate.billing.bills import bill, billable_envs, total
from quotagate.common import metrics
from quotagate.common.aio import stop_if_cancelling
from quotagate.common.clock import StoreClock
from quotagate.common.envids import ENV_ID
from quotagate.common.problem import problem_response
from quotagate.control import audit
from quotagate.control.envs import (
    STATES,
    ControlError,
    Environments,
    Filters,
    Invalid,
    NotFound,
)
from quotagate.control.tokens import (
    ADMIN,
    LEAST_ROLE,
    MONEY,
    OPERATOR,
    READ,
    SETTINGS,
    Principal,
    Token,
    Tokens,
)
from quotagate.control.usage import usage_report
from quotagate.limiter import due, keys
from quotagate.limiter.errors import StoreError, StoreUnavailable
from quotagate.limiter.limiter import Limiter
from quotagate.settings.schema import GATEWAY_TERMS, MAX_EXACT, PACK_METERS, Environment

log = logging.getLogger("quotagate.admin")

PREFIX = "/admin/v1"
TOKEN_ENV = "QUOTAGATE_ADMIN_TOKEN"
ENVS = web.AppKey("control_envs", Environments)
TOKEN = web.AppKey("admin_token", str)
TOKENS = web.AppKey("admin_tokens", Tokens)
AUDIT = web.AppKey("admin_audit", audit.Audit)
#: The request's Principal (who made it), set by the guard.
PRINCIPAL = web.RequestKey("quotagate_principal", Principal)
LIMITER = web.AppKey("control_limiter", Limiter)
RenewedHook = Callable[[str], None]
RENEWED: web.AppKey[RenewedHook] = web.AppKey("control_renewed")

#: Meters reported by the platform (the gateway cannot see them), SPEC §3.
INGESTED_METERS = ("outbound_bytes", "cdn_origin_bytes", "ai_tokens", "capacity_bytes")
#: Gauges: ``amount`` is the current size (0 allowed), not an increment.
GAUGES = ("capacity_bytes",)
MAX_BATCH = 10_000
#: Oldest usage accepted: well inside the 40 days an id is remembered, so no retry of an old
#: record can count twice.
MAX_AGE_MS = 30 * 86_400_000
_RECORD_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


#: Problem types of the admin API, by status (RFC 9457; the gateway's are in problems.py).
_ADMIN_PROBLEMS = {
    400: ("bad-request", "Malformed request"),
    401: ("unauthorized", "Missing or wrong bearer token"),
    403: ("forbidden", "Not allowed for this token"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Refused"),
    413: ("body-too-large", "Request body too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("invalid", "Invalid values"),
    500: ("internal-error", "Internal error"),
    503: ("store-unavailable", "Store unavailable"),
}


def _error(status: int, message: str, **detail: Any) -> web.Response:
    """An admin refusal as application/problem+json; ``detail`` adds extension members
    (``meters``, ``issues``, ``done``)."""
    slug, title = _ADMIN_PROBLEMS.get(status, ("error", "Error"))
    return problem_response(status, f"admin/{slug}", title, message, **detail)


#: The store is away (down, restarting, failing over), not wrong: the client should retry.
STORE_AWAY = (StoreUnavailable, redis_errors.ConnectionError, redis_errors.TimeoutError,
              redis_errors.ReadOnlyError, redis_errors.ClusterDownError,
              redis_errors.TryAgainError, redis_errors.MasterDownError)


def _store_down(exc: BaseException) -> web.Response:
    response = _error(503, f"the store cannot be reached ({exc}); retry the request (each "
                      "admin change is safe to repeat)")
    response.headers["Retry-After"] = "1"
    return response


def _not_synced() -> web.Response:
    response = _error(503, "the gateway has not sampled the store's clock yet (the store was "
                      "unreachable at start): dates would be wrong; retry")
    response.headers["Retry-After"] = "1"
    return response


def _unauthorized(message: str) -> web.Response:
    response = _error(401, message)
    response.headers["WWW-Authenticate"] = 'Bearer realm="quotagate-admin"'
    return response


async def authenticate(request: web.Request) -> Principal | web.Response:
    """Who the bearer token is (the operator's QUOTAGATE_ADMIN_TOKEN, compared in constant
    time without the store, or a scoped token looked up in it), or the 401 problem."""
    expected = request.app[TOKEN]
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return _unauthorized("missing bearer token (Authorization: Bearer <token>)")
    if expected and hmac.compare_digest(  # (digests: equal lengths, whatever was sent)
            hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()):
        return OPERATOR
    principal = await request.app[TOKENS].identify(given)
    if principal is None:
        return _unauthorized("wrong bearer token" + (
            "" if expected else f" ({TOKEN_ENV} is not set for this gateway: only scoped "
            "tokens are taken)"))
    return principal


async def refuse_unless(request: web.Request, permission: str) -> web.Response | None:
    """For a route outside /admin/v1 behind the same tokens (``/metrics`` with
    ``metrics_auth``): the 401 / 403 / 503 problem, or None when the token may
    (``permission``, over every environment: never an environment token)."""
    try:
        who = await authenticate(request)
    except STORE_AWAY as exc:
        return _store_down(exc)
    if isinstance(who, web.Response):
        return who
    if who.role == "env" or not who.may(permission):
        return _error(403, f"token {who.id} ({who.name!r}) is a {who.role} token: "
                      f"{request.path} needs {permission} over every environment (role "
                      f"{LEAST_ROLE[permission]} or admin)", role=who.role, needs=permission)
    return None


def forbidden(request: web.Request, who: Principal) -> web.Response | None:
    """The 403 problem when ``who`` may not call this route (None: it may)."""
    route = request.match_info.route.resource
    if route is None:  # no such route: the handler answers 404 / 405
        return None
    key = (request.method, route.canonical)
    need = PERMISSION.get(key)
    if need is None:  # (a method the resource has not: 405)
        return None
    if who.role == "env":
        if key in ENV_TOKEN_ROUTES:
            if "{env}" in route.canonical:
                own = request.match_info.get("env") == who.env
            elif key == ("GET", PREFIX + "/bills"):  # its own lines only
                own = request.query.get("env") == who.env
            else:  # who it is, what is sold
                own = True
            if own:
                return None
        return _error(403, f"token {who.id} ({who.name!r}) reads environment {who.env} "
                      f"only: not {request.method} {request.path}", role=who.role,
                      env=who.env)
    if who.may(need):
        return None
    return _error(403, f"token {who.id} ({who.name!r}) is a {who.role} token: "
                  f"{request.method} {route.canonical} needs {need} (role "
                  f"{LEAST_ROLE[need]} or admin)", role=who.role, needs=need)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token on every /admin/v1 route (401 without one, 403 where its role may not);
    every change (a route that needs more than read) recorded in the audit trail with its
    answer's status, refused or not; the request id (``X-Request-Id``, given or made) on
    the answer."""
    if not request.path.startswith(PREFIX):
        return await handler(request)
    given = request.headers.get("X-Request-Id", "")
    request_id = given if _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex
    response = await _answer(request, handler)
    if not response.prepared:
        response.headers["X-Request-Id"] = request_id
    who = request.get(PRINCIPAL)
    route = request.match_info.route
    if who is not None and route.resource is not None:
        need = PERMISSION.get((request.method, route.resource.canonical))
        if need is not None and need != READ:
            await _record(request, who, route, response, request_id)
    return response


async def _record(request: web.Request, who: Principal, route: Any,
                  response: web.StreamResponse, request_id: str) -> None:
    """The change's audit entry; whatever fails here is logged (Audit.record logs the
    store's failures), never the change's answer."""
    try:
        body = _redacted(await _audit_body(request))
    except Exception as exc:  # (a body that cannot be read again: its size and type)
        stop_if_cancelling(exc)
        body = (f"(unreadable, {type(exc).__name__}: {request.content_length or '?'} bytes "
                f"of {request.content_type})")
    named = request.get(AUDIT_ENVS, [])
    env = request.match_info.get("env", "") or (named[0] if len(named) == 1 else "")
    fields = {
        "actor": who.id, "actor_name": who.name, "role": who.role,
        "action": getattr(route.handler, "__name__", "?"),
        "method": request.method, "path": _redacted(request.path),
        "env": env, "body": body,
        "status": str(response.status), "request_id": request_id}
    if len(named) > 1:
        fields["envs"] = " ".join(named[:audit.MAX_ENVS])
        fields["envs_count"] = str(len(named))
    await request.app[AUDIT].record(fields)


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
#: A token's secret where it should never be (a token pasted for its id): never recorded.
_SECRET = re.compile(r"(qg_[0-9a-f]{8}_)[A-Za-z0-9_-]+")


def _redacted(text: str) -> str:
    return _SECRET.sub(r"\1…", text)


#: What an audit entry keeps of a body another handler read as a stream (NDJSON imports).
AUDIT_BODY = web.RequestKey("quotagate_audit_body", str)
#: The environments a change names elsewhere than in its path (a token's, a batch's): its
#: audit entry is found by each (``GET /audit?env=``).
AUDIT_ENVS = web.RequestKey("quotagate_audit_envs", list)


async def _audit_body(request: web.Request) -> str:
    """The request's body as the audit keeps it: JSON as sent (at most audit.MAX_BODY
    characters), anything else by its size and type."""
    summary = request.get(AUDIT_BODY)
    if summary is not None:
        return summary
    if not request.body_exists:
        return ""
    if request.content_type != "application/json":
        return f"({request.content_length or '?'} bytes of {request.content_type})"
    raw = await request.read()  # (read already by the handler: kept by aiohttp)
    text = raw.decode(errors="replace")
    return text if len(text) <= audit.MAX_BODY else text[:audit.MAX_BODY] + "…"


async def _answer(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every refusal as problem+json: ControlError -> its status, an unreachable store ->
    503, aiohttp's own (404, 405, 413) kept, anything else -> 500 without a traceback
    (logged)."""
    try:
        who = await authenticate(request)
        if isinstance(who, web.Response):
            return who
        request[PRINCIPAL] = who
        refused = forbidden(request, who)
        if refused is not None:
            return refused
        clock = request.app[ENVS].clock
        if isinstance(clock, StoreClock) and not clock.synced:
            return _not_synced()
        return await handler(request)
    except ControlError as exc:
        return _error(exc.status, str(exc), **exc.detail)
    except STORE_AWAY as exc:
        log.warning("admin %s %s: store unavailable: %s", request.method, request.path, exc)
        return _store_down(exc)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.text or exc.reason)
        for name, value in exc.headers.items():  # e.g. 405's Allow
            if name.lower() not in ("content-type", "content-length"):
                response.headers.add(name, value)
        return response
    except Exception:
        log.exception("admin %s %s failed", request.method, request.path)
        return _error(500, "internal error (logged by the gateway); nothing is reported here")


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ControlError(f"the body is not JSON: {exc}") from None
    except RecursionError:
        raise ControlError("the body is nested too deep to read") from None
    if not isinstance(body, dict):
        raise ControlError("the body must be a JSON object")
    return body


def _env_id(request: web.Request) -> str:
    env_id = request.match_info["env"]
    if not ENV_ID.fullmatch(env_id):
        raise ControlError(f"{env_id[:80]!r} is not an environment id ([a-z0-9][a-z0-9-]{{0,62}})")
    return env_id


def _plain(value: Any) -> Any:
    return msgspec.to_builtins(value)


def _field(body: dict[str, Any], name: str, kind: type | tuple[type, ...],
           required: bool = True) -> Any:
    value = body.get(name)
    if value is None:
        if required:
            raise Invalid(f"{name} is required")
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise Invalid(f"{name} must be {getattr(kind, '__name__', kind)}")
    return value


def _date(value: str | None, name: str) -> dt.date | None:
    if value is None:
        return None
    try:
        return dt.date.fromisoformat(value)
    except (TypeError, ValueError):
        raise Invalid(f"{name} must be a date YYYY-MM-DD") from None


# --------------------------------------------------------------------------------- routes


#: Environments per page of ``GET /envs``: by default, and at most.
LIST_LIMIT = 100
LIST_LIMIT_MAX = 1000
#: The query parameters ``GET /envs`` takes (any other is refused: a typo must not list all).
LIST_PARAMS = ("limit", "cursor", "prefix", "state", "plan", "owner", "gateway",
               "expiring_before")
_PREFIX = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_CURSOR_VERSION = "1"
_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def encode_cursor(after: str) -> str:
    """Opaque to clients: the last environment id looked at, versioned, base64url."""
    return base64.urlsafe_b64encode(f"{_CURSOR_VERSION}:{after}".encode()).decode().rstrip("=")


def _bad_parameter(name: str, message: str) -> ControlError:
    return ControlError(f"{name}: {message}", parameter=name)


def decode_cursor(cursor: str) -> str:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, ValueError):
        text = ""
    version, _, after = text.partition(":")
    if version != _CURSOR_VERSION or not ENV_ID.fullmatch(after):
        raise _bad_parameter("cursor", "not a cursor this API gave (pass next_cursor as "
                             "given, with no other change)")
    return after


def _paging(request: web.Request, known: tuple[str, ...]) -> int:
    """The query's parameters are ``known`` ones, each given once (else 400 naming it); its
    ``limit`` (1 to LIST_LIMIT_MAX; LIST_LIMIT if not given)."""
    query = request.query
    for name in query:
        if name not in known:
            raise _bad_parameter(name, f"unknown parameter (parameters: {', '.join(known)})")
        if len(query.getall(name)) > 1:
            raise _bad_parameter(name, "given more than once")
    text = query.get("limit", str(LIST_LIMIT))
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= LIST_LIMIT_MAX):
        raise _bad_parameter("limit", f"an integer from 1 to {LIST_LIMIT_MAX} (default "
                             f"{LIST_LIMIT})")
    return int(text)


def _list_query(request: web.Request) -> tuple[str, int, Filters]:
    """Every parameter checked before anything is read: 400 naming the first bad one."""
    query = request.query
    limit = _paging(request, LIST_PARAMS)
    after = decode_cursor(query["cursor"]) if "cursor" in query else ""
    plans = request.app[ENVS].config.plans

    def one_of(name: str, allowed: Any) -> str | None:
        value = query.get(name)
        if value is not None and value not in allowed:
            raise _bad_parameter(name, f"unknown value {value[:80]!r} (one of: "
                                 f"{', '.join(allowed) or 'none'})")
        return value

    expiring_before = query.get("expiring_before")
    day = None
    if expiring_before is not None:
        try:
            if not _DAY.fullmatch(expiring_before):
                raise ValueError
            day = dt.date.fromisoformat(expiring_before)
        except ValueError:
            raise _bad_parameter("expiring_before", "a date YYYY-MM-DD") from None
    return after, limit, Filters(
        state=one_of("state", STATES), plan=one_of("plan", list(plans.plans)),
        owner=one_of("owner", ("file", "api")),
        gateway=one_of("gateway", [*plans.gateway_versions, "none"]), expiring_before=day)


def _before(prefix: str) -> str:
    """An id position just before every id starting with ``prefix`` (ids are [a-z0-9-]: a
    smaller last character, then "~", which sorts after all of them)."""
    return prefix[:-1] + chr(ord(prefix[-1]) - 1) + "~"


async def list_envs(request: web.Request) -> web.Response:
    """One page, in id order: ``environments`` and ``next_cursor`` (null: the end).
    ``prefix``: only ids starting with it (the listing starts there and ends past them)."""
    after, limit, filters = _list_query(request)
    prefix = request.query.get("prefix")
    if prefix is not None:
        if not _PREFIX.fullmatch(prefix):
            raise _bad_parameter("prefix", "the start of an environment id ([a-z0-9][a-z0-9-]*)")
        after = max(after, _before(prefix))
    records, reached = await request.app[ENVS].page(after, limit, filters)
    if prefix is not None:
        records = [r for r in records if r.env_id.startswith(prefix)]
        if reached is not None and not reached.startswith(prefix) and reached > prefix:
            reached = None  # past every id with the prefix: the end
    out = [{"env": r.env_id, "owner": r.owner, "plan": r.env.plan,
            "expires": r.env.expires.isoformat(), "overage": r.env.overage} for r in records]
    return web.json_response({"environments": out, "next_cursor":
                              None if reached is None else encode_cursor(reached)})


async def get_env(request: web.Request) -> web.Response:
    record = await request.app[ENVS].get(_env_id(request))
    return web.json_response({"env": record.env_id, "owner": record.owner,
                              "definition": _plain(record.env)})


async def put_env(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    body = await _body(request)
    try:
        definition = msgspec.convert(body, Environment, strict=False)
    except msgspec.ValidationError as exc:
        raise Invalid(f"invalid environment: {exc}") from None
    record = await request.app[ENVS].put(env_id, definition)
    request.app[LIMITER].known.add(env_id)  # it exists: admitted fail-open from now on
    return web.json_response({"env": env_id, "owner": record.owner,
                              "definition": _plain(record.env)})


# ----------------------------------------------------------- bulk import and export (NDJSON)

NDJSON = "application/x-ndjson"
#: Most lines, and bytes, one import request takes (the CLI sends 5,000 lines at a time).
IMPORT_MAX_LINES = 10_000
IMPORT_MAX_BYTES = 16 * 1024 * 1024
#: Most bad lines told in one refusal (each is still checked).
IMPORT_MAX_ISSUES = 100
#: Lines decoded and checked between two yields to the event loop.
IMPORT_SLICE = 200
#: Environments read per page while exporting.
EXPORT_PAGE = 1000
EXPORT_PARAMS = ("owner", "after")


def _refusal(status: int, message: str) -> ControlError:
    exc = ControlError(message)
    exc.status = status
    return exc


class ImportLine(msgspec.Struct, forbid_unknown_fields=True):
    """One line of an import, as the export writes it (``owner`` is the exporter's; what is
    imported is owned by the API)."""
    id: str
    environment: Environment
    owner: str | None = None


_IMPORT_LINE = msgspec.json.Decoder(ImportLine, strict=False)


async def _ndjson_body(request: web.Request) -> bytes:
    if request.content_type != NDJSON:
        raise _refusal(415, f"the body must be {NDJSON} (one environment per line, as "
                           f"GET {PREFIX}/envs:export writes them), not "
                           f"{request.content_type or 'untyped'}")
    if (request.content_length or 0) > IMPORT_MAX_BYTES:
        raise _refusal(413, f"at most {IMPORT_MAX_BYTES} bytes per request: send the lines "
                           "in several requests")
    chunks, size = [], 0
    async for chunk in request.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > IMPORT_MAX_BYTES:
            raise _refusal(413, f"at most {IMPORT_MAX_BYTES} bytes per request: send the "
                               "lines in several requests")
        chunks.append(chunk)
    return b"".join(chunks)


async def import_envs(request: web.Request) -> web.Response:
    """Create or replace API-owned environments, one per NDJSON line (``{"id", "environment"}``,
    ``owner`` ignored: what the export writes). Every line is checked first, as ``PUT
    /envs/{env}`` checks its body; one bad line and nothing is written (422 with every bad
    line's number, up to ``IMPORT_MAX_ISSUES``). Idempotent: a line whose environment is
    stored as it is changes nothing (``unchanged``), so a client may send a request again after
    any failure, and go on from the first line it has no answer for."""
    if request.query:
        raise _bad_parameter(next(iter(request.query)), "this route takes no parameters")
    body = await _ndjson_body(request)
    request[AUDIT_BODY] = (f"({len(body)} bytes of NDJSON, sha256 "
                           f"{hashlib.sha256(body).hexdigest()})")
    envs = request.app[ENVS]
    declared = envs.config.environments.environments
    plans = envs.config.plans  # (what the lines are checked against; put_many checks again
    items: list[tuple[str, Environment]] = []  # if a reload changes it meanwhile)
    issues: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    lines = bad = 0

    def refuse(line: int, env_id: str, reason: str) -> None:
        nonlocal bad
        bad += 1
        if len(issues) < IMPORT_MAX_ISSUES:
            issues.append({"line": line, "env": env_id, "path": f"line {line}"
                           + (f" ({env_id})" if env_id else ""), "reason": reason})

    for number, raw in enumerate(body.split(b"\n"), start=1):
        if number % IMPORT_SLICE == 0:
            await asyncio.sleep(0)
        if not raw.strip():
            continue
        lines += 1
        if lines > IMPORT_MAX_LINES:
            raise _refusal(413, f"at most {IMPORT_MAX_LINES} lines per request: send the "
                           "lines in several requests")
        try:
            line = _IMPORT_LINE.decode(raw)
        except msgspec.ValidationError as exc:
            refuse(number, "", f"invalid: {exc}")
            continue
        except msgspec.DecodeError as exc:
            refuse(number, "", f"not a JSON object: {exc}")
            continue
        env_id = line.id
        if not ENV_ID.fullmatch(env_id):
            refuse(number, env_id[:80], "not an environment id ([a-z0-9][a-z0-9-]{0,62})")
            continue
        if env_id in seen:
            refuse(number, env_id, f"given already on line {seen[env_id]}")
            continue
        seen[env_id] = number
        if env_id in declared:
            refuse(number, env_id, "owned by environments.yaml: change the file instead")
            continue
        try:
            envs.validate(env_id, line.environment)
        except Invalid as exc:
            refuse(number, env_id, str(exc))
            continue
        items.append((env_id, line.environment))
    request[AUDIT_ENVS] = [env_id for env_id, _ in items]
    if bad:
        raise Invalid(f"{bad} of {lines} lines refused; nothing was written",
                      issues=issues, refused=bad)
    # (Not added to the limiter's ``known``, as PUT adds one: a million ids would be held
    # by every gateway whether used or not. Each is known once a request has seen it.)
    counts = await envs.put_many(items, checked_with=plans)
    return web.json_response({"received": len(items), **counts})


async def export_envs(request: web.Request) -> web.StreamResponse:
    """Every environment (``owner``: only the file's or the API's) after id ``after`` in id
    order, one NDJSON line each (``{"id", "owner", "environment"}``: the import reads the
    same), streamed page by page: memory is one page on both sides, whatever the number. A
    stream cut short (the store lost midway) ends without its last chunk, so the client sees
    an error, not a short export; it goes on with ``after`` = the last id it received."""
    query = request.query
    for name in query:
        if name not in EXPORT_PARAMS:
            raise _bad_parameter(name, "unknown parameter (parameters: "
                                 f"{', '.join(EXPORT_PARAMS)})")
    owner = query.get("owner")
    if owner is not None and owner not in ("file", "api"):
        raise _bad_parameter("owner", "file or api")
    after = query.get("after", "")
    if after and not ENV_ID.fullmatch(after):
        raise _bad_parameter("after", "an environment id (the last one received)")
    envs = request.app[ENVS]
    filters = Filters(owner=owner)
    records, reached = await envs.page(after, EXPORT_PAGE, filters)  # errors still answered
    response = web.StreamResponse(headers={"Content-Type": NDJSON})
    await response.prepare(request)
    try:
        while True:
            await response.write(b"".join(
                msgspec.json.encode({"id": r.env_id, "owner": r.owner, "environment": r.env})
                + b"\n" for r in records))
            if reached is None:
                break
            records, reached = await envs.page(reached, EXPORT_PAGE, filters)
    except Exception as exc:  # (the status is sent: only cutting the stream tells the client)
        log.warning("admin export cut short: %s", exc)
        if request.transport is not None:
            request.transport.abort()
        return response
    await response.write_eof()
    return response


async def get_usage(request: web.Request) -> web.Response:
    envs = request.app[ENVS]
    record = await envs.get(_env_id(request))
    return web.json_response(await usage_report(envs, record))


#: Entries of the global event stream looked at per call of ``GET /envs/{env}/events``.
EVENTS_SCAN = 10_000
#: Above every entry id (the year 2286 in ms): the cursor of "the global stream from its
#: newest", when a first page held only events not moved there yet.
EVENTS_TOP = "9999999999999-0"


async def list_events(request: web.Request) -> web.Response:
    """The environment's events (quota alerts, packs used up, lifecycle, purchases), newest
    first: those its scripts wrote and the gateway has not yet moved to the global stream,
    then the global stream's, looking at no more than ``EVENTS_SCAN`` entries per call
    (``next_cursor`` goes on from there; null: no more)."""
    env_id = _env_id(request)
    limit = _paging(request, ("limit", "cursor"))
    cursor = request.query.get("cursor")
    if cursor is not None and not _ENTRY_ID.fullmatch(cursor):
        raise _bad_parameter("cursor", "not a cursor this API gave (pass next_cursor as given)")
    redis: Any = request.app[ENVS].redis  # (bytes replies, a cluster's or not)

    def entry(entry_id: str, fields: dict[str, str]) -> dict[str, Any]:
        return {"id": entry_id, **fields, "env": env_id}

    found: list[dict[str, Any]] = []
    if cursor is None:  # (not moved yet: a few at most, its own stream)
        found += [entry(i.decode(), {k.decode(): v.decode(errors="replace")
                                     for k, v in f.items()})
                  for i, f in await redis.xrevrange(keys.env_events(env_id), count=limit)]
    after: str | None = cursor or EVENTS_TOP
    if len(found) < limit:
        more, after = await audit.newest(
            redis, keys.EVENTS, f"({after}", "-", lambda f: f.get("env") == env_id,
            limit - len(found), EVENTS_SCAN)
        found += [entry(i, f) for i, f in more]
    return web.json_response({"env": env_id, "events": found, "next_cursor": after})


async def put_overage(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    on = _field(await _body(request), "overage", bool)
    env = await request.app[ENVS].set_overage(env_id, on)
    return web.json_response({"env": env_id, "overage": env.overage})


#: PUT /envs/{env}/mode: "default" (or null) gives the environment back to the gateway's
#: ``enforcement``.
MODES = ("enforce", "shadow", "off", "default")


async def put_mode(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    body = await _body(request)
    unknown = sorted(set(body) - {"mode"})
    if unknown:
        raise Invalid(f"unknown fields: {', '.join(unknown)} (fields: mode)")
    if "mode" not in body:
        raise Invalid(f"mode is required: one of {', '.join(MODES)}")
    mode = body["mode"]
    if mode is None:
        mode = "default"
    if mode not in MODES:
        raise Invalid(f"mode must be one of {', '.join(MODES)}")
    envs = request.app[ENVS]
    env = await envs.set_mode(env_id, None if mode == "default" else mode)
    return web.json_response({"env": env_id, "mode": env.mode or "default",
                              "effective": env.mode or envs.config.gateway.enforcement})


async def list_packs(request: web.Request) -> web.Response:
    envs = request.app[ENVS]
    report = await usage_report(envs, await envs.get(_env_id(request)))
    packs = [dict(p, meter=m) for m, entry in report["meters"].items() for p in entry["packs"]]
    return web.json_response({"env": report["env"], "packs": packs})


async def buy_pack(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    body = await _body(request)
    pack = _field(body, "pack", str, required=False) or ""
    meter = _field(body, "meter", str, required=False)
    amount = _field(body, "amount", int, required=False)
    if not pack and (meter is None or amount is None):
        raise Invalid("give pack (a catalog name) or meter and amount")
    if amount is not None and not 0 < amount <= MAX_EXACT:
        raise Invalid(f"amount must be positive and at most {MAX_EXACT} (2^53-1: counted "
                      "exactly)")
    if meter is not None and meter not in PACK_METERS:
        raise Invalid(f"meter must be one of {', '.join(PACK_METERS)}")
    grant = await request.app[ENVS].buy_pack(env_id, pack, meter, amount,
                                             _field(body, "id", str, required=False))
    return web.json_response({"env": env_id, "pack": _plain(grant)}, status=201)


async def refund_pack(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    grant = await request.app[ENVS].refund_pack(env_id, request.match_info["pack_id"])
    return web.json_response({"env": env_id, "refunded": _plain(grant)})


async def list_promos(request: web.Request) -> web.Response:
    record = await request.app[ENVS].get(_env_id(request))
    return web.json_response({"env": record.env_id, "promos": _plain(record.env.promos)})


async def buy_promo(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    body = await _body(request)
    days = _field(body, "days", int, required=False)
    days = 1 if days is None else days
    start = _date(_field(body, "start", str, required=False), "start")
    grant = await request.app[ENVS].buy_promo(env_id, _field(body, "pack", str), days, start)
    return web.json_response({"env": env_id, "promo": _plain(grant)}, status=201)


def _change_body(quote: Any) -> dict[str, Any]:
    """A priced change (plan or gateway version): amounts are to the fen already."""
    return {"change": quote.change, "amount": f"{quote.amount:.2f}", "currency": "CNY",
            "days_left": quote.days_left, "parts": quote.parts}


def _quote_body(quote: Any, over: list[str]) -> dict[str, Any]:
    return {**_change_body(quote), "allowed": not over, "over_target": over}


async def quote_plan(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    target = _field(await _body(request), "plan", str)
    quote, over = await request.app[ENVS].quote(env_id, target)
    return web.json_response({"env": env_id, "plan": target, **_quote_body(quote, over)})


async def change_plan(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    target = _field(await _body(request), "plan", str)
    env, quote = await request.app[ENVS].change_plan(env_id, target)
    return web.json_response({"env": env_id, "plan": env.plan, **_quote_body(quote, [])})


async def get_bill(request: web.Request) -> web.Response:
    envs = request.app[ENVS]
    day = _date(request.query.get("date"), "date")
    if day is None:
        raise Invalid("date is required (?date=YYYY-MM-DD)")
    wanted = request.query.get("env")
    if wanted:
        if not ENV_ID.fullmatch(wanted):
            raise ControlError(f"{wanted[:80]!r} is not an environment id")
        ids = [wanted]  # also one released or removed: its usage is kept for the bill
    else:
        ids = await billable_envs(envs.redis)
    lines = await bill(envs.redis, envs.config.plans, ids, day)
    return web.json_response({"date": day.isoformat(), "currency": "CNY",
                              "lines": [line.as_dict() for line in lines],
                              "total": str(total(lines))})


async def ingest_usage(request: web.Request) -> web.Response:
    """A batch of usage records the gateway cannot see. Every record is checked first (one bad
    record refuses the batch, nothing counted); each is then counted once per ``id``, so a
    retried batch never counts twice."""
    envs = request.app[ENVS]
    body = await _body(request)
    records = body.get("records")
    if not isinstance(records, list) or not records:
        raise Invalid("records must be a non-empty list")
    if len(records) > MAX_BATCH:
        raise Invalid(f"at most {MAX_BATCH} records per batch")
    known = await envs.existing({rec["env"] for rec in records if isinstance(rec, dict)
                                 and isinstance(rec.get("env"), str)})
    now_ms = envs.clock.now_ms()
    problems: list[dict[str, Any]] = []
    checked: list[tuple[str, str, str, int, int]] = []
    seen_ids: set[str] = set()
    for i, rec in enumerate(records):
        def bad(reason: str, i: int = i) -> None:
            problems.append({"path": f"$.records[{i}]", "reason": reason})
        if not isinstance(rec, dict):
            bad("a record is an object")
            continue
        rid, env_id, meter, amount = (rec.get("id"), rec.get("env"), rec.get("meter"),
                                      rec.get("amount"))
        if not isinstance(rid, str) or not _RECORD_ID.fullmatch(rid):
            bad("id: 1-128 characters of [A-Za-z0-9._:-] (the idempotency key)")
            continue
        if rid in seen_ids:
            bad(f"id {rid} twice in the batch")
            continue
        seen_ids.add(rid)
        if not isinstance(env_id, str) or env_id not in known:
            bad(f"env: no environment {str(env_id)[:80]!r}")
            continue
        if meter not in INGESTED_METERS:
            bad(f"meter: one of {', '.join(INGESTED_METERS)}")
            continue
        low = 0 if meter in GAUGES else 1
        if not isinstance(amount, int) or isinstance(amount, bool) or not low <= amount < 2**53:
            bad("amount: a positive integer (bytes, tokens; for capacity_bytes the current "
                "size, 0 or more)")
            continue
        at_ms = now_ms
        if rec.get("at") is not None:
            try:
                at = dt.datetime.fromisoformat(str(rec["at"]))
            except ValueError:
                bad("at: an ISO 8601 time with its UTC offset")
                continue
            if at.tzinfo is None:
                bad("at: give the UTC offset")
                continue
            at_ms = int(at.timestamp() * 1000)
            if at_ms > now_ms + 300_000:
                bad("at: in the future")
                continue
            if at_ms < now_ms - MAX_AGE_MS:
                bad("at: older than 30 days (ids are remembered 40 days)")
                continue
        checked.append((rid, env_id, meter, amount, at_ms))
    request[AUDIT_ENVS] = list(dict.fromkeys(env_id for _, env_id, _, _, _ in checked))
    if problems:
        metrics.INGESTED_RECORDS.labels("invalid").inc(len(records))
        raise Invalid(f"{len(problems)} invalid record(s); nothing counted", issues=problems)
    sizes = sorted({env_id for _, env_id, meter, amount, _ in checked
                    if meter in GAUGES and amount > 0})
    try:  # a size kept is carried into each day's bill by the scheduler: due by tomorrow
        for env_id in sizes:  # (first: a batch cut short by the store is sent again)
            record = await envs.get(env_id)
            await due.due_by(envs.redis, env_id, now_ms, envs.midnight_ms(
                record.env, envs.today(record.env) + dt.timedelta(days=1)))
    except (redis_errors.RedisError, OSError) as exc:
        return _error(503, f"the store cannot be reached ({exc}); retry the batch: nothing "
                      "was counted")
    limiter = request.app[LIMITER]
    results = []
    try:
        for rid, env_id, meter, amount, at_ms in checked:
            status = await limiter.ingest(env_id, rid, meter, amount, at_ms)
            if status == 4:  # listed but no snapshot (being written): retry, never drop
                raise StoreError(f"environment {env_id} has no snapshot in the store yet")
            results.append({"id": rid, "status": "counted" if status == 0 else "duplicate"})
    except StoreError as exc:
        return _error(503, f"the store cannot be reached ({exc}); retry the batch: records "
                      "already counted will not count twice", done=results)
    counted = sum(r["status"] == "counted" for r in results)
    metrics.INGESTED_RECORDS.labels("counted").inc(counted)
    metrics.INGESTED_RECORDS.labels("duplicate").inc(len(results) - counted)
    return web.json_response({"counted": counted,
                              "duplicates": sum(r["status"] == "duplicate" for r in results),
                              "results": results})


async def gateway_versions(request: web.Request) -> web.Response:
    plans = request.app[ENVS].config.plans
    return web.json_response({"versions": [
        {"version": name, "qps": v.qps, "mbps": v.mbps,
         "monthly_price": f"{Decimal(v.price):.2f}"}
        for name, v in plans.gateway_versions.items()], "terms": list(GATEWAY_TERMS),
        "currency": "CNY"})


async def catalog(request: web.Request) -> web.Response:
    """What is sold: plans, resource packs and promo packs, with their prices (CNY, exact)."""
    plans = request.app[ENVS].config.plans

    def money(value: Any) -> str | None:
        return None if value is None else f"{Decimal(value):.2f}"

    return web.json_response({
        "currency": "CNY",
        "plans": [{"plan": name, "monthly_price": money(p.price), "qps": p.qps,
                   "calls": p.calls, "packs_allowed": p.packs_allowed}
                  for name, p in plans.plans.items()],
        "resource_packs": [{"pack": name, "meter": p.meter, "amount": p.amount,
                            "price": money(p.price), "days": p.days}
                           for name, p in plans.resource_packs.items()],
        "promo_packs": [{"pack": name, "price_per_day": money(p.price_per_day), "qps": p.qps,
                         "function_concurrency": p.function_concurrency,
                         "realtime": p.realtime, "database_free": p.database_free}
                        for name, p in plans.promo_packs.items()]})


async def quote_gateway(request: web.Request) -> web.Response:
    body = await _body(request)
    version, months = _field(body, "version", str), _field(body, "months", int)
    envs = request.app[ENVS]
    envs.check_term(version, months)
    spec = envs.config.plans.gateway_versions[version]
    return web.json_response({"version": version, "months": months,
                              "monthly_price": f"{Decimal(spec.price):.2f}",
                              "amount": f"{versions.price(spec, months):.2f}",
                              "currency": "CNY"})


async def _gateway_body(request: web.Request, env_id: str, **extra: Any) -> dict[str, Any]:
    envs = request.app[ENVS]
    record = await envs.get(env_id)
    grant = record.env.gateway
    if grant is None:
        return {"env": env_id, "gateway": None, **extra}
    now = versions.status(grant, envs.config.plans, envs.today(record.env))
    return {"env": env_id, "gateway": now.as_dict(grant, envs.config.plans), **extra}


async def get_gateway(request: web.Request) -> web.Response:
    return web.json_response(await _gateway_body(request, _env_id(request)))


async def buy_gateway(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    body = await _body(request)
    auto = _field(body, "auto_renew", bool, required=False)
    _, amount = await request.app[ENVS].buy_gateway(
        env_id, _field(body, "version", str), _field(body, "months", int), bool(auto))
    return web.json_response(await _gateway_body(request, env_id, amount=f"{amount:.2f}",
                                                 currency="CNY"), status=201)


async def renew_gateway(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    months = _field(await _body(request), "months", int)
    _, amount = await request.app[ENVS].renew_gateway(env_id, months)
    return web.json_response(await _gateway_body(request, env_id, amount=f"{amount:.2f}",
                                                 currency="CNY"))


async def gateway_auto_renew(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    body = await _body(request)
    await request.app[ENVS].gateway_auto_renew(env_id, _field(body, "on", bool),
                                               _field(body, "months", int, required=False))
    return web.json_response(await _gateway_body(request, env_id))


async def quote_gateway_change(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    target = _field(await _body(request), "version", str)
    quote = await request.app[ENVS].quote_gateway_change(env_id, target)
    return web.json_response({"env": env_id, "version": target, **_change_body(quote)})


async def change_gateway(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    target = _field(await _body(request), "version", str)
    _, quote = await request.app[ENVS].change_gateway(env_id, target)
    return web.json_response(await _gateway_body(request, env_id, **_change_body(quote)))


async def renew(request: web.Request) -> web.Response:
    env_id = _env_id(request)
    months = _field(await _body(request), "months", int)
    env = await request.app[ENVS].renew(env_id, months)
    request.app[RENEWED](env_id)  # queued invocations are replayed now
    return web.json_response({"env": env_id, "expires": env.expires.isoformat(),
                              "paid": env.paid})


# ---------------------------------------------------------------------------------- tokens


def _token_body(record: Token, secret: str | None = None) -> dict[str, Any]:
    body = record.public()
    if secret is not None:
        body["token"] = secret  # shown this once: the store keeps its digest only
    return body


async def whoami(request: web.Request) -> web.Response:
    who = request[PRINCIPAL]
    return web.json_response({"id": who.id, "name": who.name, "role": who.role,
                              "env": who.env})


async def list_tokens(request: web.Request) -> web.Response:
    return web.json_response({"tokens": [t.public() for t in
                                         await request.app[TOKENS].list()]})


async def create_token(request: web.Request) -> web.Response:
    body = await _body(request)
    unknown = sorted(set(body) - {"name", "role", "env"})
    if unknown:
        raise Invalid(f"unknown fields: {', '.join(unknown)} (fields: name, role, env)")
    name, role, env = Tokens.check(body.get("name"), body.get("role"), body.get("env"))
    if env is not None:
        request[AUDIT_ENVS] = [env]
    if env is not None and not await request.app[ENVS].existing({env}):
        raise NotFound(f"no environment {env}")
    record, secret = await request.app[TOKENS].create(name, role, env)
    return web.json_response(_token_body(record, secret), status=201)


async def rotate_token(request: web.Request) -> web.Response:
    record, secret = await request.app[TOKENS].rotate(request.match_info["token"])
    request[AUDIT_ENVS] = [record.env] if record.env else []
    return web.json_response(_token_body(record, secret))


async def revoke_token(request: web.Request) -> web.Response:
    record = await request.app[TOKENS].revoke(request.match_info["token"])
    request[AUDIT_ENVS] = [record.env] if record.env else []
    return web.json_response({**_token_body(record), "revoked": True})


AUDIT_PARAMS = ("env", "token", "action", "since", "until", "limit", "cursor")
_ENTRY_ID = re.compile(r"\d{1,15}-\d{1,15}")


def _instant_ms(name: str, text: str) -> int:
    """A time given as ms since the epoch, a date (00:00 UTC) or an ISO 8601 date-time with
    its offset."""
    if text.isascii() and text.isdigit() and len(text) <= 15:
        return int(text)
    try:
        if _DAY.fullmatch(text):
            when = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
        else:
            when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
            if when.tzinfo is None:
                raise ValueError
    except ValueError:
        raise _bad_parameter(name, "ms since the epoch, YYYY-MM-DD (UTC), or an ISO 8601 "
                             "date-time with its offset (2026-12-07T10:00:00+08:00)") from None
    return int(when.timestamp() * 1000)


async def get_audit(request: web.Request) -> web.Response:
    """Audit entries, newest first: ``entries`` and ``next_cursor`` (null: no more)."""
    query = request.query
    limit = _paging(request, AUDIT_PARAMS)
    cursor = query.get("cursor")
    if cursor is not None and not _ENTRY_ID.fullmatch(cursor):
        raise _bad_parameter("cursor", "not a cursor this API gave (pass next_cursor as given)")
    env = query.get("env")
    if env is not None and not ENV_ID.fullmatch(env):
        raise _bad_parameter("env", "not an environment id ([a-z0-9][a-z0-9-]{0,62})")
    filters = audit.Filters(
        env=env, actor=query.get("token"), action=query.get("action"),
        since_ms=_instant_ms("since", query["since"]) if "since" in query else None,
        until_ms=_instant_ms("until", query["until"]) if "until" in query else None)
    entries, after = await request.app[AUDIT].page(filters, limit, cursor)
    return web.json_response({"entries": entries, "next_cursor": after})


#: Every route of /admin/v1: method, path, handler, and the permission it needs
#: (control/tokens.py: read, settings, money, admin).
ROUTES: list[tuple[str, str, Handler, str]] = [
    ("GET", "/me", whoami, READ),
    ("POST", "/envs/{env}/renew", renew, MONEY),
    ("POST", "/usage", ingest_usage, MONEY),
    ("GET", "/envs", list_envs, READ),
    ("POST", "/envs:import", import_envs, ADMIN),
    ("GET", "/envs:export", export_envs, READ),
    ("GET", "/envs/{env}", get_env, READ),
    ("PUT", "/envs/{env}", put_env, ADMIN),
    ("GET", "/envs/{env}/usage", get_usage, READ),
    ("GET", "/envs/{env}/events", list_events, READ),
    ("PUT", "/envs/{env}/overage", put_overage, SETTINGS),
    ("PUT", "/envs/{env}/mode", put_mode, ADMIN),
    ("GET", "/envs/{env}/packs", list_packs, READ),
    ("POST", "/envs/{env}/packs", buy_pack, MONEY),
    ("DELETE", "/envs/{env}/packs/{pack_id}", refund_pack, MONEY),
    ("GET", "/envs/{env}/promos", list_promos, READ),
    ("POST", "/envs/{env}/promos", buy_promo, MONEY),
    ("POST", "/envs/{env}/plan/quote", quote_plan, READ),
    ("POST", "/envs/{env}/plan", change_plan, MONEY),
    ("GET", "/bills", get_bill, READ),
    ("GET", "/gateway/versions", gateway_versions, READ),
    ("GET", "/catalog", catalog, READ),
    ("POST", "/gateway/quote", quote_gateway, READ),
    ("GET", "/envs/{env}/gateway", get_gateway, READ),
    ("POST", "/envs/{env}/gateway", buy_gateway, MONEY),
    ("POST", "/envs/{env}/gateway/renew", renew_gateway, MONEY),
    ("PUT", "/envs/{env}/gateway/auto-renew", gateway_auto_renew, SETTINGS),
    ("POST", "/envs/{env}/gateway/change/quote", quote_gateway_change, READ),
    ("POST", "/envs/{env}/gateway/change", change_gateway, MONEY),
    ("GET", "/audit", get_audit, READ),
    ("GET", "/tokens", list_tokens, ADMIN),
    ("POST", "/tokens", create_token, ADMIN),
    ("POST", "/tokens/{token}/rotate", rotate_token, ADMIN),
    ("DELETE", "/tokens/{token}", revoke_token, ADMIN),
]
PERMISSION = {(method, PREFIX + path): need for method, path, _, need in ROUTES}
#: What an environment token may call: the reads of its own environment ({env}, or ?env=
#: on /bills), and the catalog of gateway versions, and who it is.
ENV_TOKEN_ROUTES = frozenset(
    {(m, PREFIX + p) for m, p, _, need in ROUTES if need == READ and "{env}" in p}
    | {("GET", PREFIX + "/bills"), ("GET", PREFIX + "/gateway/versions"),
       ("GET", PREFIX + "/catalog"), ("GET", PREFIX + "/me")})


def install(app: web.Application, envs: Environments, limiter: Limiter,
            token: str | None = None, on_renewed: Callable[[str], None] | None = None,
            trail: audit.Audit | None = None) -> None:
    """Mount the admin API on the admin application (``trail``: the runtime's audit)."""
    app[ENVS] = envs
    app[LIMITER] = limiter
    app[RENEWED] = on_renewed or (lambda env: None)
    app[TOKEN] = token if token is not None else os.environ.get(TOKEN_ENV, "")
    app[TOKENS] = Tokens(envs.redis, envs.clock.now_ms, lambda: envs.config.tokens)
    app[AUDIT] = trail or audit.Audit(envs.redis, envs.clock.now_ms,
                                      lambda: envs.config.gateway.audit_retention_days,
                                      limiter.instance)
    app.middlewares.append(guard)
    for method, path, handler, _ in ROUTES:
        app.router.add_route(method, PREFIX + path, handler)
