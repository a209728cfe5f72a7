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
_NAMES = ("decide", "settle", "renew", "bandwidth", "lease")
#: How each operation becomes a function of the library (``_library``).
_WRAPPER = ("\nlocal function op_{name}(KEYS, ARGV)\n{code}\nend\n"
            "redis.register_function('{function}', op_{name})\n")
#: Functions of the library alone (no script form): their code defines ``op_<name>``, which
#: is registered with these flags.
_LIBRARY_ONLY = {"settle_many": ("allow-cross-slot-keys",)}
_REGISTER = ("\nredis.register_function{{function_name='{function}', callback=op_{name}, "
             "flags={{{flags}}}}}\n")
#: Digest of all the code, the wrappers included: names the library and its functions.
VERSION = hashlib.sha1(
    "".join([_WRAPPER, _REGISTER, repr(_LIBRARY_ONLY), _COMMON,
             *(_LUA.joinpath(f"{n}.lua").read_text() for n in (*_NAMES, *_LIBRARY_ONLY))]
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
LEASE = Script.load("lease")
ALL = (DECIDE, SETTLE, RENEW, BANDWIDTH, LEASE)
#: settle.lua's calls of several environments on one node in one (lua/settle_many.lua): a
#: function of the library only; where functions are refused, each call goes on its own.
SETTLE_MANY = f"qg_settle_many_{VERSION}"


def _library() -> bytes:
    """common.lua once at the top, each operation as a function of (KEYS, ARGV)."""
    parts = [f"#!lua name={LIBRARY_NAME}\n", _COMMON]
    for script in ALL:
        code = _LUA.joinpath(f"{script.name}.lua").read_text()
        parts.append(_WRAPPER.format(name=script.name, code=code, function=script.function))
    for name, flags in _LIBRARY_ONLY.items():
        parts.append(_LUA.joinpath(f"{name}.lua").read_text())
        parts.append(_REGISTER.format(function=f"qg_{name}_{VERSION}", name=name,
                                      flags=", ".join(f"'{f}'" for f in flags)))
    return "".join(parts).encode()


LIBRARY = _library()
