"""Read and validate the config files; every failure names the file, the key path and the reason."""

from __future__ import annotations

import contextlib
import datetime as dt
import difflib
import functools
import gc
import hashlib
import json
import logging
import re
import subprocess
import sys
import time
import zoneinfo
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import msgspec
import yaml

from quotagate.common.addresses import StoreAddress
from quotagate.common.calendar import add_months_clamped
from quotagate.common.envids import ENV_ID
from quotagate.common.tokenshape import MAX_NAME, NAME, SHA256_HEX, TOKEN, TOKEN_ID
from quotagate.settings.schema import (
    FUNCTION_NAME,
    GATEWAY_TERMS,
    PAYG_METERS,
    Environment,
    EnvironmentsFile,
    GatewayGrant,
    GatewaySettings,
    PlansFile,
    TokensFile,
)

T = TypeVar("T")

#: A plan period longer than this is refused: the snapshot lists every cycle of the period.
MAX_PLAN_YEARS = 10
#: Dates outside this range are typos (and overflow the calendar arithmetic).
MIN_DATE, MAX_DATE = dt.date(1971, 1, 1), dt.date(9000, 12, 31)


@dataclass(frozen=True)
class ConfigIssue:
    file: str
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.file}: {self.path}: {self.reason}"


class ConfigError(Exception):
    """One or more config files are invalid; nothing of them was applied."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


#: Plain scalars whose tag a load remembers (the first ones seen: keys, plan names, dates).
_MEMO = 4096


class _Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """libyaml's parser (``CSafeLoader``: PyYAML's C binding, present in its wheels) with
    YAML 1.2-ish booleans: only true/false, so ``enforcement: off`` stays the string "off".

    A file of 10^5 environments is ~10^6 scalars and 10^5 mappings, each resolved and
    constructed in Python: plain scalars' tags are memoized per load (the same plan names,
    dates and keys recur), and ``_load`` builds the common tags itself (docs/benchmarks.md,
    "Loading a big environments file")."""

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._tags: dict[tuple[str, tuple[bool, bool]], str] = {}

    def resolve(self, kind: Any, value: Any, implicit: Any) -> Any:
        if kind is yaml.ScalarNode and not self.yaml_path_resolvers:
            key = (value, implicit)
            tag = self._tags.get(key)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(self._tags) < _MEMO:  # (ids and numbers of each environment never
                    self._tags[key] = tag   # recur: a memo of them would only be freed)
            return tag
        return super().resolve(kind, value, implicit)


_Loader.yaml_implicit_resolvers = {
    ch: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for ch, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def _mapping(pairs: list[tuple[yaml.Node, yaml.Node]], build: Callable[[yaml.Node], Any]
             ) -> dict:
    """A mapping's pairs built by ``build``; keys must be scalars, and unique."""
    mapping: dict[Any, Any] = {}
    for key_node, value_node in pairs:
        key = build(key_node)
        if not isinstance(key, Hashable):
            raise yaml.constructor.ConstructorError(
                None, None, "a key must be a scalar, not a list or mapping", key_node.start_mark
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = build(value_node)
    return mapping


def _no_duplicate_keys(loader: _Loader, node: yaml.MappingNode, deep: bool = False) -> dict:
    return _mapping(node.value, lambda n: loader.construct_object(n, deep=deep))


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicate_keys)


def _timestamp(loader: _Loader, node: yaml.ScalarNode) -> Any:
    try:
        return yaml.SafeLoader.construct_yaml_timestamp(loader, node)
    except ValueError as exc:
        raise yaml.constructor.ConstructorError(
            None, None, f"not a date: {node.value!r} ({exc})", node.start_mark
        ) from None


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _timestamp)


#: Deeper than this, a file is refused (a config nests a few levels; an alias to its own
#: ancestor nests for ever).
MAX_DEPTH = 64
_STR, _INT, _MAP, _SEQ = (f"tag:yaml.org,2002:{t}" for t in ("str", "int", "map", "seq"))
_NULL, _BOOL, _TIMESTAMP = (f"tag:yaml.org,2002:{t}" for t in ("null", "bool", "timestamp"))
_TRUE = frozenset(("true", "True", "TRUE"))
_BOOLS = _TRUE | {"false", "False", "FALSE"}


