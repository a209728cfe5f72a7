"""Lua scripts: one file per decision under lua/, read once, called by SHA."""

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
        body = resources.files("quotagate.limiter").joinpath(f"lua/{name}.lua").read_bytes()
        return cls(name, body, hashlib.sha1(body).hexdigest())


DECIDE = Script.load("decide")
