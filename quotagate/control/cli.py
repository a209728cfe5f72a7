"""Operator commands over the admin API: ``quotagate env|pack|promo|plan|bill …``.

Each command is one HTTP call to ``/admin/v1`` (``--admin`` URL, ``--token``; defaults from
QUOTAGATE_ADMIN_URL and QUOTAGATE_ADMIN_TOKEN), but ``env list``, which pages through the
listing and prints each page as it comes. ``--json`` prints the API's JSON for scripts (for
``env list``: one environment per line, NDJSON); otherwise a readable table. Exit status: 0
done, 1 refused by the API (its reason on stderr), 2 the API could not be reached.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import http.client
import io
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import msgspec
import yaml

from quotagate.control.tokens import ROLES
from quotagate.settings.load import ConfigError, parse_yaml
from quotagate.settings.schema import Environment

DEFAULT_URL = "http://127.0.0.1:9090"


class Refused(Exception):
    """A command that cannot go on (a file missing, a resume that does not fit): exit 1."""


class ApiError(Exception):
    def __init__(self, status: int, message: str, problem: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.problem = problem or {}


def _open(args: argparse.Namespace, method: str, path: str, data: bytes | None = None,
          content_type: str = "application/json", timeout: float | None = None) -> Any:
    """The admin API's response, open (read it, then close it); a refusal as ApiError."""
    url = args.admin.rstrip("/") + "/admin/v1" + path
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Authorization", f"Bearer {args.token}")
    if data is not None:
        request.add_header("Content-Type", content_type)
    try:
        return urllib.request.urlopen(request, timeout=timeout or args.timeout)
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            problem = json.loads(raw)
            message = str(problem.get("detail", raw.decode(errors="replace")))
            for issue in problem.get("issues") or ():  # one line per bad value
                message += f"\n  {issue.get('path', '')}: {issue.get('reason', '')}"
        except (ValueError, AttributeError):
            problem, message = None, raw.decode(errors="replace")[:500]
        raise ApiError(exc.code, message, problem if isinstance(problem, dict) else None
                       ) from None
    except urllib.error.URLError:
        raise
    except (OSError, http.client.HTTPException) as exc:  # the API's socket, after urlopen
        raise urllib.error.URLError(exc) from exc


def call(args: argparse.Namespace, method: str, path: str, body: Any = None, *,
         raw: bytes | None = None, content_type: str = "application/json") -> Any:
    """One call, its JSON answer; the body is ``body`` as JSON, or ``raw`` as it is."""
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    response = _open(args, method, path, data, content_type=content_type)
    try:
        with response:
            return json.loads(response.read() or b"null")
    except (OSError, http.client.HTTPException) as exc:
        raise urllib.error.URLError(exc) from exc


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    if not rows:
        return "(none)"
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _out(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, ensure_ascii=False) if args.json else text)


# ---------------------------------------------------------------------------- commands


ENV_COLUMNS = ["env", "owner", "plan", "expires", "overage"]
#: ``env list`` filters: option -> the API's parameter.
LIST_FILTERS = {"state": "state", "plan": "plan", "owner": "owner", "gateway": "gateway",
                "expiring_before": "expiring_before"}


def env_list(args: argparse.Namespace) -> None:
    """Every page in turn, each printed (and flushed) as it arrives: memory is one page,
    whatever the number of environments. The table's widths are the first page's (a longer
    cell later only pushes its row)."""
    query: dict[str, Any] = {"limit": args.limit}
    query.update({param: getattr(args, opt) for opt, param in LIST_FILTERS.items()
                  if getattr(args, opt) is not None})
    widths: list[int] | None = None
    while True:
        data = call(args, "GET", "/envs?" + urllib.parse.urlencode(query))
        rows = data["environments"]
        if args.json:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False))
        elif rows:
            cells = [[str(r.get(c, "")) for c in ENV_COLUMNS] for r in rows]
            if widths is None:
                widths = [max(len(c), *(len(row[i]) for row in cells))
                          for i, c in enumerate(ENV_COLUMNS)]
                print("  ".join(c.ljust(w) for c, w in zip(ENV_COLUMNS, widths, strict=True)))
                print("  ".join("-" * w for w in widths))
            for row in cells:
                print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        sys.stdout.flush()
        cursor = data.get("next_cursor")
        if not cursor:
            break
        query["cursor"] = cursor
    if widths is None and not args.json:
        print("(none)")