def _load(text: str) -> Any:
    """The document in ``text``, as ``yaml.load(text, Loader=_Loader)`` would build it, in
    half the time: the common tags are built here directly, anything else by the loader's
    constructors. Each alias is built anew where it is used (no object at two paths)."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            return _build(loader, node, 0)
        finally:
            release(node)
    finally:
        loader.dispose()


#: A list or mapping longer than this is taken apart an item at a time by ``release``.
_BIG = 64


def release(root: Any) -> None:
    """Free a big tree (YAML nodes, or the dicts and lists parsed from them) an item at a
    time instead of all at once when its last reference goes: freeing 10^6 objects in one
    go is one long C call that holds the interpreter lock (~0.3 s for 10^5 environments),
    and any other thread (the event loop's) waits for all of it. Only for trees nothing else
    refers to any more."""
    stack = [root]
    while stack:
        node = stack.pop()
        items = node.value if isinstance(node, yaml.Node) else node
        if isinstance(items, dict):
            while items:
                _, item = items.popitem()
                if isinstance(item, dict | list) and len(item) > _BIG:
                    stack.append(item)
        elif isinstance(items, list):
            while items:
                item = items.pop()
                for child in item if isinstance(item, tuple) else (item,):
                    inner = child.value if isinstance(child, yaml.Node) else child
                    if isinstance(inner, dict | list) and len(inner) > _BIG:
                        stack.append(child)


def _build(loader: _Loader, node: yaml.Node, depth: int) -> Any:
    """Only what is certain to build as PyYAML's constructors would is built here (plain
    decimal ints without a leading zero: ``0100`` is YAML 1.1's octal; ``true``/``false``
    only: an explicit ``!!bool yes`` is true); the rest, and a tag on the wrong kind of node,
    goes to them."""
    if depth > MAX_DEPTH:
        raise yaml.constructor.ConstructorError(
            None, None, f"nested deeper than {MAX_DEPTH} levels", node.start_mark)
    tag = node.tag
    if isinstance(node, yaml.ScalarNode):
        value = node.value
        if tag == _STR:
            return value
        if (tag == _INT and value.isascii() and value.isdigit()
                and (value == "0" or value[0] != "0")):
            return int(value)
        if tag == _TIMESTAMP:
            return _timestamp(loader, node)
        if tag == _NULL:
            return None
        if tag == _BOOL and value in _BOOLS:
            return value in _TRUE
    elif isinstance(node, yaml.MappingNode) and tag == _MAP:
        return _mapping(node.value, lambda n: _build(loader, n, depth + 1))
    elif isinstance(node, yaml.SequenceNode) and tag == _SEQ:
        return [_build(loader, item, depth + 1) for item in node.value]
    return loader.construct_object(node, deep=True)


_MSGSPEC_PATH = re.compile(r"^(?P<reason>.*?)(?: - at `(?P<path>[^`]*)`)?$", re.S)


def parse_yaml(path: Path, kind: type[T]) -> T:
    """Parse one YAML file into ``kind``; raises ConfigError naming file, key path and reason
    of every error found."""
    value, issues = read_yaml(path, kind)
    if issues:
        raise ConfigError(issues)
    assert value is not None
    return value


def read_yaml(path: Path, kind: type[T], data: bytes | None = None
              ) -> tuple[T | None, list[ConfigIssue]]:
    """One YAML file converted to ``kind`` as far as it goes, and every issue found.
    ``data``: its bytes, read already (then the file itself is not read)."""
    raw, issues = _read_raw(path, data)
    if raw is None:
        return None, issues
    try:
        return convert_all(raw, kind, str(path))
    finally:
        release(raw)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector paused while a file is parsed: a big file's millions of
    new objects set off collections that each walk every object alive, and cost more than
    the parse itself (5x on 10^5 environments). Nothing it makes is cyclic garbage."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class _DuplicateKey(Exception):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _json_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object, refusing a key given twice (as YAML's mappings are)."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return out


def _read_raw(path: Path, data: bytes | None = None) -> tuple[dict | None, list[ConfigIssue]]:
    """One YAML file's top-level mapping as parsed (a ``.json`` file's as JSON: a key given
    twice is refused there too), or the issue that it is not one. ``data``: its bytes, read
    already."""
    name = str(path)
    try:
        text = (path.read_bytes() if data is None else data).decode("utf-8")
    except OSError as exc:
        return None, [ConfigIssue(name, "$", f"cannot read: {exc.strerror}")]
    except UnicodeDecodeError as exc:
        return None, [ConfigIssue(name, "$", f"cannot read: not UTF-8 (byte {exc.start})")]
    if path.suffix == ".json":
        try:
            with gc_paused():
                raw = json.loads(text, object_pairs_hook=_json_object)
        except json.JSONDecodeError as exc:
            return None, [ConfigIssue(name, f"line {exc.lineno}, column {exc.colno}",
                                      f"invalid JSON: {exc.msg}")]
        except _DuplicateKey as exc:
            return None, [ConfigIssue(name, "$", f"invalid JSON: duplicate key {exc.key!r}")]
        except RecursionError:
            return None, [ConfigIssue(name, "$", "invalid JSON: nested too deep")]
        except ValueError as exc:  # e.g. an integer past the interpreter's digit limit
            return None, [ConfigIssue(name, "$", f"invalid JSON: {exc}")]
    else:
        try:
            with gc_paused():
                raw = _load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "$"
            problem = getattr(exc, "problem", None) or str(exc)
            return None, [ConfigIssue(name, where, f"invalid YAML: {problem}")]
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
            # PyYAML's own constructors on explicit tags they cannot build (``!!bool maybe``,
            # ``!!int [1]``): not a YAMLError, and never a reason to stop the reloader.
            return None, [ConfigIssue(name, "$", f"invalid YAML: cannot build a value "
                                      f"({type(exc).__name__}: {exc})")]
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return None, [ConfigIssue(name, "$", "expected a mapping at the top level")]
    return raw, []


#: A file with more shape errors than this is reported up to here.
MAX_ISSUES_PER_FILE = 50
_MISSING = re.compile(r"^Object missing required field `(?P<key>[^`]*)`$")


def convert_all(raw: dict, kind: type[T], name: str) -> tuple[T | None, list[ConfigIssue]]:
    """Every shape error of a file, not only msgspec's first: after each one the offending key
    (or list item) is taken out of a copy and the rest converted again. A required key taken out
    that way is not reported a second time as missing; its owner is taken out instead. Returns
    the conversion of what is left (None if nothing converts) and the issues."""
    try:
        return _convert(raw, kind), []  # (valid: nothing taken out)
    except msgspec.ValidationError:
        pass
    data = _unshared(raw)
    issues: list[ConfigIssue] = []
    removed: set[tuple[Any, ...]] = set()
    origins: dict[int, list[int]] = {}  # a list's items' indices in the file, once one is out
    for _ in range(MAX_ISSUES_PER_FILE * 4):
        try:
            return msgspec.convert(data, kind, strict=True), issues
        except msgspec.ValidationError as exc:
            segments, reason = _failure(data, kind, exc)
            as_in_file = _as_in_file(data, segments, origins)
            missing = _MISSING.match(reason)
            if missing and (*as_in_file, missing.group("key")) in removed:
                pass  # caused by a removal below: not the user's error
            else:
                path = _path_text(as_in_file)
                issues.append(ConfigIssue(name, path, _explain(kind, path, reason)))
                if len(issues) >= MAX_ISSUES_PER_FILE:
                    break
            if not segments or not _remove(data, segments, origins):
                break
            removed.add(tuple(as_in_file))
    return None, issues


def _convert(raw: dict, kind: type[T]) -> T:
    """``msgspec.convert``; a big environments file a thousand environments at a time (one
    call of 10^5 holds the interpreter lock, and the event loop's thread, for 0.1-0.4 s)."""
    envs = raw.get("environments")
    if kind is not EnvironmentsFile or not isinstance(envs, dict) or len(envs) <= 1000:
        return msgspec.convert(raw, kind, strict=True)
    rest = msgspec.convert({**raw, "environments": {}}, EnvironmentsFile, strict=True)
    items = list(envs.items())
    converted: dict[str, Environment] = {}
    for start in range(0, len(items), 1000):
        converted.update(msgspec.convert(dict(items[start:start + 1000]),
                                         dict[str, Environment], strict=True))
    return msgspec.structs.replace(rest, environments=converted)  # type: ignore[return-value]


def _unshared(node: Any) -> Any:
    """A copy in which no mapping or list is shared: YAML anchors (``&a`` … ``*a``) make one
    object appear at two paths, and taking a key out at one must not take it out at both."""
    if isinstance(node, dict):
        return {k: _unshared(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unshared(v) for v in node]
    return node


def _as_in_file(data: Any, segments: list[Any], origins: dict[int, list[int]]) -> list[Any]:
    """A path in the copy, with list indices as they were in the file."""
    out: list[Any] = []
    node = data
    for key in segments:
        if isinstance(node, list) and isinstance(key, int):
            out.append(origins[id(node)][key] if id(node) in origins else key)
        else:
            out.append(key)
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    return out


def _path_text(segments: list[Any]) -> str:
    return "$" + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in segments)


def _failure(data: dict, kind: type, exc: msgspec.ValidationError) -> tuple[list[Any], str]:
    """The concrete key path (dict keys named, not msgspec's ``[...]``) and the reason."""
    path, reason, last = _split(exc)
    segments: list[Any] = []
    node: Any = data
    for match in _SEGMENT.finditer(path[1:]):
        if match.group(1) is not None:
            key: Any = match.group(1)
        elif match.group(0) != "[...]":
            key = int(match.group(0)[1:-1])
        else:  # a dict entry: find the failing one and follow its own error
            value_type = _type_at(kind, _path_text(segments) + "[...]")
            if not isinstance(node, dict) or value_type is None:
                return segments, reason
            for entry_key, entry in node.items():
                try:
                    msgspec.convert(entry, value_type, strict=True)
                except msgspec.ValidationError as inner:
                    sub, sub_reason = _failure(entry, value_type, inner)
                    return [*segments, entry_key, *sub], sub_reason
            return segments, reason
        segments.append(key)
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            node = None
    if last is _KEY_NOT_TEXT:  # name the first key of that mapping that is no string
        if isinstance(node, dict):
            bad = next((k for k in node if not isinstance(k, str)), None)
            if bad is not None:
                return [*segments, bad], "keys must be text (quote it)"
        return segments, reason
    if last is not None:  # an unknown key: one segment, whatever it holds (dots too)
        segments.append(last)
    return segments, reason


def _remove(data: Any, segments: list[Any], origins: dict[int, list[int]]) -> bool:
    node = data
    for key in segments[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return False
    try:
        del node[segments[-1]]
    except (KeyError, IndexError, TypeError):
        return False
    if isinstance(node, list):
        del origins.setdefault(id(node), list(range(len(node) + 1)))[segments[-1]]
    return True


_SEGMENT = re.compile(r"\.([^.\[]+)|\[[^\]]*\]")


def _type_at(kind: Any, path: str) -> Any:
    """The schema type at a key path (``$.store.tls.ca_file``, ``$.routes[0].kind``,
    ``$.environments.shop.plan``); None where it cannot be followed."""
    current: Any = kind
    for match in _SEGMENT.finditer(path[1:]):
        while get_origin(current) is Annotated:
            current = get_args(current)[0]
        origin = get_origin(current)
        if origin in (Union, UnionType):  # X | None: the struct
            current = next((a for a in get_args(current) if a is not type(None)), None)
            origin = get_origin(current)
        key = match.group(1)
        if origin is dict:
            current = get_args(current)[1]
        elif origin is tuple or origin is list:
            current = get_args(current)[0]
        elif key is not None and isinstance(current, type) and issubclass(current,
                                                                          msgspec.Struct):
            current = get_type_hints(current, include_extras=True).get(key)
        else:
            return None
        if current is None:
            return None
    while get_origin(current) is Annotated:
        current = get_args(current)[0]
    return current


def _explain(kind: Any, path: str, reason: str) -> str:
    """A misspelt key's nearest valid one; an enum's valid values."""
    if reason == "unknown key":
        parent, _, key = path.rpartition(".")
        owner = _type_at(kind, parent)
        if isinstance(owner, type) and issubclass(owner, msgspec.Struct):
            names = [f.encode_name for f in msgspec.structs.fields(owner)]
            near = difflib.get_close_matches(key, names, n=1, cutoff=0.6)
            if near:
                return f"unknown key (did you mean {near[0]!r}?)"
            return f"unknown key (valid here: {', '.join(names)})"
    if reason.startswith("Invalid enum value"):
        target = _type_at(kind, path)
        if get_origin(target) in (Union, UnionType):
            target = next((a for a in get_args(target) if get_origin(a) is Literal), target)
        if get_origin(target) is Literal:
            valid = ", ".join(repr(v) for v in get_args(target))
            return f"{reason} (one of: {valid})"
    return reason


_UNKNOWN_FIELD = re.compile(r"^Object contains unknown field `(?P<key>[^`]*)`$")


_AT_KEY = re.compile(r"^(?P<reason>.*?) - at `key` in `(?P<path>[^`]*)`$", re.S)
#: ``_split``'s last segment for a mapping with a key that is no string.
_KEY_NOT_TEXT = object()


def _split(exc: msgspec.ValidationError) -> tuple[str, str, Any]:
    """msgspec's path and reason, and a last segment to add to the path (an unknown key,
    which may hold dots; ``_KEY_NOT_TEXT``), else None."""
    text = str(exc)
    at_key = _AT_KEY.match(text)
    if at_key:
        return at_key.group("path"), at_key.group("reason"), _KEY_NOT_TEXT
    match = _MSGSPEC_PATH.match(text)
    assert match is not None
    path, reason = match.group("path") or "$", match.group("reason")
    unknown = _UNKNOWN_FIELD.match(reason)
    if unknown:  # name the unknown key itself in the path
        return path, "unknown key", unknown.group("key")
    return path, reason, None


#: Environments encoded per call while hashing them (``environments_digest``).
DIGEST_CHUNK = 1000
#: An environments file at least this big is parsed by a child process (``child.py``).
PARSE_ELSEWHERE_BYTES = 4 * 1024 * 1024
#: Longest a child may take to parse one file (then it is parsed here).
PARSE_ELSEWHERE_TIMEOUT_S = 900.0
#: A file read this soon after its last change is read again at the next load.
RACY_NS = 2_000_000_000

log = logging.getLogger("quotagate.config")


def environments_digest(envs: dict[str, Environment]) -> bytes:
    """SHA-256 of the environments, encoded ``DIGEST_CHUNK`` at a time: one
    ``msgspec.json.encode`` of 10^5 of them is a single C call that holds the interpreter
    lock 80-200 ms, in which the event loop's thread could not answer a request."""
    h = hashlib.sha256()
    items = list(envs.items())
    for start in range(0, len(items), DIGEST_CHUNK):
        h.update(msgspec.json.encode(items[start:start + DIGEST_CHUNK]))
    return h.digest()


@dataclass
class EnvFile:
    """One environments file as last parsed."""

    #: (mtime ns, ctime ns, size, inode, device) when it was read.
    stat: tuple[int, int, int, int, int]
    #: Its environments (None: it has shape errors, in ``issues``).
    envs: EnvironmentsFile | None
    issues: list[ConfigIssue]
    #: ``environments_digest`` of its environments.
    digest: bytes = b""
    #: The plans it was last checked against, and what that check found.
    checked: PlansFile | None = None
    check_issues: list[ConfigIssue] = field(default_factory=list)
    #: Parsed by a child process (a big file), not by this one.
    elsewhere: bool = False
    #: Read within ``RACY_NS`` of its last change: a write in the same clock tick would leave
    #: the stat as it was, so the next load compares its content (as git treats such files).
    racy: bool = False
    #: SHA-256 of the bytes parsed.
    content: bytes = b""
    #: Its environments' blocks of text (``split_blocks``) as id -> hash, when its layout
    #: allows a reload to parse only the blocks that changed (None: parsed whole).
    blocks: dict[str, int] | None = None


class ChildReply(msgspec.Struct):
    """What ``python -m quotagate.settings.child FILE`` writes (msgpack) on stdout."""

    #: (file, key path, reason) of each issue; none: ``chunks`` hold the environments.
    issues: list[tuple[str, str, str]]
    #: The environments, a msgpack map of up to a thousand each.
    chunks: list[bytes]
    #: ``environments_digest`` of them.
    digest: bytes


def _parse_elsewhere(path: Path, key: tuple[int, int, int, int, int], data: bytes
                     ) -> EnvFile | None:
    """``data`` (the bytes of ``path``) parsed by ``python -m quotagate.settings.child`` and
    handed back a thousand environments at a time: the parse's peak memory and CPU stay in
    the child. None (parse it here) if the child could not do it."""
    try:
        # -I: nothing from the working directory or PYTHON* variables comes into the child.
        out = subprocess.run([sys.executable, "-I", "-m", "quotagate.settings.child", str(path)],
                             capture_output=True, timeout=PARSE_ELSEWHERE_TIMEOUT_S,
                             check=False, input=data)
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("%s: parsed here, the child process could not (%s)", path, exc)
        return None
    if out.returncode != 0:
        log.warning("%s: parsed here, the child process failed (%s): %s", path,
                    out.returncode, out.stderr.decode(errors="replace")[-500:])
        return None
    try:
        reply = msgspec.msgpack.decode(out.stdout, type=ChildReply)
        if reply.issues:
            return EnvFile(key, None, [ConfigIssue(*i) for i in reply.issues], elsewhere=True)
        envs: dict[str, Environment] = {}
        for chunk in reply.chunks:
            envs.update(msgspec.msgpack.decode(chunk, type=dict[str, Environment]))
    except msgspec.DecodeError as exc:
        log.warning("%s: parsed here, the child's reply was unreadable (%s)", path, exc)
        return None
    return EnvFile(key, EnvironmentsFile(environments=envs), [], reply.digest, elsewhere=True)


#: A file's block of environments starts at a line ``environments:`` (after comments and
#: blank lines only: nothing else at the top level).
_ENVS_HEAD = re.compile(rb"(?:[ \t]*(?:#[^\r\n]*)?\r?\n)*environments:[ \t]*(?:#[^\r\n]*)?\r?\n")
#: A line of the block at an indentation of at most n (``%d``), not blank nor a comment:
#: an environment's first line — its id (as ``ENV_ID`` has it, unquoted) and a colon, at
#: exactly n (group 1) — or anything else (no group: a layout that is not split).
_SHALLOW = (rb"^(?: {%d}([a-z0-9][a-z0-9-]{0,62}):(?=[ \t\r\n]|$)"
            rb"| {0,%d}(?=[^ \r\n#]))")
#: Line breaks other than ``\n`` that YAML honours: a lone CR, NEL, LS, PS.
_LONE_CR = re.compile(rb"\r(?!\n)")
_OTHER_BREAKS = (b"\xc2\x85", b"\xe2\x80\xa8", b"\xe2\x80\xa9")


def _other_breaks(data: bytes) -> bool:
    """Whether YAML would end a line of ``data`` where a split on ``\n`` would not. (A
    search of each, not one regular expression: one scan of a 14 MB file by ``re`` held the
    interpreter lock, and the event loop with it, for 38 ms.)"""
    return (b"\r" in data and _LONE_CR.search(data) is not None) \
        or any(brk in data for brk in _OTHER_BREAKS)


#: A reparse of changed blocks only goes up to this many (more: the whole file, elsewhere).
REPARSE_MAX_BLOCKS = 2000


#: An environment's block of a file: (hash of its bytes, where they are: start and end in
#: the file for YAML, msgspec's ``Raw`` view of them for JSON).
Block = tuple[int, int, int] | tuple[int, msgspec.Raw]


def split_blocks(data: bytes) -> dict[str, Block] | None:
    """A YAML environments file laid out as operators write it — ``environments:`` and under
    it, each at one indentation, an unquoted id opening the block of its environment — as id
    -> (hash of the block's bytes, start, end), in file order, after "" for the text
    before the first id. None for anything else (flow
    style, anchors and aliases, tags, other top-level keys, an id given twice, tabs): those
    files are parsed whole every time. A block runs from its id's line to the next id's line:
    its value and the comments after it. (The hash is Python's, keyed per process: a block
    is compared only with the one this process read before.)"""
    head = _ENVS_HEAD.match(data)
    if head is None or b"&" in data or b"*" in data or b"!" in data:
        return None  # (anchors, aliases and tags could tie one block to another)
    if _other_breaks(data):
        return None  # (line breaks YAML sees and this split would not)
    start = head.end()
    first = re.compile(rb"^( *)(?=[^ \r\n#])", re.M).search(data, start)
    if first is None:
        return {"": (hash(data), 0, len(data))} if not data[start:].strip(b" \t\r\n") \
            else None
    n = len(first.group(1))
    if n == 0:
        return None
    marks = [(m.start(), m.group(1))
             for m in re.compile(_SHALLOW % (n, n), re.M).finditer(data, start)]
    if not marks or any(key is None for _, key in marks):
        return None  # another top-level key, a bad indentation, a quoted id: parsed whole
    ends = [at for at, _ in marks[1:]]
    ends.append(len(data))
    # "" (no id has it): what comes before the first id, which a reparse does not read —
    # changed, the file is parsed whole.
    blocks: dict[str, Block] = {"": (hash(data[:marks[0][0]]), 0, marks[0][0])}
    blocks.update((key.decode(), (hash(data[at:end]), at, end))
                  for (at, key), end in zip(marks, ends, strict=True))
    return blocks if len(blocks) == len(marks) + 1 else None  # (an id given twice)


_RAW_MEMBERS = msgspec.json.Decoder(dict[str, msgspec.Raw])
_JSON_SPACE = b" \t\r\n"
#: What a JSON environments file may hold before its object of environments.
_JSON_HEAD = re.compile(rb'[ \t\r\n]*\{[ \t\r\n]*"environments"[ \t\r\n]*:')
#: Bytes of a big piece of JSON looked at in one C call: the event loop's thread waits for the
#: interpreter lock no longer than one such call.
_INK_CHUNK = 1 << 20


def _ink(text: bytes | memoryview) -> int:
    """The bytes of a piece of JSON that are not white space (inside strings too)."""
    if len(text) <= _INK_CHUNK:
        return len(bytes(text).translate(None, _JSON_SPACE))
    view = memoryview(text)
    return sum(len(bytes(view[at:at + _INK_CHUNK]).translate(None, _JSON_SPACE))
               for at in range(0, len(view), _INK_CHUNK))


def split_json(data: bytes) -> dict[str, Block] | None:
    """A JSON environments file — one object whose only member is ``environments``, an
    object of environments — as id -> (hash of the value's bytes, the value as msgspec's
    ``Raw``: a view of them), in file order,
    after "" (nothing comes before the first id in JSON: a constant). None when anything
    could make a split differ from a whole parse: not JSON msgspec reads, another member, an
    id that is not a valid one as written (``ENV_ID``: nothing escaped), or a member given
    twice. A decoder keeps the last of a member given twice and says nothing, so the
    members' bytes are counted: the object's bytes that are not white space must be exactly
    its braces, the members' keys, colons and values, and the commas between them; a member
    given twice (or a key written with escapes) leaves more. (The hash is Python's, keyed
    per process, as ``split_blocks``'.)"""
    head = _JSON_HEAD.match(data)
    end = len(data)
    while end and data[end - 1] in _JSON_SPACE:
        end -= 1
    if head is None or end <= head.end() or data[end - 1] != ord("}"):
        return None
    inner = memoryview(data)[head.end():end - 1]  # (another member after it: not one value)
    try:
        members = _RAW_MEMBERS.decode(inner)
    except (msgspec.DecodeError, RecursionError):  # (nested too deep: the whole parse says so)
        return None
    blocks: dict[str, Block] = {"": (0, msgspec.Raw(b""))}
    ink = 2 + max(len(members) - 1, 0)
    for env_id, raw in members.items():
        if not ENV_ID.fullmatch(env_id):
            return None
        value = bytes(raw)  # (a copy of one value at a time, dropped at once)
        ink += len(env_id) + 3 + _ink(value)
        blocks[env_id] = (hash(value), raw)
    return blocks if ink == _ink(inner) else None


def _changed_yaml(data: bytes, name: str, changed: list[tuple[str, Block]]) -> dict | None:
    """The changed blocks of a YAML file (``data``), parsed alone under ``environments:``."""
    try:
        text = "environments:\n" + "".join(
            data[block[1]:block[2]].decode("utf-8") for _, block in changed
            if len(block) == 3)  # (always: split_blocks' (hash, start, end); for the types)
        with gc_paused():
            raw = _load(text)
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, KeyError, TypeError,
            AttributeError, RecursionError):
        return None
    return raw if isinstance(raw, dict) else None


def _changed_json(name: str, changed: list[tuple[str, Block]]) -> dict | None:
    """The changed environments of a JSON file, parsed alone as the whole file would be."""
    doc = b'{"environments":{' + b",".join(
        b'"' + env_id.encode() + b'":' + bytes(block[1]) for env_id, block in changed) + b"}}"
    raw, issues = _read_raw(Path(name), doc)
    return None if issues else raw


class EnvSources:
    """The environments files as last parsed, by path: a load parses again only a file whose
    stat (mtime and ctime in ns, size, inode, device) changed — or, read within ``RACY_NS`` of
    its change, whose content did — and checks it against the plans again only if it or the
    plans changed. A reload after one environment changed in a directory of
    many files then costs that file, not every environment (issue 24). Used by one load at a
    time (the reload lock)."""

    def __init__(self) -> None:
        self.files: dict[str, EnvFile] = {}
        #: Files parsed by the last load (the others were taken as they were).
        self.parsed: list[str] = []
        #: Of those, the files of which only the changed blocks were parsed -> how many.
        self.reparsed: dict[str, int] = {}

    def read(self, path: Path) -> EnvFile:
        """The file as parsed, from the last load if its stat is unchanged. Only a file that
        parsed without an issue is kept: one refused (or unreadable: a ``chmod`` changes no
        content) is read again at the next load."""
        name = str(path)
        try:
            st = path.stat()
        except OSError as exc:
            self.files.pop(name, None)
            return EnvFile((0, 0, 0, 0, 0), None,
                           [ConfigIssue(name, "$", f"cannot read: {exc.strerror}")])
        key = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_dev)
        hit = self.files.get(name)
        if hit is not None and hit.stat == key and not hit.racy:
            return hit
        # (Read after the stat: a write meanwhile shows at the next load.)
        try:
            data = path.read_bytes()
        except OSError as exc:
            self.files.pop(name, None)
            return EnvFile(key, None, [ConfigIssue(name, "$", f"cannot read: {exc.strerror}")])
        content = hashlib.sha256(data).digest()
        if hit is not None and content == hit.content:
            hit.stat = key  # (the same bytes: a touch, or a racy read compared again)
            hit.racy = time.time_ns() - st.st_mtime_ns < RACY_NS
            return hit
        json_file = path.suffix == ".json"
        blocks = split_json(data) if json_file else split_blocks(data)
        entry = None
        if blocks is not None and hit is not None:
            entry = self._reparse(name, key, hit, blocks, _changed_json if json_file
                                  else functools.partial(_changed_yaml, data))
        if entry is None:
            entry = self._parse(path, key, data, st.st_size)
            if (blocks is not None and entry.envs is not None
                    and list(blocks)[1:] == list(entry.envs.environments)):
                # (keyed by the environments' own id strings: not a second copy of each)
                entry.blocks = {"": blocks[""][0], **{
                    env_id: blocks[env_id][0] for env_id in entry.envs.environments}}
        entry.racy = time.time_ns() - st.st_mtime_ns < RACY_NS
        entry.content = content
        self.parsed.append(name)
        if entry.issues:
            self.files.pop(name, None)
        else:
            self.files[name] = entry
        return entry

    @staticmethod
    def _parse(path: Path, key: tuple[int, int, int, int, int], data: bytes, size: int
               ) -> EnvFile:
        """The whole file parsed: by a child process when it is big."""
        name = str(path)
        child = _parse_elsewhere(path, key, data) if size >= PARSE_ELSEWHERE_BYTES else None
        if child is not None:
            return child
        envs, issues = read_yaml(path, EnvironmentsFile, data)
        entry = EnvFile(key, None if issues else envs, issues)
        if entry.envs is not None:
            try:
                entry.digest = environments_digest(entry.envs.environments)
            except (UnicodeEncodeError, msgspec.EncodeError) as exc:
                entry = EnvFile(key, None, [ConfigIssue(name, "$", f"invalid text: {exc}")])
        return entry

    def _reparse(self, name: str, key: tuple[int, int, int, int, int], last: EnvFile,
                 blocks: dict[str, Block],
                 parse_changed: Callable[[str, list[tuple[str, Block]]], dict | None]
                 ) -> EnvFile | None:
        """The file as ``last`` with only the blocks that changed parsed (an edit of one
        environment in a file of 10^5 costs that environment, not the file): the others are
        the very objects parsed before. None — parse it whole — unless the changed blocks,
        parsed alone (``parse_changed``: the file's ``{"environments": ...}`` of them), are
        valid and hold exactly the ids that open them (a whole parse then names any issue
        where the file has it)."""
        if last.blocks is None or last.envs is None:
            return None
        if blocks[""][0] != last.blocks.get(""):
            return None  # the text before the first id changed: parsed whole
        changed = [(env_id, block) for env_id, block in blocks.items()
                   if env_id and last.blocks.get(env_id) != block[0]]
        if len(changed) > REPARSE_MAX_BLOCKS:
            return None
        got = EnvironmentsFile()
        if changed:
            raw = parse_changed(name, changed)
            if (not isinstance(raw, dict) or list(raw) != ["environments"]
                    or not isinstance(raw["environments"], dict)
                    or list(raw["environments"]) != [env_id for env_id, _ in changed]):
                return None
            converted, issues = convert_all(raw, EnvironmentsFile, name)
            if issues or converted is None:
                return None
            got = converted
        before, now = last.envs.environments, got.environments
        envs = {env_id: now[env_id] if env_id in now else before[env_id]
                for env_id in blocks if env_id}
        entry = EnvFile(key, EnvironmentsFile(environments=envs), [])
        try:
            entry.digest = environments_digest(envs)
        except (UnicodeEncodeError, msgspec.EncodeError):
            return None
        entry.blocks = {"": blocks[""][0], **{env_id: blocks[env_id][0] for env_id in envs}}
        if last.checked is not None and not last.check_issues:
            # Checked as before: only what changed is checked again (each environment's
            # check reads that environment and the plans only).
            entry.checked = last.checked
            entry.check_issues = check_environments(got, last.checked, name)
        self.reparsed[name] = len(changed)
        return entry

    def check(self, path: Path, entry: EnvFile, plans: PlansFile) -> list[ConfigIssue]:
        assert entry.envs is not None
        if entry.checked is None or not (entry.checked is plans or entry.checked == plans):
            entry.check_issues = check_environments(entry.envs, plans, str(path))
            entry.checked = plans
        return entry.check_issues

    def keep_only(self, paths: list[Path]) -> None:
        names = {str(p) for p in paths}
        for name in [n for n in self.files if n not in names]:
            del self.files[name]


