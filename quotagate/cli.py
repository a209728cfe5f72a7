"""The ``quotagate`` command."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys

from quotagate import __version__
from quotagate.settings import check_files


def _serve(args: argparse.Namespace) -> int:
    from quotagate.common.logs import configure
    from quotagate.gateway.server import StartError, serve
    from quotagate.settings import ConfigError

    configure(args.log_level, args.log_format)
    try:
        return serve(args.config, workers=args.workers, log_level=args.log_level,
                     log_format=args.log_format)
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"config error: {issue}", file=sys.stderr)
        return 2
    except StartError as exc:
        print(f"quotagate serve: {exc}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    from quotagate.demo.walkthrough import run_demo
    from quotagate.gateway.server import LOG_FORMAT, StartError, install_uvloop

    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT)
    install_uvloop()
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_demo(args.port, args.admin_port, args.upstream_port, args.once))
    except StartError as exc:
        print(f"quotagate demo: {exc}", file=sys.stderr)
        return 1
    return 0


def _config_check(args: argparse.Namespace) -> int:
    issues = check_files(args.files)
    if args.json:  # one object: what a CI step or an editor can read
        print(json.dumps({"ok": not issues, "files": args.files,
                          "issues": [{"file": i.file, "path": i.path, "reason": i.reason}
                                     for i in issues]}, indent=2))
        return 1 if issues else 0
    for issue in issues:
        print(issue, file=sys.stderr)
    if not issues:
        print(f"ok: {', '.join(args.files)}")
    return 1 if issues else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quotagate",
        description="Quota-enforcement gateway for multi-tenant Backend-as-a-Service platforms.",
    )
    parser.add_argument("--version", action="version", version=f"quotagate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the gateway, admin API and metrics",
                           description="Run the gateway (public listener), the admin listener "
                           "(/healthz, /readyz, /metrics) and, without store.url, an embedded "
                           "Valkey.")
    serve.add_argument("--config", default="config/gateway.yaml",
                       help="gateway.yaml (default: %(default)s)")
    serve.add_argument("--workers", type=int, default=1,
                       help="event-loop processes sharing the port with SO_REUSEPORT")
    serve.add_argument("--log-level", default=os.environ.get("QUOTAGATE_LOG_LEVEL", "INFO"),
                       choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="INFO logs every refusal, DEBUG every decision (QUOTAGATE_LOG_LEVEL)")
    serve.add_argument("--log-format", default=os.environ.get("QUOTAGATE_LOG_FORMAT", "text"),
                       choices=["text", "json"],
                       help="json: one JSON object per line (QUOTAGATE_LOG_FORMAT)")
    serve.set_defaults(func=_serve)

    demo = sub.add_parser("demo", help="embedded Valkey + demo upstream + gateway, walked through",
                          description="Start an embedded Valkey, a demo upstream and the "
                          "gateway, send a walk-through of requests and print what came back.")
    demo.add_argument("--port", type=int, default=8080, help="gateway port (%(default)s)")
    demo.add_argument("--admin-port", type=int, default=9090, help="admin port (%(default)s)")
    demo.add_argument("--upstream-port", type=int, default=9001,
                      help="demo upstream port (%(default)s)")
    demo.add_argument("--once", action="store_true", help="exit after the walk-through")
    demo.set_defaults(func=_demo)

    config = sub.add_parser("config", help="config file tools")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    check = config_sub.add_parser(
        "check", help="validate config files",
        description="Validate gateway.yaml (with the files it names), plans.yaml or "
        "environments.yaml; print file, key path and reason per error; exit 1 on any error.")
    check.add_argument("files", nargs="+", metavar="FILE")
    check.add_argument("--json", action="store_true",
                       help="print {ok, files, issues: [{file, path, reason}]} on stdout")
    check.set_defaults(func=_config_check)

    from quotagate.control.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
