"""Routes: longest path prefix first, then method and Accept filters."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import msgspec

from quotagate.settings.schema import ACTION_KINDS, FUNCTION_NAME, Route

#: What a route meters after the response, by kind, unless it says (``meter``).
DEFAULT_METERS = {"function": "gbs", "storage": "storage_traffic_bytes",
                  "static": "storage_traffic_bytes"}
#: Meters the platform reports through ingestion, by the kind of route that uses them: once
#: used up (hard stop) those routes are refused too.
INGESTED_NEEDS = {"function": ("outbound_bytes",), "static": ("cdn_origin_bytes",),
                  "ai": ("ai_tokens",)}
#: Kinds whose writes (WRITE_METHODS) are refused while capacity is full.
WRITES_DATA = frozenset({"database", "storage"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH"})
_FUNCTION_NAME = re.compile(FUNCTION_NAME)
#: What an AI chat over SSE costs unless its route says (SPEC §3).
AI_STREAM_COST = 50


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    route: Route
    #: scheme://host:port of the upstream, and the path prefix its URL adds.
    origin: str
    base_path: str
    #: The meter charged after the response ("" none).
    meter: str = ""
    #: Meters the request needs left (comma-separated, for decide.lua).
    needs: str = ""
    #: The same for requests that write data (capacity full refuses them, SPEC §6).
    needs_write: str = ""
    #: Action routes: the route as each kind of action is counted (ACTION_KINDS).
    actions: dict[str, CompiledRoute] | None = None
    #: What a stream costs beyond ``cost`` (0: no stream pricing; gateway/streams.py).
    stream_extra: int = 0

    @property
    def kind(self) -> str:
        return self.route.kind

    @property
    def cost(self) -> int:
        return self.route.cost

    def upstream_url(self, path_qs: str) -> str:
        return self.origin + self.base_path + path_qs

    def function_name(self, path: str) -> str | None:
        """The function a request invokes: the path segment after the prefix, or None."""
        name = path[len(self.route.prefix):].lstrip("/").split("/", 1)[0]
        return name if _FUNCTION_NAME.fullmatch(name) else None


def compile_route(route: Route) -> CompiledRoute:
    if route.kind == "action":  # counted as the kind its body names, metered as that kind
        variants = {kind: compile_route(msgspec.structs.replace(route, kind=kind))
                    for kind in sorted(set(ACTION_KINDS.values()))}
        any_kind = variants["database"]
        return CompiledRoute(route, any_kind.origin, any_kind.base_path, actions=variants)
    parts = urlsplit(route.upstream)
    meter = route.meter if route.meter is not None else DEFAULT_METERS.get(route.kind, "")
    meter = "" if meter == "none" else meter
    needs = ([meter] if meter else []) + list(INGESTED_NEEDS.get(route.kind, ()))
    writes = needs + (["capacity_bytes"] if route.kind in WRITES_DATA else [])
    stream_cost = route.stream_cost
    if stream_cost is None:
        stream_cost = max(route.cost, AI_STREAM_COST) if route.kind == "ai" else route.cost
    return CompiledRoute(route, f"{parts.scheme}://{parts.netloc}", parts.path.rstrip("/"),
                         meter, ",".join(needs), ",".join(writes),
                         stream_extra=max(0, stream_cost - route.cost))


class Router:
    def __init__(self, routes: tuple[Route, ...] | list[Route]):
        compiled = [compile_route(r) for r in routes]
        # Longest prefix first; among equal prefixes, exact ones and the more specific
        # filters first.
        compiled.sort(key=lambda c: (-len(c.route.prefix), not c.route.exact,
                                     not c.route.accept, not c.route.methods))
        self.routes = compiled

    def match(self, path: str, method: str, accept: str) -> CompiledRoute | None:
        for c in self.routes:
            r = c.route
            if not path.startswith(r.prefix) or (r.exact and len(path) != len(r.prefix)):
                continue
            if r.methods and method not in r.methods:
                continue
            if r.accept and r.accept not in accept:
                continue
            return c
        return None


#: A path with ``.`` or ``..`` segments: refused, since an upstream that normalises it would
#: serve another route than the one decided.
DOT_SEGMENT = re.compile(r"(^|/)\.\.?(/|$)")


def is_preflight(headers: Mapping[str, str], has_body: bool) -> bool:
    """A CORS preflight (Fetch standard): an OPTIONS request naming an Origin and the method
    it asks for, without a body (the caller has checked the method)."""
    return ("Origin" in headers and "Access-Control-Request-Method" in headers
            and not has_body)