def environment_files(directory: Path) -> list[Path]:
    """The environments files of ``environments_dir``, in name order: ``*.yaml``, ``*.yml``
    and ``*.json`` (parsed as JSON: many times faster than YAML), not hidden (an editor's
    ``.name.swp``, a ``.tmp`` being written)."""
    return sorted(p for p in directory.iterdir()
                  if p.suffix in (".yaml", ".yml", ".json") and not p.name.startswith(".")
                  and p.is_file())


@dataclass(frozen=True)
class DeclaredTokenRecord:
    """A token of ``tokens_file`` as the gateway keeps it: never the token itself."""

    id: str
    name: str
    role: str
    env: str | None
    #: SHA-256 of the token, hex.
    digest: str


def check_tokens(declared: TokensFile, file: str
                 ) -> tuple[tuple[DeclaredTokenRecord, ...], list[ConfigIssue]]:
    """The tokens of ``tokens_file``, and every issue: a name, an environment, a token or
    digest of the wrong shape, both or neither of them, an id or a token given twice."""
    records: list[DeclaredTokenRecord] = []
    issues: list[ConfigIssue] = []
    ids: dict[str, int] = {}
    digests: dict[str, int] = {}
    for i, t in enumerate(declared.tokens):
        where = f"$.tokens[{i}]"
        found = len(issues)
        if not NAME.fullmatch(t.name):
            issues.append(ConfigIssue(file, f"{where}.name",
                                      f"1 to {MAX_NAME} printable characters"))
        if t.role == "env":
            if t.env is None or not ENV_ID.fullmatch(t.env):
                issues.append(ConfigIssue(file, f"{where}.env", "an env token needs env, an "
                                          "environment id ([a-z0-9][a-z0-9-]{0,62})"))
        elif t.env is not None:
            issues.append(ConfigIssue(file, f"{where}.env",
                                      f"only an env token has an env (this one is {t.role})"))
        token_id, token_digest = t.id, t.sha256
        if t.token is not None:
            shape = TOKEN.fullmatch(t.token)
            if t.sha256 is not None or (t.id is not None and shape is not None
                                        and t.id != shape.group(1)):
                issues.append(ConfigIssue(file, where, "give token, or id and sha256, not "
                                          "both (the token names its id)"))
            elif shape is None:
                issues.append(ConfigIssue(file, f"{where}.token", "not a token: "
                                          "qg_<8 hex digits>_<43 base64url characters> "
                                          "(quotagate token create makes one)"))
            else:
                token_id = shape.group(1)
                token_digest = hashlib.sha256(t.token.encode()).hexdigest()
        elif t.id is None or t.sha256 is None:
            issues.append(ConfigIssue(file, where, "needs token, or id and sha256 (the hex "
                                      "SHA-256 of the token)"))
        else:
            if not TOKEN_ID.fullmatch(t.id):
                issues.append(ConfigIssue(file, f"{where}.id", "8 hex digits (as in "
                                          "qg_<id>_…)"))
            if not SHA256_HEX.fullmatch(t.sha256):
                issues.append(ConfigIssue(file, f"{where}.sha256",
                                          "64 lowercase hex digits (sha256sum of the token)"))
        if len(issues) > found or token_id is None or token_digest is None:
            continue
        for seen, value, what in ((ids, token_id, "id"), (digests, token_digest, "token")):
            if value in seen:
                issues.append(ConfigIssue(file, where, f"the same {what} as "
                                          f"$.tokens[{seen[value]}]"))
            seen.setdefault(value, i)
        records.append(DeclaredTokenRecord(token_id, t.name, t.role, t.env, token_digest))
    return tuple(records), issues


