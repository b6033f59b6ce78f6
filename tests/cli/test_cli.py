"""The vfdirect command as a user runs it: a real subprocess, its output and exit status."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vfdirect import __version__
from vfdirect.cli.common import parse_size


def vfdirect(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vfdirect", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_help_and_version() -> None:
    r = vfdirect("--help")
    assert r.returncode == 0
    assert "selfcheck" in r.stdout
    r = vfdirect("--version")
    assert r.returncode == 0
    assert __version__ in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["no-such-command"], "No such command"),
        (["selfcheck", "--size", "12qb"], "is not a size"),
        (["selfcheck", "--block-size", "1000"], "--block-size"),
        (["selfcheck", "--size", "1k"], "too small"),
        (["selfcheck", "--device", "/nonexistent/dev"], "does not exist"),
        (["selfcheck", "--bogus"], "No such option"),
    ],
)
def test_bad_input_is_one_line_and_nonzero(args: list[str], needle: str) -> None:
    r = vfdirect(*args)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("vfdirect: error: ")
    assert needle in lines[0]
    assert "Traceback" not in r.stderr


def test_selfcheck_json(tmp_path: Path) -> None:
    r = vfdirect("selfcheck", "--json", "--dir", str(tmp_path / "work"))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["ok"] is True
    names = {c["name"] for c in report["checks"]}
    assert {"REPORT LUNS", "WRITE(10) FUA + READ(10)", "IO after LUN masking revoked"} <= names
    assert all(c["ok"] for c in report["checks"])
    # The array stayed where it was asked to be, as a sparse file.
    assert (tmp_path / "work" / "array" / "array.json").exists()


def test_selfcheck_refuses_a_used_dir(tmp_path: Path) -> None:
    assert vfdirect("selfcheck", "--dir", str(tmp_path)).returncode == 0
    r = vfdirect("selfcheck", "--dir", str(tmp_path))
    assert r.returncode == 1
    assert "already holds an array" in r.stderr


@pytest.mark.parametrize(
    ("text", "value"),
    [("512", 512), ("4k", 4096), ("64MiB", 64 << 20), ("1GB", 10**9), (" 2 gib ", 2 << 30)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-1", "1.5G", "12qb", "MiB"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a size"):
        parse_size(text)
