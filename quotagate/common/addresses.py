"""Where the store is: a ``redis://``, ``rediss://`` or ``unix://`` URL parsed once, with the
TLS files of a ``rediss://`` store (settings check it, the store connects by it)."""

from __future__ import annotations

import dataclasses
import functools
import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass(frozen=True)
class StoreAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str = ""
    tls: bool = False
    username: str = ""
    password: str = ""
    db: int = 0
    #: TLS: CA file (else the system's), client certificate and key files.
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""

    def ssl_context(self) -> ssl.SSLContext | None:
        """The TLS context of a ``rediss://`` store: the server verified, by its host name
        (built once per set of files: reconnecting must not re-read them)."""
        if not self.tls:
            return None
        return _tls_context(self.tls_ca, self.tls_cert, self.tls_key)

    def with_tls(self, ca: str, cert: str, key: str) -> StoreAddress:
        return dataclasses.replace(self, tls_ca=ca, tls_cert=cert, tls_key=key)

    @classmethod
    def from_url(cls, url: str) -> StoreAddress:
        parts = urlsplit(url)
        query = parse_qs(parts.query)
        db_text = (query.get("db") or [""])[0] or parts.path.lstrip("/") or "0"
        if parts.scheme == "unix":
            db_text = (query.get("db") or ["0"])[0]
        username, password = unquote(parts.username or ""), unquote(parts.password or "")
        if parts.scheme == "unix":
            return cls(unix_path=parts.path, username=username, password=password,
                       db=int(db_text))
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"unsupported store URL scheme {parts.scheme!r}")
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=parts.scheme == "rediss",
            username=username, password=password, db=int(db_text),
        )


@functools.lru_cache(maxsize=8)
def _tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=ca or None)
    if cert:
        ctx.load_cert_chain(cert, key or None)
    return ctx
