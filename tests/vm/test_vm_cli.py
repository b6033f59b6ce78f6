"""``vfdirect vm-run`` as a click command: its options, and a firmware table file that
is checked before it reaches guest memory."""

from __future__ import annotations

import json
from pathlib import Path

import click
from click.testing import CliRunner

from vfdirect.cli.vm_run import vm_run
from vfdirect.core.guest.fwtable import FirmwareTable, encode_fwtable


def group() -> click.Group:
    @click.group()
    def cli() -> None:
        pass

    cli.add_command(vm_run)  # how cli/main.py registers it
    return cli


def test_help_lists_the_options() -> None:
    result = CliRunner().invoke(group(), ["vm-run", "--help"])
    assert result.exit_code == 0
    for option in ("--memory-file", "--memory-size", "--socket", "--fwtable", "--workload",
                   "--restart", "--paused", "--command-timeout", "--spin-us"):
        assert option in result.output
    assert "idle|selftest|sequence" in result.output


def test_a_malformed_fwtable_file_is_a_usage_error(tmp_path: Path) -> None:
    bad = tmp_path / "fw.json"
    bad.write_text(json.dumps({"format": "vfdirect.fwtable", "vm": {"name": "x"}}))
    result = CliRunner().invoke(group(), ["vm-run", "--memory-file", str(tmp_path / "m"),
                                          "--fwtable", str(bad)])
    assert result.exit_code == 2 and "--fwtable" in result.output
    page = bytearray(encode_fwtable(FirmwareTable("vm0", "id")))
    page[-1] ^= 1
    (tmp_path / "fw.bin").write_bytes(bytes(page))
    result = CliRunner().invoke(group(), ["vm-run", "--memory-file", str(tmp_path / "m"),
                                          "--fwtable", str(tmp_path / "fw.bin")])
    assert result.exit_code == 2 and "CRC" in result.output
    assert not (tmp_path / "m").exists()
