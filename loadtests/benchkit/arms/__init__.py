"""The registry of arms: one module each, listed here once.

ARMS's order is the order their processes start in and the report's table shows them;
MEASURE_ORDER is the order within a pass (reversed every other pass): the pairs the ratios
compare sit next to each other (A|N, N|B, B|C, C|D-fixed), so their slices are seconds apart.
"""

from __future__ import annotations

from ..arm import ArmDef
from . import (
    a_upstream,
    b_gateway_off,
    c_cold,
    c_enforce,
    cfn_function,
    creject,
    d_limits,
    n_nginx,
    p_plugin,
)

ARMS: dict[str, ArmDef] = {arm.name: arm for arm in (
    a_upstream.ARM,
    b_gateway_off.ARM,
    c_enforce.ARM,
    c_cold.ARM,
    cfn_function.ARM,
    creject.ARM,
    *d_limits.ARMS,
    n_nginx.ARM,
    p_plugin.ARM,
)}
MEASURE_ORDER = ("A", "N", "B", "C", "Ccold", "P", "Cfn", "D-fixed", "D-moving", "D-sliding",
                 "Creject")
DISPLAY_ORDER = tuple(ARMS)
#: What --arms accepts by default: every arm, a group (D) once in place of its members.
ALL_ARMS = tuple(dict.fromkeys(arm.group or arm.name for arm in ARMS.values()))

assert sorted(MEASURE_ORDER) == sorted(ARMS), "every arm needs its place in MEASURE_ORDER"
