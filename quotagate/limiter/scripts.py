"""Lua scripts: one file per operation under lua/, each with common.lua in front, read once,
called by SHA."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True)
class Script:
    name: str
    body: bytes
    sha: str

    @classmethod
    def load(cls, name: str) -> Script:
        lua = resources.files("quotagate.limiter").joinpath("lua")
        body = lua.joinpath("common.lua").read_bytes() + lua.joinpath(f"{name}.lua").read_bytes()
        return cls(name, body, hashlib.sha1(body).hexdigest())


DECIDE = Script.load("decide")
SETTLE = Script.load("settle")
RENEW = Script.load("renew")
ALL = (DECIDE, SETTLE, RENEW)
