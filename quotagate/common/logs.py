"""Logging: text for people, JSON lines for log pipelines (``--log-format json``).

Decisions are logged by the ``quotagate.decisions`` logger: every refusal at INFO, every
admitted request at DEBUG (only built when DEBUG is on), with ``env``, ``route``, ``meter``,
``reason`` and ``request_id`` (the id sent upstream as X-Request-Id) as fields.
"""

from __future__ import annotations

import json
import logging
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: Fields a record may carry (``extra=``) that JSON lines include.
FIELDS = ("env", "route", "meter", "reason", "status", "request_id", "code", "watch_id")

decisions = logging.getLogger("quotagate.decisions")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


class MalformedRequests(logging.Filter):
    """aiohttp logs every request it cannot parse (bad request line, bare LF, a header too
    long) as an ERROR with a traceback: anyone on the internet could fill the log with them.
    They were answered 400 already; each becomes one INFO line without the traceback, and is
    counted (``quotagate_invalid_requests_total{reason="malformed-http"}``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from aiohttp.http_exceptions import HttpProcessingError

        exc = record.exc_info[1] if record.exc_info else None
        # Only the server's own report of a request it could not parse (a handler's error
        # stays an error, whatever it raised).
        if (isinstance(exc, HttpProcessingError) and record.name == "aiohttp.server"
                and str(record.msg).startswith("Error handling request")):
            from quotagate.common import metrics

            metrics.INVALID_REQUESTS.labels("malformed-http").inc()
            first = str(exc.message).strip().splitlines()[0] if exc.message else ""
            record.msg, record.args = "malformed request refused (%s): %s", (exc.code, first)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger().isEnabledFor(logging.INFO)
        return True


def configure(level: str | int = "INFO", fmt: str = "text") -> None:
    """Set up the root logger once for the process (each worker calls it too)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(MalformedRequests())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
