"""The adapter daemon's imports follow docs/architecture.md: vfdirect.core, vfdirect.storage,
the shared transports (guest memory files) and its own modules only (never the
hypervisor, the VM or the CLI: they speak over sockets)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "vfdirect"
ALLOWED = ("vfdirect.core", "vfdirect.storage", "vfdirect.adapter", "vfdirect.transport",
           "vfdirect.eventlog")


@pytest.mark.parametrize("path", sorted((SRC / "adapter").rglob("*.py")),
                         ids=lambda p: p.name)
def test_adapter_imports_only_cores_storage_and_itself(path: Path) -> None:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            if name.startswith("vfdirect"):
                assert name == "vfdirect" or name.startswith(ALLOWED), f"{path}: {name}"
