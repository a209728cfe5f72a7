"""Scoped tokens of the admin API: who may do what, stored hashed in the store.

A token is ``qg_<id>_<secret>``: ``id`` (8 hex digits) names it in listings and in the audit
of what it did; ``secret`` (32 random bytes, base64url) is shown once, when the token is
created or rotated. The store keeps its SHA-256 only (a random 256-bit secret needs no slow
hash: nothing can be guessed from the digest), so a copy of the store lets nobody in.

Roles, and what each grants (``GRANTS``; each route of ``/admin/v1`` needs one permission,
``control.api.ROUTES``):

- ``viewer``: read everything (environments, usage, packs, promos, versions, bills, quotes);
- ``support``: read, and the settings that move no money (overage on or off, a gateway
  version's auto-renewal);
- ``billing``: read, and every action that moves money (packs, promos, plans, versions,
  renewals, refunds, usage records);
- ``admin``: everything, including environments' definitions, imports and tokens;
- ``env``: an environment token, for a tenant: read its own environment only (its
  definition, usage, packs, promos, version, quotes and bills).

``QUOTAGATE_ADMIN_TOKEN`` keeps working as ``admin`` (checked without the store). Tokens
that ``tokens_file`` declares (a Kubernetes Secret, say: the token, or its id and SHA-256)
are checked in memory, as the last config loaded has them (an ``env`` one also against the
store's set of those whose environment was released: ``RELEASED``); the file is changed
there, never through the API (409). The others are looked up in the store on every request
(two ``HGET``: by digest, then the record by id): a token created, rotated or revoked on one
instance is in effect on every instance at once.
"""

from __future__ import annotations

import builtins
import hashlib
import secrets
from collections.abc import Awaitable, Callable

import msgspec
from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from quotagate.common.envids import ENV_ID
from quotagate.common.tokenshape import MAX_NAME, NAME, TOKEN, TOKEN_ID
from quotagate.control.envs import Conflict, ControlError, Invalid, NotFound
from quotagate.limiter.keys import PREFIX
from quotagate.settings.load import DeclaredTokenRecord

#: Token records by id, and the same records by their secret's digest (one hash slot).
RECORDS = f"{PREFIX}:{{tokens}}:records"
DIGESTS = f"{PREFIX}:{{tokens}}:digests"
#: Digests of tokens_file's environment tokens whose environment was released since: refused
#: (the file is the operator's to change; another tenant may get the id again).
RELEASED = f"{PREFIX}:{{tokens}}:released-declared"

READ, SETTINGS, MONEY, ADMIN = "read", "settings", "money", "admin"
PERMISSIONS = (READ, SETTINGS, MONEY, ADMIN)
GRANTS: dict[str, frozenset[str]] = {
    "viewer": frozenset({READ}),
    "support": frozenset({READ, SETTINGS}),
    "billing": frozenset({READ, MONEY}),
    "admin": frozenset(PERMISSIONS),
    "env": frozenset({READ}),  # its own environment's only
}
ROLES = tuple(GRANTS)
#: The least role a permission needs (docs/openapi.yaml's ``x-quotagate-role``).
LEAST_ROLE = {READ: "viewer", SETTINGS: "support", MONEY: "billing", ADMIN: "admin"}
#: Most tokens kept (a listing is one read).
MAX_TOKENS = 10_000