def env_show(args: argparse.Namespace) -> None:
    data = call(args, "GET", f"/envs/{args.env}")
    _out(args, data, f"{data['env']} (owned by {data['owner']})\n"
         + yaml.safe_dump(data["definition"], sort_keys=False).rstrip())


def env_put(args: argparse.Namespace) -> None:
    # Read as environments.yaml is (unquoted dates, `mode: off` a string), checked here first
    # so a typo names the file and key before anything is sent.
    definition = parse_yaml(Path(args.file), Environment)
    data = call(args, "PUT", f"/envs/{args.env}", msgspec.to_builtins(definition))
    _out(args, data, f"{data['env']}: written (owned by {data['owner']})")


NDJSON = "application/x-ndjson"
#: Lines per import request (the API takes up to 10,000, and 16 MiB).
IMPORT_BATCH = 5000
#: Bytes of an import request beyond which a batch is sent before it has IMPORT_BATCH lines.
IMPORT_BATCH_BYTES = 8 * 1024 * 1024


class _Exported(msgspec.Struct):
    id: str


def _state_path(path: Path) -> Path:
    return path.with_name(path.name + ".import-state")


def _save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def _resume(source: Any, state_file: Path) -> tuple[dict[str, Any], Any]:
    """The saved progress, once the file's first ``offset`` bytes are checked to be those
    imported (a line fixed after them is fine; one before them is not)."""
    try:
        state = json.loads(state_file.read_text())
        offset, lines = int(state["offset"]), int(state["lines"])
    except (OSError, ValueError, KeyError, TypeError):
        raise Refused(f"{state_file}: no progress to resume from (start without "
                          "--resume: lines already imported are reported unchanged)") from None
    digest = hashlib.sha256()
    left = offset
    while left:
        chunk = source.read(min(left, 1 << 20))
        if not chunk:
            break
        digest.update(chunk)
        left -= len(chunk)
    if left or digest.hexdigest() != state.get("sha256"):
        raise Refused(f"{state_file}: the file's first {lines} lines are not those "
                          "imported; start again without --resume (lines already imported "
                          "are reported unchanged)")
    return state, digest


def env_import(args: argparse.Namespace) -> None:
    """Send the file's lines (NDJSON, as ``env export`` writes them) ``--batch`` at a time.
    After each batch the API took, the progress is saved beside the file (FILE.import-state:
    the lines and bytes done and the SHA-256 of those bytes), so ``--resume`` goes on from the
    first line without an answer, after a refusal, a lost connection or a Ctrl-C. Every batch
    is safe to send again: a line stored as it is changes nothing."""
    if not 1 <= args.batch <= 10_000:
        raise Refused(f"--batch: from 1 to 10000 lines, not {args.batch}")
    path = Path(args.file)
    state_file = _state_path(path)
    counts = {"received": 0, "created": 0, "updated": 0, "unchanged": 0}
    try:
        source = path.open("rb")
    except OSError as exc:
        raise Refused(f"{path}: {exc.strerror}") from None
    with source:
        if args.resume:
            state, digest = _resume(source, state_file)
            counts.update({k: int(state.get(k, 0)) for k in counts})
            offset, done = int(state["offset"]), int(state["lines"])
        else:
            digest, offset, done = hashlib.sha256(), 0, 0
        if done:
            print(f"resuming after line {done}", file=sys.stderr)
        batch: list[bytes] = []
        size = 0

        def send() -> None:
            nonlocal offset, done, batch, size
            first, last = done + 1, done + len(batch)
            try:
                body = b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for raw in batch)
                got = call(args, "POST", "/envs:import", raw=body, content_type=NDJSON)
            except ApiError as exc:
                issues = exc.problem.get("issues") or []
                message = str(exc.problem.get("detail", exc)) if issues else str(exc)
                for issue in issues:  # the request's line numbers, as the file's
                    number = first - 1 + int(issue.get("line", 0))
                    name = f" ({issue['env']})" if issue.get("env") else ""
                    message += f"\n  line {number}{name}: {issue.get('reason', '')}"
                raise ApiError(exc.status, f"lines {first}-{last}: {message}"
                               + _resume_hint(args, done)) from None
            except (urllib.error.URLError, OSError) as exc:
                print(f"lines {first}-{last} have no answer ({exc}).{_resume_hint(args, done)}",
                      file=sys.stderr)
                raise
            for key in counts:
                counts[key] += int(got.get(key, 0))
            for raw in batch:
                digest.update(raw)
                offset += len(raw)
            done = last
            _save_state(state_file, {"file": str(path.resolve()), "lines": done,
                                     "offset": offset, "sha256": digest.hexdigest(), **counts})
            print(f"lines {first}-{last}: {got.get('created', 0)} created, "
                  f"{got.get('updated', 0)} updated, {got.get('unchanged', 0)} unchanged",
                  file=sys.stderr)
            batch, size = [], 0

        try:
            for raw in source:
                batch.append(raw)
                size += len(raw)
                if len(batch) >= args.batch or size >= IMPORT_BATCH_BYTES:
                    send()
            if batch:
                send()
        except KeyboardInterrupt:
            print(f"interrupted.{_resume_hint(args, done)}", file=sys.stderr)
            raise SystemExit(130) from None
    state_file.unlink(missing_ok=True)
    _out(args, counts, f"{path}: {counts['received']} environments: {counts['created']} "
         f"created, {counts['updated']} updated, {counts['unchanged']} unchanged")


