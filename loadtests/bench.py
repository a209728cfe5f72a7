"""Saturation benchmark of quotagate against its baselines, on one machine (see
/work/shared/BENCH.md and loadtests/README.md).

    .venv/bin/python loadtests/bench.py [--runs 10] [--slice 2] [--slice-warmup 0.5]
                                        [--connections 64] [--arms A,B,C,Cfn,Creject,D,N]

Arms (same upstream, same client, same concurrency):
  A        wrk -> demo upstream directly
  B        wrk -> quotagate (enforcement: off) -> upstream
  C        wrk -> quotagate (enforcement: enforce, never refuses) -> upstream; Valkey store.
           BENCH.md's C: one script call per request (QPS and the calls quota), on a function
           route without concurrency slots or GBs metering (``concurrency: false, meter: none``)
  Cfn      as C on a function route with a concurrency slot per invocation and GBs metering
           (the defaults): the slot is given back and the GBs charged after the response, in
           a second script call coalesced per environment per loop tick. Cfn/C is their cost
  Creject  as C, every other request from an environment whose calls quota is 0 (refused)
  D        wrk -> aiohttp passthrough deciding with the `limits` library -> upstream; sub-arms
           D-fixed, D-moving, D-sliding (async Redis strategies against the same Valkey)
  N        wrk -> nginx proxy_pass (keepalive 32, 1 worker) -> upstream   (if nginx is installed)
  P        plugin mode: wrk -> nginx auth_request (deploy/nginx/quotagate.conf) -> quotagate's
           decision service (authz_listen), then nginx proxy_pass -> upstream; nginx and
           quotagate share the proxy core; CPU per request is quotagate's

Every proxy is its own process pinned to one core (``taskset -c 1``); wrk is pinned to core 0
(``taskset -c 0 wrk -t1 -c64 -d2s --latency``), the upstream and Valkey too (``--aux-cpus``).

The machine's speed drifts by tens of percent over tens of seconds (other tenants), so arms are
measured in short interleaved slices: every arm's processes run for the whole bench and are
warmed up once; then each of ``--runs`` passes measures every arm for ``--slice`` seconds, one
after another (after a ``--slice-warmup`` of load), in an order that alternates forward and
reversed. Each ratio is computed from the two arms' slices of the same pass (seconds apart), and
the report gives its median and interquartile range over passes; the table gives per-arm
medians over slices. Every child process is killed on exit, Ctrl-C or error.
"""

# The pieces live in benchkit/; an arm is one module of benchkit/arms/ (loadtests/README.md,
# "Adding an arm"). This file is the command; its docstring is --help's description.

from __future__ import annotations

import sys

from benchkit.cli import main

if __name__ == "__main__":
    sys.exit(main(description=__doc__))
