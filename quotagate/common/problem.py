"""RFC 9457 problem details, the one shape of every refusal: the gateway's (gateway/problems.py)
and the admin API's (control/api.py)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

TYPE_BASE = "https://quotagate.dev/problems/"
CONTENT_TYPE = "application/problem+json"


def problem_response(status: int, type_suffix: str, title: str, detail: str,
                     headers: dict[str, str] | None = None, **members: Any) -> web.Response:
    """``members``: extension members after the standard ones."""
    body = {"type": TYPE_BASE + type_suffix, "title": title, "status": status,
            "detail": detail, **members}
    return web.Response(status=status, body=json.dumps(body).encode(),
                        content_type=CONTENT_TYPE, headers=headers)
