"""The layering of docs/architecture.md, checked on the source tree.

Pure cores (``vfdirect.core``) import only the standard library's IO-free modules and
other core modules: no sockets, files, mmap, threads, subprocesses or clock reads. The
check reads every module's imports with :mod:`ast`, so it also covers code paths no
other test executes.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "vfdirect"

#: Standard-library modules a pure core must not import: each of them reaches the
#: operating system (IO, processes, threads, the clock) or brings nondeterminism.
FORBIDDEN_IN_CORE = {
    "asyncio", "datetime", "fcntl", "io", "mmap", "multiprocessing", "os", "pathlib",
    "random", "secrets", "select", "selectors", "shutil", "signal", "socket", "ssl",
    "subprocess", "tempfile", "threading", "time", "uuid",
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def _core_modules() -> list[Path]:
    return sorted((SRC / "core").rglob("*.py"))


def test_core_package_exists() -> None:
    assert _core_modules(), "vfdirect.core has no modules"


@pytest.mark.parametrize("path", _core_modules(), ids=lambda p: str(p.relative_to(SRC)))
def test_core_module_is_pure(path: Path) -> None:
    bad = []
    for lineno, name in _imports(path):
        top = name.split(".")[0]
        if top == "vfdirect":
            if not (name == "vfdirect.core" or name.startswith("vfdirect.core.")):
                bad.append(f"{lineno}: {name} (a core imports only other cores)")
        elif top in FORBIDDEN_IN_CORE:
            bad.append(f"{lineno}: {name} (IO, threads, clock or randomness)")
        elif top not in sys.stdlib_module_names and top != "__future__":
            bad.append(f"{lineno}: {name} (third-party import in a pure core)")
    assert not bad, f"{path.relative_to(SRC)} breaks the core rules:\n" + "\n".join(bad)


def test_storage_does_not_import_cli() -> None:
    for path in sorted((SRC / "storage").rglob("*.py")):
        for lineno, name in _imports(path):
            assert not name.startswith("vfdirect.cli"), f"{path}:{lineno} imports {name}"