@dataclass(frozen=True)
class Config:
    """A validated, consistent set of the three files."""

    gateway: GatewaySettings
    plans: PlansFile
    environments: EnvironmentsFile
    base_dir: Path
    files: tuple[Path, ...] = field(default=())
    #: The environments files as parsed (for the next reload to reuse what did not change).
    sources: EnvSources | None = field(default=None, compare=False, repr=False)
    #: SHA-256 of the environments, file by file (``environments_digest``); empty: not
    #: worked out (``sync.file_digest`` then hashes them itself).
    env_digest: bytes = b""
    #: The admin API tokens ``tokens_file`` declares.
    tokens: tuple[DeclaredTokenRecord, ...] = ()

    def resolve(self, relative: str) -> Path:
        p = Path(relative)
        return p if p.is_absolute() else self.base_dir / p

    # What the running gateway asks of the file's environments again and again, derived once
    # (where the config is loaded: off the event loop) instead of walking every environment.

    @functools.cached_property
    def modes(self) -> dict[str, str]:
        """Environments with an enforcement mode of their own -> that mode."""
        return {env_id: env.mode for env_id, env in self.environments.environments.items()
                if env.mode is not None}

    @functools.cached_property
    def versioned(self) -> dict[str, Environment]:
        """Environments with a gateway version (bought, or held as a grant)."""
        return {env_id: env for env_id, env in self.environments.environments.items()
                if env.gateway is not None}


