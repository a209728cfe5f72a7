"""One quotagate gateway process for the benchmark (arms B, C, C-reject).

    python loadtests/gateway_proc.py GATEWAY_YAML STORE_URL [--admin]

Runs ``quotagate.gateway.server.run_gateway`` on uvloop in this very process (no workers), so
the benchmark can read this pid's CPU time from /proc; with no admin listener unless
``--admin`` (the Locust runner waits for its ``/readyz``).
"""

from __future__ import annotations

import asyncio
import logging
import sys

from quotagate.gateway.server import LOG_FORMAT, install_uvloop, run_gateway
from quotagate.settings import load_config


def main() -> None:
    args = sys.argv[1:]
    admin = "--admin" in args
    args = [a for a in args if a != "--admin"]
    if len(args) != 2:
        raise SystemExit("usage: gateway_proc.py GATEWAY_YAML STORE_URL [--admin]")
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    config = load_config(args[0])
    install_uvloop()
    asyncio.run(run_gateway(config, args[1], admin=admin))


if __name__ == "__main__":
    main()
