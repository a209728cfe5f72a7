"""One quotagate gateway process for the benchmark (arms B, C, C-reject).

    python loadtests/gateway_proc.py GATEWAY_YAML STORE_URL

Runs ``quotagate.gateway.server.run_gateway`` on uvloop with no admin listener, in this very
process (no workers), so the benchmark can read this pid's CPU time from /proc.
"""

from __future__ import annotations

import asyncio
import logging
import sys

from quotagate.gateway.server import LOG_FORMAT, install_uvloop, run_gateway
from quotagate.settings import load_config


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: gateway_proc.py GATEWAY_YAML STORE_URL")
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    config = load_config(sys.argv[1])
    install_uvloop()
    asyncio.run(run_gateway(config, sys.argv[2], admin=False))


if __name__ == "__main__":
    main()