def valid_timezone(name: str) -> bool:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        return False
    return True


def check_gateway(gw: GatewaySettings, file: str) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    if not valid_timezone(gw.timezone):
        issues.append(ConfigIssue(file, "$.timezone", f"unknown time zone {gw.timezone!r}"))
    if gw.listen == gw.admin_listen:
        issues.append(
            ConfigIssue(file, "$.admin_listen", "must differ from listen (admin is never public)")
        )
    listeners = {"listen": gw.listen, "admin_listen": gw.admin_listen}
    if gw.authz_listen:
        listeners["authz_listen"] = gw.authz_listen
    if gw.authz.grpc_listen:
        listeners["authz.grpc_listen"] = gw.authz.grpc_listen
    taken: dict[str, str] = {}
    for key, address in listeners.items():
        port = int(address.rsplit(":", 1)[1])
        if port > 65535:
            issues.append(ConfigIssue(file, f"$.{key}", f"port {port} is out of range"))
        if address in taken and key != "admin_listen":  # (that one is said above)
            issues.append(ConfigIssue(file, f"$.{key}", f"must differ from {taken[address]}"))
        taken.setdefault(address, key)
    if gw.store.url:
        scheme = urlsplit(gw.store.url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            issues.append(
                ConfigIssue(
                    file, "$.store.url", f"scheme {scheme!r} is not redis://, rediss:// or unix://"
                )
            )
        else:
            try:
                StoreAddress.from_url(gw.store.url)
            except ValueError as exc:
                issues.append(ConfigIssue(file, "$.store.url", f"not a store URL: {exc}"))
    tls = gw.store.tls
    given = [(k, v) for k, v in (("ca_file", tls.ca_file), ("cert_file", tls.cert_file),
                                 ("key_file", tls.key_file)) if v]
    if given and not gw.store.url.startswith("rediss://"):
        issues.append(ConfigIssue(file, f"$.store.tls.{given[0][0]}",
                                  "TLS files need a rediss:// store.url"))
    if tls.key_file and not tls.cert_file:
        issues.append(ConfigIssue(file, "$.store.tls.key_file", "a key needs its cert_file"))
    base = Path(file).parent
    for key, value in given:
        path = Path(value) if Path(value).is_absolute() else base / value
        if not path.is_file():
            issues.append(ConfigIssue(file, f"$.store.tls.{key}", f"no such file: {path}"))
    if 0 < gw.clients.grpc_idle_timeout_ms < 1000:
        issues.append(ConfigIssue(file, "$.clients.grpc_idle_timeout_ms",
                                  "must be 0 (header_timeout_ms) or at least 1000"))
    if gw.leases.renew_interval_ms * 2 > gw.leases.ttl_ms:
        issues.append(ConfigIssue(file, "$.leases.renew_interval_ms",
                                  f"must be at most half of ttl_ms ({gw.leases.ttl_ms}), so one "
                                  "missed renewal does not lose the slots"))
    for i, env_id in enumerate(gw.metrics_envs):
        if not ENV_ID.fullmatch(env_id):
            issues.append(ConfigIssue(file, f"$.metrics_envs[{i}]",
                                      f"{env_id!r} is not an environment id"))
    if gw.events.webhook_url:
        hook = urlsplit(gw.events.webhook_url)
        if hook.scheme not in ("http", "https") or not hook.hostname:
            issues.append(ConfigIssue(file, "$.events.webhook_url",
                                      f"not an http(s) URL: {gw.events.webhook_url!r}"))
    for i, domain in enumerate((*gw.domains, *([gw.domain] if gw.domain else []))):
        key = f"$.domains[{i}]" if i < len(gw.domains) else "$.domain"
        if not re.fullmatch(r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9-]{2,63}",
                            domain):
            issues.append(ConfigIssue(file, key, f"{domain!r} is not a lower-case DNS domain "
                                      "(the part after {env}. in the host)"))
    seen: set[tuple[str, tuple[str, ...], str]] = set()
    for i, route in enumerate(gw.routes):
        where = f"$.routes[{i}]"
        up = urlsplit(route.upstream)
        try:
            port_ok = up.port is None or up.port > 0
        except ValueError:
            port_ok = False
        if up.scheme not in ("http", "https") or not up.hostname or not port_ok:
            issues.append(
                ConfigIssue(file, f"{where}.upstream", f"not an http(s) URL: {route.upstream!r}")
            )
        elif up.query or up.fragment:
            issues.append(ConfigIssue(file, f"{where}.upstream",
                                      "an upstream URL takes no query or fragment"))
        if route.kind != "action" and route.max_body_bytes != 6 * 1024 * 1024:
            issues.append(ConfigIssue(file, f"{where}.max_body_bytes",
                                      "only action routes take this key"))
        if route.kind != "action" and route.pass_while_isolated:
            issues.append(ConfigIssue(file, f"{where}.pass_while_isolated",
                                      "only action routes take this key (it names actions)"))
        realtime_only = [k for k, default in (("strict", False), ("realtime_unit", "watch"),
                                              ("login_timeout_ms", 10_000))
                         if getattr(route, k) != default]
        if route.kind != "realtime" and realtime_only:
            issues.append(ConfigIssue(file, f"{where}.{realtime_only[0]}",
                                      "only realtime routes take this key"))
        if route.stream_cost is not None:
            if route.kind in ("realtime", "action", "sms"):
                issues.append(ConfigIssue(file, f"{where}.stream_cost",
                                          f"{route.kind} routes have no stream pricing"))
            elif route.stream_cost < route.cost:
                issues.append(ConfigIssue(file, f"{where}.stream_cost",
                                          f"{route.stream_cost} is below the route's cost "
                                          f"({route.cost}): a stream never costs less"))
        if route.kind == "realtime" and route.preflight != "free":
            issues.append(ConfigIssue(file, f"{where}.preflight",
                                      "realtime routes take no preflight key"))
        if route.stream_probe_bytes != 1024 * 1024 and (
                route.stream_cost is None and route.kind != "ai"):
            issues.append(ConfigIssue(file, f"{where}.stream_probe_bytes",
                                      "only routes with stream pricing (ai, or stream_cost) "
                                      "take this key"))
        if route.kind != "function" and not route.concurrency:
            issues.append(ConfigIssue(file, f"{where}.concurrency",
                                      "only function routes take this key"))
        for method in route.methods:
            if not re.fullmatch(r"[A-Z]+", method):
                issues.append(
                    ConfigIssue(file, f"{where}.methods", f"method {method!r} is not upper-case")
                )
        ident = (route.prefix, tuple(sorted(route.methods)), route.accept)
        if ident in seen:
            issues.append(
                ConfigIssue(file, f"{where}.prefix", f"duplicate route for {route.prefix!r}")
            )
        seen.add(ident)
    return issues


