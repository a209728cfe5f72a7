"""Lua scripts: one file per operation under lua/, each with common.lua in front.

They reach the store in two forms, the same code in both:

- a **function library** (``FUNCTION LOAD``, Redis >= 7.0 / Valkey >= 7.2), called with
  ``FCALL``. Its top level runs once per load, so common.lua's helpers are defined once, not
  per call, and decoded entitlement snapshots are kept between calls (validated against the
  stored string every call; see ``snapshot`` in common.lua). This halves decide.lua's cost in
  the store. Library and function names carry a digest of the code, so instances of different
  versions never call each other's code;
- plain **scripts** (``EVALSHA``): the fallback where functions are missing or refused (an
  older server, an ACL without ``FUNCTION``/``FCALL``), and the body sent with ``EVAL`` when the
  store lost both (a restart without persistence, a flush).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

_LUA = resources.files("quotagate.limiter").joinpath("lua")
_COMMON = _LUA.joinpath("common.lua").read_text()
_NAMES = ("decide", "settle", "renew", "bandwidth")
#: How each operation becomes a function of the library (``_library``).
_WRAPPER = ("\nlocal function op_{name}(KEYS, ARGV)\n{code}\nend\n"
            "redis.register_function('{function}', op_{name})\n")
#: Digest of all the code, the wrapper included: names the library and its functions.
VERSION = hashlib.sha1(
    "".join([_WRAPPER, _COMMON, *(_LUA.joinpath(f"{n}.lua").read_text() for n in _NAMES)]
            ).encode()
).hexdigest()[:12]
LIBRARY_NAME = f"quotagate_{VERSION}"


@dataclass(frozen=True)
class Script:
    name: str
    #: common.lua + the operation, run as a script (EVAL / EVALSHA)
    body: bytes
    sha: str
    #: the same code's function in the library (FCALL)
    function: str

    @classmethod
    def load(cls, name: str) -> Script:
        body = (_COMMON + _LUA.joinpath(f"{name}.lua").read_text()).encode()
        return cls(name, body, hashlib.sha1(body).hexdigest(), f"qg_{name}_{VERSION}")


DECIDE = Script.load("decide")
SETTLE = Script.load("settle")
RENEW = Script.load("renew")
BANDWIDTH = Script.load("bandwidth")
ALL = (DECIDE, SETTLE, RENEW, BANDWIDTH)


def _library() -> bytes:
    """common.lua once at the top, each operation as a function of (KEYS, ARGV)."""
    parts = [f"#!lua name={LIBRARY_NAME}\n", _COMMON]
    for script in ALL:
        code = _LUA.joinpath(f"{script.name}.lua").read_text()
        parts.append(_WRAPPER.format(name=script.name, code=code, function=script.function))
    return "".join(parts).encode()


LIBRARY = _library()