def _resume_hint(args: argparse.Namespace, done: int) -> str:
    if not done:
        return "\nnothing of the file is imported yet"
    return (f"\nlines 1-{done} are imported; go on with: quotagate env import "
            f"{args.file} --resume")


def env_export(args: argparse.Namespace) -> None:
    """Every environment as NDJSON (what ``env import`` reads), streamed to stdout or
    ``--output`` as it arrives: memory is one line, whatever the number. Cut short, it says
    the last environment written, to go on from with ``--after`` (``--output`` then appends)."""
    query = {k: v for k, v in (("owner", args.owner), ("after", args.after)) if v}
    path = "/envs:export" + ("?" + urllib.parse.urlencode(query) if query else "")
    response = _open(args, "GET", path)  # (first: a refusal leaves --output as it was)
    try:
        out = (open(args.output, "ab" if args.after else "wb")  # noqa: SIM115
               if args.output else sys.stdout.buffer)
    except OSError as exc:
        response.close()
        raise Refused(f"{args.output}: {exc.strerror}") from None
    last, count = args.after or "", 0
    decode = msgspec.json.Decoder(_Exported).decode
    try:
        with response:
            for raw in response:
                out.write(raw)
                last = decode(raw).id
                count += 1
    except (OSError, http.client.HTTPException, msgspec.DecodeError) as exc:
        out.flush()
        where = f"after {last}" if last else "before the first"
        print(f"the export was cut short {where} ({exc!r}): go on with --after {last}"
              if last else f"the export was cut short ({exc!r})", file=sys.stderr)
        raise urllib.error.URLError(f"export cut short {where}") from None
    finally:
        if args.output:
            out.close()
    if args.output:
        print(f"{count} environments written to {args.output}", file=sys.stderr)


def env_usage(args: argparse.Namespace) -> None:
    data = call(args, "GET", f"/envs/{args.env}/usage")
    rows = []
    for meter, m in data["meters"].items():
        rows.append({"meter": meter, "unit": m["unit"], "quota": m["quota"], "used": m["used"],
                     "packs left": sum(p["remaining"] for p in m["packs"] if p["valid"]),
                     "payg": m["payg"], "remaining": m["remaining"]})
    head = (f"{data['env']}  plan {data['plan']}  mode {data['mode']}  "
            f"overage {'on' if data['overage'] else 'off'}"
            f"  cycle {data['cycle']['start']} .. {data['cycle']['end']}  "
            f"QPS {data['qps_limit']} (by {data.get('qps_limit_by', 'plan')})  "
            f"watches {data['realtime']['open']}/"
            f"{data['realtime']['cap']}")
    _out(args, data, head + "\n" + table(rows, ["meter", "unit", "quota", "used",
                                                "packs left", "payg", "remaining"]))