def check_plans(plans: PlansFile, file: str) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    if not plans.plans:
        issues.append(ConfigIssue(file, "$.plans", "at least one plan is required"))
    for name in plans.plans:
        if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
            issues.append(ConfigIssue(file, f"$.plans.{name}", "plan ids are [a-z0-9_]{1,32}"))
    for meter in PAYG_METERS:  # overage bills them: no price would bill 0.00, silently
        if meter not in plans.payg_prices:
            issues.append(ConfigIssue(
                file, f"$.payg_prices.{meter}",
                "missing: usage beyond plan and packs goes to pay-as-you-go and needs a list "
                "price"))
    for meter in plans.payg_prices:
        if meter not in PAYG_METERS:
            issues.append(ConfigIssue(file, f"$.payg_prices.{meter}",
                                      f"not a pay-as-you-go meter ({', '.join(PAYG_METERS)})"))
    for name in plans.gateway_versions:
        if not re.fullmatch(r"[a-z0-9_]{1,32}", name):
            issues.append(ConfigIssue(file, f"$.gateway_versions.{name}",
                                      "gateway version ids are [a-z0-9_]{1,32}"))
    return issues


def check_environments(
    envs: EnvironmentsFile, plans: PlansFile, file: str
) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    for env_id, env in envs.environments.items():
        where = f"$.environments.{env_id}"
        if not ENV_ID.fullmatch(env_id):
            issues.append(ConfigIssue(
                file, where, f"{env_id!r} is not an environment id ([a-z0-9][a-z0-9-]{{0,62}})"))
            continue
        plan = plans.plans.get(env.plan)
        if plan is None:
            issues.append(
                ConfigIssue(
                    file,
                    f"{where}.plan",
                    f"unknown plan {env.plan!r} (plans: {', '.join(sorted(plans.plans))})",
                )
            )
            continue
        if plan.qps is None and env.limits.qps is None:
            issues.append(
                ConfigIssue(
                    file, f"{where}.limits.qps", f"plan {env.plan!r} has no QPS: set it per env"
                )
            )
        if not (env.anchor >= MIN_DATE and env.expires <= MAX_DATE):
            issues.append(ConfigIssue(
                file, where, f"anchor and expires must lie between {MIN_DATE} and {MAX_DATE}"))
            continue
        if env.expires <= env.anchor:
            issues.append(ConfigIssue(file, f"{where}.expires", "must be after anchor"))
        elif env.expires > add_months_clamped(env.anchor, 12 * MAX_PLAN_YEARS):
            issues.append(ConfigIssue(
                file, f"{where}.expires",
                f"at most {MAX_PLAN_YEARS} years after anchor (renew longer contracts)"))
        for name in env.functions:
            if not re.fullmatch(FUNCTION_NAME, name):
                issues.append(ConfigIssue(file, f"{where}.functions", f"{name!r} is not a "
                                          "function name ([A-Za-z0-9][A-Za-z0-9_.-]{0,127})"))
        if env.timezone is not None and not valid_timezone(env.timezone):
            issues.append(
                ConfigIssue(file, f"{where}.timezone", f"unknown time zone {env.timezone!r}")
            )
        if env.packs and not plan.packs_allowed:
            issues.append(
                ConfigIssue(
                    file, f"{where}.packs", f"plan {env.plan!r} cannot buy resource packs"
                )
            )
        pack_ids: set[str] = set()
        for i, grant in enumerate(env.packs):
            pw = f"{where}.packs[{i}]"
            if grant.id in pack_ids:
                issues.append(ConfigIssue(file, f"{pw}.id", f"duplicate pack id {grant.id!r}"))
            pack_ids.add(grant.id)
            if grant.pack:
                if grant.pack not in plans.resource_packs:
                    issues.append(
                        ConfigIssue(file, f"{pw}.pack", f"unknown resource pack {grant.pack!r}")
                    )
                if grant.meter is not None or grant.amount is not None:
                    issues.append(
                        ConfigIssue(file, pw, "give either pack, or meter and amount, not both")
                    )
            elif grant.meter is None or grant.amount is None:
                issues.append(ConfigIssue(file, pw, "needs pack, or meter and amount"))
        promo_ids: set[str] = set()
        for i, promo in enumerate(env.promos):
            pw = f"{where}.promos[{i}]"
            if promo.id in promo_ids:
                issues.append(ConfigIssue(file, f"{pw}.id", f"duplicate promo id {promo.id!r}"))
            promo_ids.add(promo.id)
            if promo.pack not in plans.promo_packs:
                issues.append(
                    ConfigIssue(file, f"{pw}.pack", f"unknown promo pack {promo.pack!r}")
                )
        if env.gateway is not None:
            issues += check_gateway_grant(env.gateway, plans, file, f"{where}.gateway")
    return issues


