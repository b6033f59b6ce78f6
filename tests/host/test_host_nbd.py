"""``vfdirect vm export`` end to end: the host records the export in the VM's spec, the
VM process serves it through its VF (a standard client reads and writes it), a running
VM picks up new exports at once (SIGHUP), and a restarted VM serves them again."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from host_helpers import ARRAY_WWN, Host

from vfdirect.storage import StorageArray

A = ARRAY_WWN.canonical()
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="vfnbd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw", uri]
    for c in commands:
        args += ["-c", c]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "verification failed" not in done.stdout, \
        done.stdout + done.stderr
    return done.stdout


def test_vm_export_through_the_host(host: Host, san: StorageArray, sockdir: Path) -> None:
    if shutil.which("qemu-io") is None or shutil.which("nbdinfo") is None:
        pytest.skip("qemu-io or nbdinfo missing")
    h = host
    h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--chunk-blocks", "64")
    h.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "4096")
    h.cli("vm", "create", "vm1", "--memory", "16MiB")
    h.cli("vm", "attach", "vm1", "d1")
    path = sockdir / "sda.sock"
    # recorded on a defined VM, served once it starts
    made = h.cli_json("vm", "export", "vm1", "sda", "--unix", str(path))
    assert made["address"] == f"unix:{path}" and made["name"] is None
    spec = json.loads((h.run_dir / "vms" / "vm1" / "spec.json").read_text())
    assert spec["exports"] == [{"disk": "sda", "unix": str(path)}]
    bad = h.cli("vm", "export", "vm1", "sda", check=False)
    assert bad.returncode != 0 and bad.stderr.startswith("vfdirect: error: give one of")
    h.cli("vm", "start", "vm1")
    uri = f"nbd+unix:///sda?socket={path}"
    info = json.loads(subprocess.run(["nbdinfo", "--json", uri], capture_output=True,
                                     text=True, timeout=60, check=True).stdout)
    assert info["exports"][0]["export-size"] == 4096 * 512
    qemu_io(uri, "write -P 0x3c 0 1M", "read -P 0x3c 0 1M")
    # a running VM: a TCP export at once (the host signals the VM and waits for it)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    tcp = h.cli_json("vm", "export", "vm1", "0:0", "--port", str(port))
    assert tcp["name"] == "sda" and tcp["address"] == f"tcp:127.0.0.1:{port}"
    qemu_io(f"nbd://127.0.0.1:{port}/sda", "read -P 0x3c 0 1M")
    missing = h.cli("vm", "export", "vm1", "sdq", "--unix", str(sockdir / "q.sock"),
                    check=False)
    assert missing.returncode != 0 and "no disk sdq" in missing.stderr
    assert [e["disk"] for e in h.cli_json("vm", "show", "vm1")["exports"]] == ["sda", "0:0"]
    shown = h.cli("vm", "show", "vm1").stdout
    assert "NBD exports" in shown and f"unix:{path}" in shown
    # stopped and started again: the spec brings the exports back
    h.cli("vm", "stop", "vm1")
    assert not path.exists()
    h.cli("vm", "start", "vm1")
    qemu_io(uri, "read -P 0x3c 0 1M")
    qemu_io(f"nbd://127.0.0.1:{port}/sda", "read -P 0x3c 0 1M")
    # removed on the running VM: its socket goes away
    gone = h.cli_json("vm", "export", "vm1", "sda", "--remove")
    assert [g["address"] for g in gone] == [f"unix:{path}"]
    assert not path.exists()
    assert [e["disk"] for e in h.cli_json("vm", "show", "vm1")["exports"]] == ["0:0"]
    h.cli("vm", "stop", "vm1")
