"""The shape of an admin API token (``qg_<id>_<secret>``) and of its name: shared by the tokens
the store keeps (control/tokens.py) and those a config file declares (settings/load.py)."""

from __future__ import annotations

import re

#: ``qg_``, the id (8 hex digits: group 1), ``_``, 32 random bytes in base64url.
TOKEN = re.compile(r"qg_([0-9a-f]{8})_[A-Za-z0-9_-]{43}")
TOKEN_ID = re.compile(r"[0-9a-f]{8}")
MAX_NAME = 64
NAME = re.compile(r"[^\x00-\x1f\x7f]{1,64}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