def check_gateway_grant(grant: GatewayGrant, plans: PlansFile, file: str, where: str
                        ) -> list[ConfigIssue]:
    issues: list[ConfigIssue] = []
    if grant.version not in plans.gateway_versions:
        known = ", ".join(plans.gateway_versions) or "none in plans.yaml"
        issues.append(ConfigIssue(file, f"{where}.version",
                                  f"unknown gateway version {grant.version!r} ({known})"))
    if not MIN_DATE <= grant.purchased <= MAX_DATE:
        issues.append(ConfigIssue(file, f"{where}.purchased",
                                  f"must lie between {MIN_DATE} and {MAX_DATE}"))
    if grant.renew_months is not None and grant.renew_months not in GATEWAY_TERMS:
        issues.append(ConfigIssue(
            file, f"{where}.renew_months",
            f"{grant.renew_months} is not a term sold ({', '.join(map(str, GATEWAY_TERMS))})"))
    return issues


def load_config(gateway_file: str | Path, sources: EnvSources | None = None) -> Config:
    """Load gateway.yaml and the plans and environments files it names; all or nothing.
    Every shape error of every file is reported, and a gateway.yaml with some is still
    followed to the files it names. ``sources``: the environments files as a previous load
    parsed them (a reload's): those unchanged since are not parsed again."""
    sources = sources if sources is not None else EnvSources()
    sources.parsed = []
    sources.reparsed = {}
    gw_path = Path(gateway_file)
    gw, issues = read_yaml(gw_path, GatewaySettings)
    if gw is None:
        raise ConfigError(issues)
    # The checks that read a whole file run on files without shape errors only: what is left
    # of the others after their errors would give positions and defaults that are not the
    # user's. A file key that had an error itself is not followed (its default is no choice).
    broken = {i.path.split("[", 1)[0] for i in issues}
    if not issues:
        issues += check_gateway(gw, str(gw_path))
    base = gw_path.parent
    plans_path, envs_path = base / gw.plans_file, base / gw.environments_file  # abs stays abs
    plans: PlansFile | None = None
    follow = {key: path for key, path in (("plans_file", plans_path),
                                             ("environments_file", envs_path))
              if f"$.{key}" not in broken}
    for key, path in follow.items():
        if not path.is_file():
            issues.append(ConfigIssue(str(gw_path), f"$.{key}", f"no such file: {path}"))
    if "plans_file" in follow and plans_path.is_file():
        plans, plan_issues = read_yaml(plans_path, PlansFile)
        if plans is not None and not plan_issues:
            plan_issues += check_plans(plans, str(plans_path))
        # Environments are checked against whole plans only (not "unknown plan" for each
        # environment of a plan that had an error of its own).
        plans = plans if not plan_issues else None
        issues += plan_issues
    env_paths: list[Path] = []
    if "environments_file" in follow and envs_path.is_file():
        env_paths.append(envs_path)
    watched: list[Path] = []
    if gw.environments_dir is not None and "$.environments_dir" not in broken:
        env_dir = base / gw.environments_dir
        if env_dir.is_dir():
            watched.append(env_dir)  # (a file added or removed changes its mtime)
            try:
                listed = environment_files(env_dir)
            except OSError as exc:
                listed = []
                issues.append(ConfigIssue(str(gw_path), "$.environments_dir",
                                          f"cannot list {env_dir}: {exc.strerror}"))
            own = {p.resolve() for p in (gw_path, plans_path, envs_path)}
            overlap = [p for p in listed if p.resolve() in own]
            if overlap:
                issues.append(ConfigIssue(
                    str(gw_path), "$.environments_dir", f"{env_dir} holds {overlap[0].name}, "
                    "one of the config's own files: give the environments their own "
                    "directory"))
            env_paths += [p for p in listed if p.resolve() not in own]
        else:
            issues.append(ConfigIssue(str(gw_path), "$.environments_dir",
                                      f"no such directory: {env_dir}"))
    tokens: tuple[DeclaredTokenRecord, ...] = ()
    tokens_path: Path | None = None
    if gw.tokens_file and "$.tokens_file" not in broken:
        tokens_path = base / gw.tokens_file
        declared, token_issues = read_yaml(tokens_path, TokensFile)
        if declared is not None and not token_issues:
            tokens, token_issues = check_tokens(declared, str(tokens_path))
        issues += token_issues
    entries = [(path, sources.read(path)) for path in env_paths]
    sources.keep_only(env_paths)
    for _, entry in entries:
        issues += entry.issues
    envs: EnvironmentsFile | None = None
    if (plans is not None and env_paths and env_paths[0] == envs_path
            and "environments_file" in follow and all(not e.issues for _, e in entries)):
        for path, entry in entries:
            issues += sources.check(path, entry, plans)
        envs, merge_issues = _merged(entries)
        issues += merge_issues
    if issues:
        raise ConfigError(issues)
    assert plans is not None and envs is not None
    digest = hashlib.sha256()
    for _, entry in entries:
        digest.update(entry.digest)
    return Config(gw, plans, envs, base, (gw_path, plans_path, envs_path, *watched,
                                          *env_paths[1:],
                                          *([tokens_path] if tokens_path else [])),
                  sources, digest.digest(), tokens)