def env_overage(args: argparse.Namespace) -> None:
    data = call(args, "PUT", f"/envs/{args.env}/overage", {"overage": args.state == "on"})
    _out(args, data, f"{data['env']}: overage {'on' if data['overage'] else 'off'}")


def env_mode(args: argparse.Namespace) -> None:
    data = call(args, "PUT", f"/envs/{args.env}/mode", {"mode": args.mode})
    _out(args, data, f"{data['env']}: mode {data['mode']} (in effect: {data['effective']})")


def pack_list(args: argparse.Namespace) -> None:
    data = call(args, "GET", f"/envs/{args.env}/packs")
    _out(args, data, table(data["packs"], ["id", "meter", "amount", "used", "remaining",
                                           "purchased", "expires"]))


def pack_buy(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"pack": args.pack} if args.pack else {
        "meter": args.meter, "amount": args.amount}
    if args.id:
        body["id"] = args.id
    data = call(args, "POST", f"/envs/{args.env}/packs", body)
    pack = data["pack"]
    _out(args, data, f"{data['env']}: pack {pack['id']} bought {pack['purchased']}")


def pack_refund(args: argparse.Namespace) -> None:
    data = call(args, "DELETE", f"/envs/{args.env}/packs/{args.id}")
    _out(args, data, f"{data['env']}: pack {data['refunded']['id']} refunded")


def promo_list(args: argparse.Namespace) -> None:
    data = call(args, "GET", f"/envs/{args.env}/promos")
    _out(args, data, table(data["promos"], ["id", "pack", "start", "days"]))


def promo_buy(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"pack": args.pack, "days": args.days}
    if args.start:
        body["start"] = args.start
    data = call(args, "POST", f"/envs/{args.env}/promos", body)
    promo = data["promo"]
    _out(args, data, f"{data['env']}: promo {promo['pack']} from {promo['start']} for "
         f"{promo['days']} day(s) ({promo['id']})")


def _quote_text(data: dict[str, Any]) -> str:
    verb = "to pay" if data["change"] == "upgrade" else "refunded"
    text = (f"{data['env']}: {data['change']} to {data['plan']}: {data['amount']} CNY {verb} "
            f"({data['days_left']} days left)\n"
            + "\n".join(f"  {k}: {v}" for k, v in data["parts"].items()))
    if data.get("over_target"):
        text += "\n  refused: usage over the target plan for " + ", ".join(data["over_target"])
    return text


def plan_quote(args: argparse.Namespace) -> None:
    data = call(args, "POST", f"/envs/{args.env}/plan/quote", {"plan": args.plan})
    _out(args, data, _quote_text(data))


def plan_change(args: argparse.Namespace) -> None:
    data = call(args, "POST", f"/envs/{args.env}/plan", {"plan": args.plan})
    _out(args, data, _quote_text(data))


def plan_renew(args: argparse.Namespace) -> None:
    data = call(args, "POST", f"/envs/{args.env}/renew", {"months": args.months})
    _out(args, data, f"{data['env']}: renewed, expires {data['expires']} (paid {data['paid']})")


def gateway_versions(args: argparse.Namespace) -> None:
    data = call(args, "GET", "/gateway/versions")
    _out(args, data, table(data["versions"], ["version", "qps", "mbps", "monthly_price"])
         + f"\nterms (months): {', '.join(map(str, data['terms']))}")


def gateway_quote(args: argparse.Namespace) -> None:
    data = call(args, "POST", "/gateway/quote", {"version": args.version,
                                                 "months": args.months})
    _out(args, data, f"{data['version']} for {data['months']} month(s): {data['amount']} "
         f"{data['currency']} ({data['monthly_price']} a month)")


