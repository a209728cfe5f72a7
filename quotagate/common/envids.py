"""The environment-id grammar (SPEC §13): every id is checked against it before it names a
store key, a metric label or a config entry."""

from __future__ import annotations

import re

ENV_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
