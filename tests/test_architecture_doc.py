"""docs/architecture.md keeps up with the code: every module under quotagate/ (each .py file
but ``__init__.py``, each .lua file, each package) is named there by its path relative to
quotagate/ (``gateway/plugin/rls.py``, ``gateway/plugin/``), and every path it names exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "quotagate"
DOC = ROOT / "docs" / "architecture.md"

#: A path the page may name: segments ending in a module (``.py``, ``.lua``, ``.binpb``) or a
#: directory (``/``), standing on its own (not inside a URL path like ``/admin/v1``).
_PATH = re.compile(r"(?<![\w./-])((?:[A-Za-z_][\w-]*/)*(?:[A-Za-z_][\w-]*\.(?:py|lua|binpb)"
                   r"|[A-Za-z_][\w-]*/))(?![\w./-])")


def modules() -> set[str]:
    """Every module and package under quotagate/, as the page must name it."""
    found: set[str] = set()
    for path in PACKAGE.rglob("*"):
        if "__pycache__" in path.parts:
            continue
        relative = path.relative_to(PACKAGE).as_posix()
        if path.is_dir() and (path / "__init__.py").is_file():
            found.add(relative + "/")
        elif path.suffix in (".py", ".lua") and path.name != "__init__.py":
            found.add(relative)
    return found


def named(text: str) -> set[str]:
    """The paths the page names, relative to quotagate/ (paths into the repository's other
    directories, ``tests/…``, ``third_party/…``, are not the code's and are left out)."""
    others = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name != "quotagate"}
    paths = set()
    for path in _PATH.findall(text):
        path = path.removeprefix("quotagate/")
        if path and path.split("/", 1)[0] not in others:
            paths.add(path)
    return paths


def test_every_module_is_named() -> None:
    missing = modules() - named(DOC.read_text())
    assert not missing, ("docs/architecture.md does not name these modules by their path "
                         f"relative to quotagate/ (add a line to its module map): "
                         f"{sorted(missing)}")


def test_every_named_module_exists() -> None:
    names = named(DOC.read_text())
    basenames = {p.name for p in PACKAGE.rglob("*") if p.is_file()}
    gone = set()
    for path in names:
        if "/" in path.rstrip("/"):  # a path: it must be there
            if not (PACKAGE / path).exists():
                gone.add(path)
        elif path.endswith("/"):  # a package: a directory of quotagate/
            if not (PACKAGE / path).is_dir():
                gone.add(path)
        elif not (PACKAGE / path).exists() and path not in basenames:
            gone.add(path)  # a short name (the diagram's ``handler.py``): some module's
    assert not gone, f"docs/architecture.md names modules that do not exist: {sorted(gone)}"


def test_the_check_sees_paths_as_the_page_writes_them() -> None:
    text = ("`gateway/plugin/rls.py` and `gateway/plugin/`, limiter/lua/decide.lua, "
            "quotagate/cli.py; not /admin/v1, tests/test_lint.py, "
            "envoy/service/ratelimit/v3/rls.proto")
    assert named(text) == {"gateway/plugin/rls.py", "gateway/plugin/",
                           "limiter/lua/decide.lua", "cli.py"}