def _gateway_text(data: dict[str, Any]) -> str:
    g = data["gateway"]
    if g is None:
        return f"{data['env']}: no gateway version (the plan's QPS, no bandwidth cap)"
    renew = (f"renews itself by {g['renew_months']} month(s)" if g["auto_renew"]
             else "renewed by hand")
    text = (f"{data['env']}: gateway {g['version']} ({g['state']}), bought {g['purchased']}, "
            f"runs to {g['expires']}, {renew}; {g['monthly_price']} CNY/month\n"
            f"  in effect: {g['in_effect'] or 'none yet'}: {g['qps']} QPS, {g['mbps']} Mbps")
    if "change" in data:
        text = _change_text(data, g["version"]) + "\n" + text
    elif "amount" in data:
        text += f"\n  paid: {data['amount']} {data['currency']}"
    return text


def _change_text(data: dict[str, Any], version: str) -> str:
    verb = {"upgrade": "to pay", "downgrade": "refunded"}.get(data["change"], "either way")
    return (f"{data['env']}: {data['change']} to {version}: {data['amount']} "
            f"{data['currency']} {verb} ({data['days_left']} days left)\n"
            + "\n".join(f"  {k}: {v}" for k, v in data["parts"].items()))


def gateway_show(args: argparse.Namespace) -> None:
    data = call(args, "GET", f"/envs/{args.env}/gateway")
    _out(args, data, _gateway_text(data))


def gateway_buy(args: argparse.Namespace) -> None:
    data = call(args, "POST", f"/envs/{args.env}/gateway",
                {"version": args.version, "months": args.months,
                 "auto_renew": args.auto_renew})
    _out(args, data, _gateway_text(data))


def gateway_renew(args: argparse.Namespace) -> None:
    data = call(args, "POST", f"/envs/{args.env}/gateway/renew", {"months": args.months})
    _out(args, data, _gateway_text(data))


def gateway_change(args: argparse.Namespace) -> None:
    if args.quote:
        data = call(args, "POST", f"/envs/{args.env}/gateway/change/quote",
                    {"version": args.version})
        _out(args, data, _change_text(data, args.version))
        return
    data = call(args, "POST", f"/envs/{args.env}/gateway/change", {"version": args.version})
    _out(args, data, _gateway_text(data))


def gateway_auto_renew(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"on": args.state == "on"}
    if args.months is not None:
        body["months"] = args.months
    data = call(args, "PUT", f"/envs/{args.env}/gateway/auto-renew", body)
    _out(args, data, _gateway_text(data))


BILL_COLUMNS = ["env", "day", "meter", "quantity", "unit", "unit_price", "per", "amount"]


def bill(args: argparse.Namespace) -> None:
    query = f"/bills?date={args.date}" + (f"&env={args.env}" if args.env else "")
    data = call(args, "GET", query)
    if args.json or args.format == "json":
        print(json.dumps(data, indent=2, ensure_ascii=False))
    elif args.format == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=BILL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(data["lines"])
        print(buf.getvalue(), end="")
    else:
        print(table(data["lines"], BILL_COLUMNS))
        print(f"total {data['total']} {data['currency']}")


TOKEN_COLUMNS = ["id", "name", "role", "env", "source", "created", "rotated"]


def _when(ms: int | None) -> str:
    if ms is None:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _token_row(token: dict[str, Any]) -> dict[str, Any]:
    return {**token, "env": token.get("env") or "", "source": token.get("source", "api"),
            "created": _when(token["created_ms"] or None),
            "rotated": _when(token.get("rotated_ms"))}


def _token_text(data: dict[str, Any]) -> str:
    text = table([_token_row(data)], TOKEN_COLUMNS)
    if "token" in data:
        text += ("\n\ntoken (shown this once; the gateway keeps only its SHA-256):\n"
                 + data["token"])
    return text


def token_list(args: argparse.Namespace) -> None:
    data = call(args, "GET", "/tokens")
    _out(args, data, table([_token_row(t) for t in data["tokens"]], TOKEN_COLUMNS))


def token_create(args: argparse.Namespace) -> None:
    body: dict[str, Any] = {"name": args.name, "role": args.role}
    if args.env:
        body["env"] = args.env
    data = call(args, "POST", "/tokens", body)
    _out(args, data, _token_text(data))