class Token(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    name: str
    role: str
    #: The environment an ``env`` token reads (None for the others).
    env: str | None
    #: Milliseconds since the epoch on the store's clock.
    created_ms: int
    rotated_ms: int | None = None
    #: SHA-256 of its secret, hex (kept with the record by id only).
    digest: str = ""
    #: "api": made through the admin API, kept in the store; "file": declared by
    #: ``tokens_file`` (changed there only).
    source: str = "api"

    def public(self) -> dict[str, object]:
        return {"id": self.id, "name": self.name, "role": self.role, "env": self.env,
                "created_ms": self.created_ms, "rotated_ms": self.rotated_ms,
                "source": self.source}


class Principal(msgspec.Struct, frozen=True):
    """Who made a request: a token's id, name, role and (``env`` role) environment."""
    id: str
    name: str
    role: str
    env: str | None = None

    def may(self, permission: str) -> bool:
        return permission in GRANTS[self.role]


#: The operator's token from the environment (QUOTAGATE_ADMIN_TOKEN).
OPERATOR = Principal("admin-token", "QUOTAGATE_ADMIN_TOKEN", "admin")

_encode = msgspec.json.encode
_decode = msgspec.json.Decoder(Token).decode


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _secret(token_id: str) -> str:
    return f"qg_{token_id}_{secrets.token_urlsafe(32)}"


class Tokens:
    def __init__(self, redis: Redis, now_ms: Callable[[], int],
                 declared: Callable[[], tuple[DeclaredTokenRecord, ...]] = tuple):
        self.redis = redis
        self.now_ms = now_ms
        #: The tokens of ``tokens_file`` in the config in force.
        self.declared = declared
        #: Those tokens as records by digest, made again only when a reload changed them.
        self._seen: tuple[DeclaredTokenRecord, ...] | None = None
        self._by_digest: dict[str, Token] = {}
        self._ids: frozenset[str] = frozenset()

    def _declared(self) -> dict[str, Token]:
        """tokens_file's tokens by digest, as records (created_ms 0: a file has no time)."""
        now = self.declared()
        if now is not self._seen:
            self._by_digest = {t.digest: Token(t.id, t.name, t.role, t.env, 0, digest=t.digest,
                                               source="file") for t in now}
            self._ids = frozenset(t.id for t in now)
            self._seen = now
        return self._by_digest

    def _declared_ids(self) -> frozenset[str]:
        self._declared()
        return self._ids

    def _refuse_declared(self, token_id: str) -> None:
        """A token the store does not have but tokens_file declares: 409, not 404."""
        if token_id in self._declared_ids():
            raise Conflict(f"token {token_id} is declared in tokens_file: change it there "
                           "(a reload applies it)")

    async def identify(self, token: str) -> Principal | None:
        """The token's principal, or None: not a token of this shape, or none that
        tokens_file declares or the store has (revoked, rotated, never made)."""
        if not TOKEN.fullmatch(token):
            return None
        secret_digest = digest(token)
        declared = self._declared().get(secret_digest)
        if declared is not None:
            if declared.role == "env" and await self.redis.sismember(RELEASED, secret_digest):
                return None  # its environment was released since
            return Principal(declared.id, declared.name, declared.role, declared.env)
        raw = await self.redis.hget(DIGESTS, secret_digest)
        if raw is None:
            return None
        record = _decode(raw)
        # The record by id must hold this digest too: a digest left behind by anything that
        # went wrong between the two hashes never lets a token in that nobody can list.
        current = await self.redis.hget(RECORDS, record.id)
        if current is None or _decode(current).digest != secret_digest:
            return None
        return Principal(record.id, record.name, record.role, record.env)

    async def list(self) -> list[Token]:
        """tokens_file's (but those whose environment was released since), then the
        store's."""
        declared = list(self._declared().values())
        released = await self.redis.smismember(RELEASED, [t.digest for t in declared]) \
            if declared else []
        records = [_decode(raw) for raw in (await self.redis.hgetall(RECORDS)).values()]
        return [t for t, gone in zip(declared, released, strict=True) if not gone] + sorted(
            records, key=lambda t: (t.created_ms, t.id))

    @staticmethod
    def check(name: object, role: object, env: object) -> tuple[str, str, str | None]:
        if not isinstance(name, str) or not NAME.fullmatch(name):
            raise Invalid(f"name must be 1 to {MAX_NAME} printable characters")
        if role not in GRANTS:
            raise Invalid(f"role must be one of: {', '.join(ROLES)}")
        assert isinstance(role, str)
        if role == "env":
            if not isinstance(env, str) or not ENV_ID.fullmatch(env):
                raise Invalid("an env token needs env, an environment id "
                              "([a-z0-9][a-z0-9-]{0,62})")
            return name, role, env
        if env is not None:
            raise Invalid(f"only an env token has an env (this one's role is {role})")
        return name, role, None

    async def create(self, name: str, role: str, env: str | None) -> tuple[Token, str]:
        """A new token: its record and its secret (shown this once)."""
        if await self.redis.hlen(RECORDS) >= MAX_TOKENS:
            raise ControlError(f"at most {MAX_TOKENS} tokens: revoke some first")
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:  # a new id, taken by nobody meanwhile (WATCH)
                token_id = secrets.token_hex(4)
                if token_id in self._declared_ids():
                    continue
                try:
                    await pipe.watch(RECORDS)
                    if await pipe.hexists(RECORDS, token_id):
                        await pipe.unwatch()
                        continue
                    record = Token(token_id, name, role, env, self.now_ms())
                    secret = _secret(token_id)
                    pipe.multi()
                    self._queue_write(pipe, record, secret, None)
                    await pipe.execute()
                    return record, secret
                except WatchError:
                    continue

    async def rotate(self, token_id: str) -> tuple[Token, str]:
        """A new secret for the token (the old one stops working at once)."""
        secret = _secret(token_id)
        try:
            record = await self._change(token_id, secret)
        except NotFound:
            self._refuse_declared(token_id)
            raise
        assert record is not None
        return record, secret

    async def revoke(self, token_id: str) -> Token:
        try:
            record = await self._change(token_id, None)
        except NotFound:
            self._refuse_declared(token_id)
            raise
        assert record is not None
        return record

    async def revoke_env(self, env_id: str,
                         revoked: Callable[[Token], Awaitable[None]] | None = None
                         ) -> builtins.list[Token]:
        """Revoke every environment token of ``env_id``: its environment was released, and
        an id used again later is another tenant's — the store's (deleted) and
        tokens_file's (their digests kept in ``RELEASED``: the file is not changed). Each
        revoked here (not meanwhile by another) is told to ``revoked`` as it goes. (Reads
        the token records: at most MAX_TOKENS, whatever the number of environments.)"""
        done: builtins.list[Token] = []
        for record in await self.list():
            if record.role != "env" or record.env != env_id:
                continue
            if record.source == "file":
                if not await self.redis.sadd(RELEASED, record.digest):
                    continue  # another scheduler's
            else:
                try:
                    record = await self._change(record.id, None) or record
                except NotFound:  # revoked meanwhile
                    continue
            done.append(record)
            if revoked is not None:
                await revoked(record)
        return done

    @staticmethod
    def _queue_write(pipe: Pipeline, record: Token, secret: str,
                     old_digest: str | None) -> None:
        new = digest(secret)
        if old_digest is not None:
            pipe.hdel(DIGESTS, old_digest)
        record.digest = new
        pipe.hset(RECORDS, record.id, _encode(record))
        pipe.hset(DIGESTS, new, _encode(msgspec.structs.replace(record, digest="")))

    async def _change(self, token_id: str, secret: str | None) -> Token | None:
        """Rotate (a new ``secret``) or revoke (None) the token, against its record as read:
        a change of it meanwhile (WATCH) makes this read it again."""
        if not TOKEN_ID.fullmatch(token_id):
            raise NotFound(f"no token {token_id[:40]!r} (a token id is 8 hex digits)")
        async with self.redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(RECORDS)
                    raw = await pipe.hget(RECORDS, token_id)
                    if raw is None:
                        raise NotFound(f"no token {token_id!r}")
                    record = _decode(raw)
                    old = record.digest
                    pipe.multi()
                    if secret is None:
                        pipe.hdel(RECORDS, token_id)
                        pipe.hdel(DIGESTS, old)
                    else:
                        record.rotated_ms = self.now_ms()
                        self._queue_write(pipe, record, secret, old)
                    await pipe.execute()
                    return record
                except WatchError:
                    continue