def _merged(entries: list[tuple[Path, EnvFile]]) -> tuple[EnvironmentsFile, list[ConfigIssue]]:
    """The environments of every file as one (the first file's own object when it is the only
    one); an id declared by two files is an issue naming both."""
    files = [(path, entry.envs) for path, entry in entries if entry.envs is not None]
    if len(files) == 1:
        return files[0][1], []
    merged: dict[str, Environment] = {}
    issues: list[ConfigIssue] = []
    for i, (path, envs) in enumerate(files):
        declared = envs.environments
        if not merged.keys().isdisjoint(declared):  # (rare: then find who declared each)
            for env_id in sorted(declared.keys() & merged.keys()):
                owner = next(p for p, e in files[:i] if env_id in e.environments)
                issues.append(ConfigIssue(str(path), f"$.environments.{env_id}",
                                          f"declared already in {owner}"))
            declared = {k: v for k, v in declared.items() if k not in merged}
        merged.update(declared)
    return EnvironmentsFile(environments=merged), issues


def check_files(paths: list[str]) -> list[ConfigIssue]:
    """``quotagate config check``: validate each file by its shape (guessed from its keys)."""
    issues: list[ConfigIssue] = []
    for name in paths:
        path = Path(name)
        head, read_issues = _read_raw(path)
        if head is None and any(i.reason.startswith("cannot read") for i in read_issues):
            issues += read_issues
            continue
        if isinstance(head, dict) and "plans" in head:
            plans, plan_issues = convert_all(head, PlansFile, name)
            issues += plan_issues or check_plans(plans, name)  # type: ignore[arg-type]
        elif isinstance(head, dict) and "environments" in head:
            envs, env_issues = convert_all(head, EnvironmentsFile, name)
            if env_issues:
                issues += env_issues
                continue
            assert envs is not None
            plans_path = path.parent / "plans.yaml"
            if not plans_path.exists():
                issues.append(ConfigIssue(
                    name, "$", "no plans.yaml beside it to check plans and packs against: "
                    "check the gateway.yaml that names both instead"))
                continue
            try:
                issues += check_environments(envs, parse_yaml(plans_path, PlansFile), name)
            except ConfigError as exc:
                issues += exc.issues
        else:
            try:
                load_config(path)
            except ConfigError as exc:
                issues += exc.issues
    return issues