def _token_id(text: str) -> str:
    if not (len(text) == 8 and all(c in "0123456789abcdef" for c in text)):
        raise Refused("a token id is 8 hex digits (quotagate token list), never the token "
                      "itself")
    return text


def token_rotate(args: argparse.Namespace) -> None:
    data = call(args, "POST", f"/tokens/{_token_id(args.id)}/rotate")
    _out(args, data, _token_text(data))


def token_revoke(args: argparse.Namespace) -> None:
    data = call(args, "DELETE", f"/tokens/{_token_id(args.id)}")
    _out(args, data, f"revoked {data['id']} ({data['name']!r}, {data['role']})")


AUDIT_COLUMNS = ["at", "actor", "role", "action", "env", "status", "request_id"]


def audit(args: argparse.Namespace) -> None:
    """The newest ``--max`` entries (0: all), a page at a time, printed as they come."""
    params = {k: v for k, v in (("env", args.env), ("token", args.actor),
                                ("action", args.action), ("since", args.since),
                                ("until", args.until)) if v}
    left = args.max or None
    cursor = None
    while True:
        limit = min(1000, left) if left is not None else 1000
        query = urllib.parse.urlencode({**params, "limit": limit,
                                        **({"cursor": cursor} if cursor else {})})
        data = call(args, "GET", f"/audit?{query}")
        rows = data["entries"]
        if args.json:
            for row in rows:
                print(json.dumps(row, ensure_ascii=False))
        elif rows:
            print(table([{**r, "actor": f"{r['actor']} ({r['actor_name']})",
                          "env": r.get("env") or r.get("envs", "")[:40]} for r in rows],
                        AUDIT_COLUMNS))
        sys.stdout.flush()
        if left is not None:
            left -= len(rows)
        cursor = data["next_cursor"]
        if not cursor or (left is not None and left <= 0):
            return


def whoami(args: argparse.Namespace) -> None:
    data = call(args, "GET", "/me")
    _out(args, data, f"{data['id']} ({data['name']!r}): {data['role']}"
         + (f" of {data['env']}" if data.get("env") else ""))


# ------------------------------------------------------------------------------ parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--admin", default=os.environ.get("QUOTAGATE_ADMIN_URL", DEFAULT_URL),
                   help="admin listener URL (QUOTAGATE_ADMIN_URL, default %(default)s)")
    p.add_argument("--token", default=os.environ.get("QUOTAGATE_ADMIN_TOKEN", ""),
                   help="bearer token (QUOTAGATE_ADMIN_TOKEN)")
    p.add_argument("--json", action="store_true", help="print the API's JSON")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds (%(default)s)")


def _cmd(sub: Any, name: str, help_: str, func: Any, *args: tuple[str, dict[str, Any]]
         ) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_, description=help_)
    for flag, kw in args:
        p.add_argument(flag, **kw)
    _common(p)
    p.set_defaults(func=lambda a: _run(func, a))
    return p


#: Exit status when whoever reads the output goes away first (``| head``): 128 + SIGPIPE, what
#: a command killed by SIGPIPE returns, so a pipeline sees the same as with any Unix tool.
EXIT_PIPE_CLOSED = 141


