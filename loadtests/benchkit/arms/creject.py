"""Creject: as C, every other request from an environment whose calls quota is 0 (refused)."""

from __future__ import annotations

from ..arm import Arm, ArmDef, Context
from ..common import ENV_EMPTY, ENV_OK, PLAIN_PATH
from ._gateway import gateway

ALTERNATE_LUA = f"""\
-- Alternate X-CloudBase-Env between an admitted and a refused environment (arm C-reject).
local reqs = {{}}
local n = 0
function init(args)
  reqs[1] = wrk.format(nil, nil, {{["X-CloudBase-Env"] = "{ENV_OK}"}})
  reqs[2] = wrk.format(nil, nil, {{["X-CloudBase-Env"] = "{ENV_EMPTY}"}})
end
function request()
  n = n + 1
  return reqs[n % 2 + 1]
end
"""


def start(ctx: Context) -> Arm:
    port, pid = gateway(ctx, "enforce")
    lua = ctx.tmp / "alternate.lua"
    lua.write_text(ALTERNATE_LUA)
    return Arm("Creject", port, pid, ["-s", str(lua)],
               f"as C, alternating {ENV_OK} / {ENV_EMPTY} (calls 0, no overage:"
               " refused) via a wrk Lua script", PLAIN_PATH)


ARM = ArmDef("Creject", start)
