"""One big environments file (issue 24, item 2): a reload parses only the blocks of the
environments that changed (``split_blocks``), and what it yields is exactly what a whole
parse of the file yields — the same environments in the same order, the same digest, the
same issues — whatever the edit; anything it cannot split safely is parsed whole."""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from quotagate.limiter.sync import file_digest
from quotagate.settings import ConfigError, load_config
from quotagate.settings.load import EnvSources, split_blocks, split_json
from tests.helpers import env, write_config

BLOCK = """  {id}:{note}
    plan: {plan}
    anchor: 2026-01-01
    expires: 2027-01-01
    overage: {overage}
    limits:
      calls: {calls}
"""
FLOW = "  {id}: {{plan: {plan}, anchor: 2026-01-01, expires: 2027-01-01, overage: {overage}, " \
       "limits: {{calls: {calls}}}}}{note}\n"


def block(env_id: str, calls: int, style: str = "block", plan: str = "standard",
          overage: str = "false", note: str = "") -> str:
    return (BLOCK if style == "block" else FLOW).format(
        id=env_id, calls=calls, plan=plan, overage=overage, note=note)


def write(path: Path, text: str) -> None:
    """Written whole and moved in, dated a minute back (settled: see test_env_dir.put)."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    back = time.time() - 60 + random.random()
    os.utime(tmp, (back, back))
    os.replace(tmp, path)


def whole(gateway: Path) -> tuple[object, list[object]]:
    """What a first load (every file parsed whole) makes of the files as they are."""
    try:
        config = load_config(gateway, EnvSources())
    except ConfigError as exc:
        return None, exc.issues
    return config, []


def load(gateway: Path, sources: EnvSources) -> tuple[object, list[object]]:
    try:
        return load_config(gateway, sources), []
    except ConfigError as exc:
        return None, exc.issues


def same_as_whole(gateway: Path, sources: EnvSources, where: object) -> bool:
    """The files as they are, loaded by ``sources`` (after its earlier loads) and by a first
    load: the same issues, environments in the same order, and digest. Whether ``sources``
    parsed only changed blocks."""
    got, got_issues = load(gateway, sources)
    reparsed = bool(sources.reparsed)
    expected, issues = whole(gateway)
    assert [(i.path, i.reason) for i in got_issues] == [
        (i.path, i.reason) for i in issues], where
    if expected is not None:
        assert got is not None
        assert list(got.environments.environments) == list(expected.environments.environments)
        assert got.environments == expected.environments, where
        assert file_digest(got) == file_digest(expected), where
    return reparsed


@pytest.fixture
def gateway(tmp_path: Path) -> Path:
    write_config(tmp_path, {"main": env()})
    return tmp_path / "gateway.yaml"


IDS = [f"shop-{i}" for i in range(300)]


def edit_one(gateway: Path, path: Path, text: Callable[[int], str]) -> tuple[Any, Any]:
    """``path`` written with ``text(8)`` and loaded, then with ``text(999)`` (shop-7's calls)
    and loaded again by the same EnvSources: only that environment parsed, the others the
    very objects parsed before, and what a whole parse yields. The second load and the whole
    one."""
    write(path, text(8))
    sources = EnvSources()
    first = load_config(gateway, sources)
    assert sources.files[str(path)].blocks is not None  # laid out as blocks
    assert sources.reparsed == {}  # (the first load parses whole)
    write(path, text(999))
    changed = load_config(gateway, sources)
    assert sources.reparsed == {str(path): 1}
    got = changed.environments.environments
    assert got["shop-7"].limits.calls == 999
    # The others are the very objects parsed before.
    assert got["shop-8"] is first.environments.environments["shop-8"]
    expected, _ = whole(gateway)
    assert changed.environments == expected.environments
    assert file_digest(changed) == file_digest(expected)
    return changed, expected


def test_an_edit_parses_its_block_only_and_yields_the_whole_parse(gateway: Path) -> None:
    head = "# the platform's environments\n\nenvironments:   # one block each\n"
    changed, expected = edit_one(gateway, gateway.parent / "environments.yaml", lambda calls: (
        head + "".join(block(e, calls if e == "shop-7" else i + 1) for i, e in enumerate(IDS))))
    assert list(changed.environments.environments) == list(
        expected.environments.environments) == IDS


def test_random_edits_yield_what_a_whole_parse_yields(gateway: Path) -> None:
    """Seeded random edits — values, styles, comments, ids added, removed and moved, invalid
    values, layouts that cannot be split (anchors, another top-level key, quoted ids, an id
    given twice, tabs) — each loaded after the last by one EnvSources and compared with a
    first load of the same file: the same environments in the same order, digest and
    issues."""
    rng = random.Random(24)
    path = gateway.parent / "environments.yaml"
    rows: list[dict[str, object]] = [
        {"id": f"e{i}", "calls": i + 1, "style": rng.choice(["block", "flow"]), "note": ""}
        for i in range(40)]
    sources = EnvSources()
    kinds: dict[str, int] = {}
    reparsed = 0
    for step in range(120):
        kind = rng.choice(["value", "value", "style", "comment", "add", "remove", "move",
                           "invalid", "unsplittable", "fixed"])
        kinds[kind] = kinds.get(kind, 0) + 1
        extra = ""
        row = rng.choice(rows)
        if kind == "value":
            row["calls"] = rng.randrange(1, 10**6)
        elif kind == "style":
            row["style"] = "flow" if row["style"] == "block" else "block"
        elif kind == "comment":
            row["note"] = f"  # note {step}"
        elif kind == "add":
            rows.insert(rng.randrange(len(rows) + 1),
                        {"id": f"n{step}", "calls": step + 1, "style": "block", "note": ""})
        elif kind == "remove" and len(rows) > 5:
            rows.remove(row)
        elif kind == "move":
            rows.remove(row)
            rows.insert(rng.randrange(len(rows) + 1), row)
        elif kind == "invalid":
            row["calls"] = "many"
        text = "environments:\n" + "".join(
            block(str(r["id"]), r["calls"], str(r["style"]), note=str(r["note"]))
            for r in rows)
        if kind == "unsplittable":
            extra = rng.choice([
                "  anchored: &shared {plan: standard, anchor: 2026-01-01, "
                "expires: 2027-01-01}\n  aliased: *shared\n",
                '  "quoted-id": {plan: standard, anchor: 2026-01-01, expires: 2027-01-01}\n',
                f"  {rows[0]['id']}: {{plan: standard, anchor: 2026-01-01, "
                "expires: 2027-01-01}\n",  # given twice
                "\tbad-tab: {plan: standard}\n",
                "other: 1\n"])
            assert split_blocks((text + extra).encode()) is None
        if kind == "fixed":
            for r in rows:
                if not isinstance(r["calls"], int):
                    r["calls"] = 5
            text = "environments:\n" + "".join(
                block(str(r["id"]), r["calls"], str(r["style"]), note=str(r["note"]))
                for r in rows)
        write(path, text + extra)
        reparsed += same_as_whole(gateway, sources, (step, kind))
    assert reparsed > 25 and all(kinds.get(k) for k in ("unsplittable", "invalid", "move"))


def test_a_changed_block_that_does_not_parse_alone_is_parsed_whole(gateway: Path) -> None:
    """A flow mapping continued on a line at the ids' indentation, or a block left broken:
    the whole parse is the one that speaks, with the line of the file."""
    path = gateway.parent / "environments.yaml"
    rows = "".join(block(f"e{i}", i + 1) for i in range(10))
    write(path, "environments:\n" + rows)
    sources = EnvSources()
    load_config(gateway, sources)
    write(path, "environments:\n" + rows + "  late: {plan: standard,\n")
    _, issues = load(gateway, sources)
    assert sources.reparsed == {}
    _, expected = whole(gateway)
    assert issues == expected and "invalid YAML" in issues[0].reason
    assert issues[0].path.startswith("line ")


@pytest.mark.parametrize("hidden", ["\r", "\u2028", "\u0085"])
def test_what_comes_before_the_first_id_and_other_line_breaks(gateway: Path,
                                                               hidden: str) -> None:
    """YAML ends a line at a lone CR, NEL, LS or PS too, and the text before the first id
    belongs to no block: an environment hidden there, or a changed head, is parsed whole."""
    path = gateway.parent / "environments.yaml"
    rows = "".join(block(f"e{i}", i + 1) for i in range(5))
    write(path, "environments:\n" + rows)
    sources = EnvSources()
    load_config(gateway, sources)
    sneaked = ("environments:\n# note" + hidden
               + "  z: {plan: standard, anchor: 2026-01-01, expires: 2027-01-01}\n" + rows)
    write(path, sneaked)
    got, got_issues = load(gateway, sources)
    expected, issues = whole(gateway)
    assert sources.reparsed == {}
    assert got_issues == issues
    if expected is not None:
        assert list(got.environments.environments) == list(expected.environments.environments)
    write(path, "# a comment on top\nenvironments:\n" + rows)
    load(gateway, sources)
    assert sources.reparsed == {}  # (the head changed: parsed whole)


def test_random_edits_of_a_json_file_yield_what_a_whole_parse_yields(tmp_path: Path) -> None:
    """The same for a JSON environments file (``split_json``): values changed, ids added,
    removed and moved, pretty and compact layouts, invalid values — and what must be parsed
    whole: an id given twice (a decoder keeps the last and says nothing), an id written with
    escapes, an id that is not valid, another top-level member, NaN."""
    path = tmp_path / "environments.json"
    path.write_text('{"environments": {}}')
    write_config(tmp_path, {"main": env()}, environments_file="environments.json")
    gateway = tmp_path / "gateway.yaml"
    rng = random.Random(25)
    rows: list[dict[str, object]] = [{"id": f"e{i}", "calls": i + 1} for i in range(40)]
    sources = EnvSources()
    kinds: dict[str, int] = {}
    reparsed = 0

    def member(r: dict[str, object]) -> tuple[str, object]:
        return str(r["id"]), {"plan": "standard", "anchor": "2026-01-01",
                              "expires": "2027-01-01", "limits": {"calls": r["calls"]}}

    for step in range(120):
        kind = rng.choice(["value", "value", "add", "remove", "move", "layout", "invalid",
                           "unsplittable", "fixed"])
        kinds[kind] = kinds.get(kind, 0) + 1
        row = rng.choice(rows)
        if kind == "value":
            row["calls"] = rng.randrange(1, 10**6)
        elif kind == "add":
            rows.insert(rng.randrange(len(rows) + 1), {"id": f"n{step}", "calls": step + 1})
        elif kind == "remove" and len(rows) > 5:
            rows.remove(row)
        elif kind == "move":
            rows.remove(row)
            rows.insert(rng.randrange(len(rows) + 1), row)
        elif kind == "invalid":
            row["calls"] = "many"
        elif kind == "fixed":
            for r in rows:
                if not isinstance(r["calls"], int):
                    r["calls"] = 5
        indent = rng.choice([None, 2, 4])
        text = json.dumps({"environments": dict(member(r) for r in rows)}, indent=indent)
        if kind == "unsplittable":
            twice = json.dumps(dict([member(rows[0])]))[1:-1]
            text = rng.choice([
                text.replace('{"environments": {', '{"environments": {' + twice + ", ", 1)
                if indent is None else text.replace("{\n", "{\n" + twice + ",\n", 2),
                text.replace(f'"{rows[0]["id"]}"', '"\\u0065' + str(rows[0]["id"])[1:] + '"'),
                text.replace(f'"{rows[0]["id"]}"', '"Upper"'),
                text[:-1] + ', "other": 1}',
                text.replace(f'"calls": {rows[0]["calls"]}', '"calls": NaN'),
                text.replace(f'"calls": {rows[0]["calls"]}',
                             '"calls": ' + "[" * 3000 + "]" * 3000),  # nested too deep
            ])
            assert split_json(text.encode()) is None, text[:200]
        write(path, text)
        reparsed += same_as_whole(gateway, sources, (step, kind))
    assert reparsed > 25 and all(kinds.get(k) for k in ("unsplittable", "invalid", "move"))


def test_a_json_edit_parses_that_environment_only(tmp_path: Path) -> None:
    gateway, path = tmp_path / "gateway.yaml", tmp_path / "environments.json"
    path.write_text('{"environments": {}}')
    write_config(tmp_path, {"main": env()}, environments_file="environments.json")
    edit_one(gateway, path, lambda calls: json.dumps({"environments": {
        e: env(limits={"calls": calls if e == "shop-7" else i + 1})
        for i, e in enumerate(IDS)}}, indent=2))
