"""Every shell example of docs/operations.md that can run on one machine, run as written.

The guide's ``sh`` blocks are run in order in one bash (``set -euo pipefail``), in a directory
laid out like the repository (``config/`` copied, ``.venv`` linked), with free ports in place of
8080, 9090 and 9001 in the blocks and the config alike. A block that cannot run here says why
in a ``<!-- not run: … -->`` comment just above it; ``<!-- run last -->`` (stopping the
gateway) moves a block to the end. Every fenced block names its language, so no shell example
hides in an untagged fence. Then what the guide says each step shows is checked in its output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from quotagate.limiter.embedded import free_port
from quotagate.limiter.scripts import LIBRARY_NAME
from tests.deployed import hold_the_day
from tests.helpers import ROOT

GUIDE = ROOT / "docs" / "operations.md"
PORTS = ("8080", "9090", "9001")


@dataclass
class Block:
    line: int
    language: str
    text: str
    directive: str  # "", "not run: …" or "run last"


def blocks(path: Path) -> list[Block]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        if not lines[i].startswith("```"):
            i += 1
            continue
        language = lines[i][3:].strip()
        start = i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i])
            i += 1
        i += 1
        # The HTML comment ending on the line just above the fence, if any.
        directive = ""
        if start > 0 and lines[start - 1].rstrip().endswith("-->"):
            j = start - 1
            while j > 0 and "<!--" not in lines[j]:
                j -= 1
            comment = " ".join(lines[j:start]).strip()
            directive = " ".join(comment.removeprefix("<!--").removesuffix("-->").split())
        found.append(Block(start + 1, language, "\n".join(body), directive))
    return found


def test_every_fence_names_its_language_and_every_skip_its_reason() -> None:
    found = blocks(GUIDE)
    untagged = [b.line for b in found if not b.language]
    assert untagged == [], f"fences without a language at lines {untagged}"
    for b in found:
        if b.language == "sh" and b.directive:
            assert b.directive == "run last" or re.fullmatch(r"not run: \S.{10,}", b.directive), (
                b.line, b.directive)
    assert sum(1 for b in found if b.language == "sh" and not b.directive.startswith("not run")
               ) >= 5


@pytest.mark.deployed
def test_the_operator_guide_runs_as_written(tmp_path: Path) -> None:
    hold_the_day()  # the walkthrough takes today's date in the gateway's zone
    runnable = [b for b in blocks(GUIDE) if b.language == "sh"
                and not b.directive.startswith("not run")]
    ordered = ([b for b in runnable if b.directive != "run last"]
               + [b for b in runnable if b.directive == "run last"])
    ports = {old: str(free_port()) for old in PORTS}

    def local(text: str) -> str:
        for old, new in ports.items():
            text = re.sub(rf"\b{old}\b", new, text)
        return text

    shutil.copytree(ROOT / "config", tmp_path / "config",
                    ignore=shutil.ignore_patterns("data", "*.log"))
    gateway = tmp_path / "config" / "gateway.yaml"
    gateway.write_text(local(gateway.read_text(encoding="utf-8")))
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    # On a failure, stop what the blocks started (they hold the output pipe open).
    script = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for n, b in enumerate(ordered):
        script += [f"printf '\\n### {n} (line {b.line})\\n'", local(b.text)]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("QUOTAGATE_", "VIRTUAL_ENV"))}
    # The CLI's default admin URL is http://127.0.0.1:9090: this one is elsewhere.
    env["QUOTAGATE_ADMIN_URL"] = f"http://127.0.0.1:{ports['9090']}"
    proc = subprocess.Popen(["bash", "-c", "\n".join(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"the guide's blocks did not finish:\n{out[-6000:]}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever a failed run left behind
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]
    parts = re.split(r"\n### \d+ \(line \d+\)\n", out)[1:]
    assert len(parts) == len(ordered), out[-3000:]
    step = {b.line: part for b, part in zip(ordered, parts, strict=True)}

    def at(fragment: str) -> str:
        """The output of the block whose text holds ``fragment``."""
        lines = [b.line for b in ordered if fragment in b.text]
        assert len(lines) == 1, fragment
        return step[lines[0]]

    started = at("quotagate serve --config config/gateway.yaml")
    assert re.search(r'"status": "ok", "version": "[^"]+"', started), started
    first = at("cat > shop-2.yaml")
    assert "shop-2: written (owned by api)" in first, first
    assert re.search(r'^RateLimit-Policy: "qps";q=5;w=1, "calls";q=8000000;', first,
                     re.I | re.M), first
    codes = re.search(r"^((?:\d{3} ){10})$", first, re.M)
    assert codes, first
    assert codes.group(1).split().count("429") >= 5, codes.group(1)  # 5 QPS, sent in ~0.1 s
    assert 'quotagate_requests_total{decision="qps-exceeded",kind="function",status="4xx"}' \
        in first
    access = json.loads(first.rstrip().splitlines()[-1])  # tail -n 1 gateway.log
    assert access["logger"] == "quotagate.access" and access["env"] == "shop-2", access
    store = at("FUNCTION LIST LIBRARYNAME")
    assert store.split().count(LIBRARY_NAME) == 2, store  # printed, and listed by the store
    cli = at("quotagate pack refund")
    assert re.search(r"^shop-2\s+api\s+standard", cli, re.M), cli
    assert "shop-2: overage on" in cli and "refunded" in cli, cli
    assert "upgrade to enterprise" in cli and "renewed, expires" in cli, cli
    assert cli.rstrip().splitlines()[-1].startswith("env,day,meter,quantity"), cli
    versions = at("quotagate gateway buy")
    assert "paid: 899.00 CNY" in versions and "paid: 10788.00 CNY" in versions, versions
    assert "renews itself by 12 month(s)" in versions, versions  # the last term bought
    assert re.search(r"^  in effect: test: 100 QPS, 1 Mbps$", versions, re.M), versions
    assert "250000 B in " in versions, versions
    events = at("XREADGROUP")
    assert "pack-purchased" in events and "pack-refunded" in events, events
    assert events.rstrip().splitlines()[-1] == "1", events  # XACK: one handled