def _run(func: Any, args: argparse.Namespace) -> int:
    try:
        func(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        # The reader of our output went away: not the admin API (urllib wraps the errors of its
        # own socket in URLError). Nothing to say; stdout is pointed at /dev/null so that the
        # interpreter's last flush does not complain either.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return EXIT_PIPE_CLOSED
    except ApiError as exc:
        print(f"refused ({exc.status}): {exc}", file=sys.stderr)
        return 1
    except (ConfigError, Refused) as exc:
        print(exc, file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
        return 2
    return 0


ENV = ("env", {"help": "environment id"})


def add_commands(sub: Any) -> None:
    env = sub.add_parser("env", help="environments: list, show, put, import, export, usage, "
                         "overage")
    es = env.add_subparsers(dest="env_command", required=True)
    el = _cmd(es, "list", "list environments and who owns them, in id order, page by page "
              "(printed as each page arrives; --json: one environment per line)", env_list)
    el.add_argument("--limit", type=int, default=500,
                    help="environments per page, 1-1000 (%(default)s); every page is listed")
    el.add_argument("--state", choices=["active", "isolated", "released-pending",
                                        "not-started"], help="by its dates today")
    el.add_argument("--plan", help="on this plan")
    el.add_argument("--owner", choices=["file", "api"], help="environments.yaml or the API")
    el.add_argument("--gateway", help="with this gateway version bought, or none")
    el.add_argument("--expiring-before", dest="expiring_before", metavar="YYYY-MM-DD",
                    help="expiring before this date")
    _cmd(es, "show", "an environment's definition", env_show, ENV)
    _cmd(es, "put", "create or replace an API-owned environment from a YAML/JSON file",
         env_put, ENV, ("file", {"help": "the definition (keys of environments.yaml)"}))
    ei = _cmd(es, "import", "create or replace API-owned environments from an NDJSON file "
              "(one {\"id\", \"environment\"} per line, as env export writes), a batch at "
              "a time; idempotent, and resumable with --resume", env_import,
              ("file", {"help": "the NDJSON file"}))
    ei.add_argument("--batch", type=int, default=IMPORT_BATCH,
                    help="lines per request, 1-10000 (%(default)s)")
    ei.add_argument("--resume", action="store_true", help="go on after the last batch the API "
                    "took (FILE.import-state)")
    ei.set_defaults(timeout=120.0)
    ee = _cmd(es, "export", "every environment as NDJSON, in id order, streamed", env_export)
    ee.add_argument("--owner", choices=["file", "api"], help="only the file's or the API's")
    ee.add_argument("--after", metavar="ENV", help="start after this id (go on from a cut)")
    ee.add_argument("--output", "-o", help="write to this file (with --after: append)")
    ee.set_defaults(timeout=120.0)
    _cmd(es, "usage", "usage per meter: quota, used, packs, pay-as-you-go, cycle, QPS",
         env_usage, ENV)
    _cmd(es, "overage", "switch overage (pay-as-you-go past the quota) on or off",
         env_overage, ENV, ("state", {"choices": ["on", "off"]}))
    _cmd(es, "mode", "the environment's enforcement: enforce, shadow (decided, never refused), "
         "off (not decided), or default (the gateway's)", env_mode, ENV,
         ("mode", {"choices": ["enforce", "shadow", "off", "default"]}))

    pack = sub.add_parser("pack", help="resource packs: list, buy, refund")
    ps = pack.add_subparsers(dest="pack_command", required=True)
    _cmd(ps, "list", "packs of an environment, with what is left", pack_list, ENV)
    buy = _cmd(ps, "buy", "buy a resource pack (valid 30 days from today)", pack_buy, ENV,
               ("pack", {"nargs": "?", "default": "", "help": "catalog name, e.g. calls-10m"}))
    buy.add_argument("--meter", choices=["calls", "capacity_bytes", "sms"])
    buy.add_argument("--amount", type=int)
    buy.add_argument("--id", help="pack id (default: generated)")
    _cmd(ps, "refund", "refund an unused pack within 7 days of purchase", pack_refund, ENV,
         ("id", {"help": "pack id"}))

    promo = sub.add_parser("promo", help="promo packs bought per day: list, buy")
    rs = promo.add_subparsers(dest="promo_command", required=True)
    _cmd(rs, "list", "promo packs of an environment", promo_list, ENV)
    pb = _cmd(rs, "buy", "buy a promo pack for N days (from today)", promo_buy, ENV,
              ("pack", {"help": "e.g. db-3k, fn-500g"}))
    pb.add_argument("--days", type=int, default=1)
    pb.add_argument("--start", help="YYYY-MM-DD (default today, environment time zone)")

    plan = sub.add_parser("plan", help="plan changes: quote, change")
    pls = plan.add_subparsers(dest="plan_command", required=True)
    _cmd(pls, "quote", "price of an upgrade or a downgrade (SPEC §11)", plan_quote, ENV,
         ("plan", {"help": "target plan"}))
    _cmd(pls, "change", "upgrade at once, or downgrade if usage allows", plan_change, ENV,
         ("plan", {"help": "target plan"}))
    renew = _cmd(pls, "renew", "renew for N months from the original expiry (also while "
                 "isolated)", plan_renew, ENV)
    renew.add_argument("--months", type=int, default=1)

    gw = sub.add_parser("gateway", help="gateway versions: versions, show, buy, renew, "
                        "change, auto-renew")
    gs = gw.add_subparsers(dest="gateway_command", required=True)
    _cmd(gs, "versions", "the versions sold, their caps and monthly prices", gateway_versions)
    gq = _cmd(gs, "quote", "the price of a version for a term, exact", gateway_quote,
              ("version", {"help": "e.g. test, starter, basic"}))
    gq.add_argument("--months", type=int, required=True,
                    help="1-5, 6 (half a year), 12, 24, 36 or 48")
    _cmd(gs, "show", "an environment's gateway version: state, expiry, caps in effect",
         gateway_show, ENV)
    gb = _cmd(gs, "buy", "buy a gateway version from today, prepaid", gateway_buy, ENV,
              ("version", {"help": "e.g. test, starter, basic"}))
    gb.add_argument("--months", type=int, required=True,
                    help="1-5, 6 (half a year), 12, 24, 36 or 48")
    gb.add_argument("--auto-renew", action="store_true",
                    help="renew by the same term on the expiry day")
    gr = _cmd(gs, "renew", "renew by hand, before it expires", gateway_renew, ENV)
    gr.add_argument("--months", type=int, required=True)
    gc = _cmd(gs, "change", "change the running version for another at once, its expiry "
              "kept: an upgrade pays the difference for the days left, a downgrade is "
              "refunded it", gateway_change, ENV,
              ("version", {"help": "the version to change to"}))
    gc.add_argument("--quote", action="store_true", help="only say what it would cost or "
                    "refund today; change nothing")
    ga = _cmd(gs, "auto-renew", "renew on the expiry day, or not", gateway_auto_renew, ENV,
              ("state", {"choices": ["on", "off"]}))
    ga.add_argument("--months", type=int, help="the term of each renewal (default: the "
                    "last bought)")

    b = _cmd(sub, "bill", "pay-as-you-go lines of one day at list price", bill)
    b.add_argument("--date", required=True, help="YYYY-MM-DD (each environment's local day)")
    b.add_argument("--env", help="one environment only")
    b.add_argument("--format", choices=["table", "json", "csv"], default="table")

    tok = sub.add_parser("token", help="scoped tokens of the admin API: list, create, rotate, "
                         "revoke (role admin)")
    ts = tok.add_subparsers(dest="token_command", required=True)
    _cmd(ts, "list", "every token: id, name, role, environment (never a secret)", token_list)
    tc = _cmd(ts, "create", "a new token; its secret is printed this once", token_create,
              ("name", {"help": "who or what holds it, e.g. 'support desk'"}))
    tc.add_argument("--role", required=True, choices=list(ROLES),
                    help="viewer: read; support: read + overage and auto-renewal; billing: "
                    "read + everything that moves money; admin: everything; env: one "
                    "environment's reads (with --env)")
    tc.add_argument("--env", help="the environment an env token reads")
    _cmd(ts, "rotate", "a new secret (printed this once); the old one stops at once",
         token_rotate, ("id", {"help": "token id (8 hex digits)"}))
    _cmd(ts, "revoke", "revoke a token, at once on every instance", token_revoke,
         ("id", {"help": "token id (8 hex digits)"}))
    _cmd(sub, "whoami", "who the token given is: id, name, role", whoami)
    au = _cmd(sub, "audit", "the audit trail, newest first: every change through the admin "
              "API (refused or not) and every config reload", audit)
    au.add_argument("--env", help="of this environment")
    au.add_argument("--by", dest="actor", metavar="TOKEN_ID", help="made with this token id "
                    "(admin-token: QUOTAGATE_ADMIN_TOKEN; config: reloads)")
    au.add_argument("--action", help="e.g. buy_pack, change_plan, config_reload")
    au.add_argument("--since", help="from: YYYY-MM-DD (UTC), ISO 8601 with offset, or ms")
    au.add_argument("--until", help="until (exclusive), as --since")
    au.add_argument("--max", type=int, default=100, help="entries at most (%(default)s; 0: "
                    "all)")
