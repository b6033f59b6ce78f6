"""Live migration between two real hosts (two ``vfdirect host`` daemons, each with its
own adapter, one shared inventory, one SAN and fabric) under the ``verify`` workload:
claims B1-B7 and X1-X4 through the CLI and the API."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host, verify_result, wait_verify_progress

from vfdirect.adapter.pf_client import PfClient
from vfdirect.storage import StorageArray

A = ARRAY_WWN.canonical()
pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def cluster(tmp_path: Path, san: StorageArray, hosts: list[Host]) -> tuple[Host, Host]:
    db = str(tmp_path / "cluster.db")
    h1 = Host(tmp_path / "run1", "h1", arrays=(san.directory,), db=db)
    h2 = Host(tmp_path / "run2", "h2", arrays=(san.directory,), db=db)
    hosts += [h1, h2]
    h1.start()
    h2.start()
    h1.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
           "--chunk-blocks", "64")
    h1.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256")
    h1.cli("vdisk", "create", "d2", "--datastore", "ds0", "--blocks", "256")
    return h1, h2


def _start_verify_vm(h: Host, name: str = "vm1") -> dict[str, Any]:
    h.cli("vm", "create", name, "--workload", "verify")
    h.cli("vm", "attach", name, "d1")
    h.cli("vm", "attach", name, "d2")
    vm: dict[str, Any] = h.cli_json("vm", "start", name)
    wait_verify_progress(h, name)
    return vm


def _migrate(src: Host, dst: Host, name: str = "vm1", *extra: str) -> dict[str, Any]:
    shown: dict[str, Any] = src.cli_json("vm", "migrate", name, "--to", dst.name, *extra)
    return shown


def test_claim_B7_vm_moves_to_the_destination_and_continues_its_io(
        cluster: tuple[Host, Host]) -> None:
    h1, h2 = cluster
    vm = _start_verify_vm(h1)
    old_pid = int(vm["pid"])
    shown = _migrate(h1, h2)
    assert shown["outcome"] == "committed", shown
    report = shown["report"]
    # X4: every phase timed, the outstanding IO at quiesce counted
    phases = {name for name, _ in report["summary"]}
    assert {"prepare", "quiesce", "drain", "handoff", "mediated", "precopy", "stop_copy",
            "destination", "commit"} <= phases, phases
    assert report["downtime_ns"] > 0
    assert report["outstanding_at_quiesce"] is not None
    # B7: the destination's VF serves the VM; the source let go of everything
    on2 = h2.cli_json("vm", "show", "vm1")
    assert on2["vm"]["host"] == "h2" and on2["vm"]["state"] == "running"
    assert on2["vf_mapping"] is not None and on2["vf_mapping"] == on2["inventory_mapping"]
    assert not Path(f"/proc/{old_pid}").exists() or \
        "Z" in Path(f"/proc/{old_pid}/stat").read_text().rsplit(")", 1)[-1][:3]
    after = wait_verify_progress(h2, "vm1")
    assert after["errors"] == 0, after
    adapter1 = h1.cli_json("adapter", "show")
    assert all((v.get("vm") or {}).get("name") != "vm1" for v in adapter1.get("vfs", [])), \
        adapter1
    # the record is in the inventory and shown by vm show (X4)
    assert on2["migrations"][0]["id"] == shown["id"]
    h2.cli("vm", "stop", "vm1")
    result = verify_result(h2, "vm1")
    assert result["ok"] and result["errors"] == 0, result


def _port_name(h: Host, wwpn: str) -> str | None:
    """The name the vport is logged in with on ``h``'s adapter (None: not logged in)."""
    with PfClient(h.run_dir / "pf.sock") as pf:
        for vp in pf.adapter_dump().get("vports", []):
            if vp["wwpn"] == wwpn and vp.get("login"):
                return str(vp["login"]["port_name"])
    return None


def test_claim_X3_X4_vport_follows_the_vm_and_every_phase_is_reported(
        cluster: tuple[Host, Host]) -> None:
    h1, h2 = cluster
    _start_verify_vm(h1)
    port = h1.cli_json("vport", "list")[0]
    wwpn, alternate = port["wwpn"], port["alternate_wwpn"]
    assert alternate and _port_name(h1, wwpn) == wwpn
    shown = _migrate(h1, h2)
    assert shown["outcome"] == "committed", shown
    # X3: the destination logged the alternate WWPN in; the source logged out
    assert _port_name(h2, wwpn) == alternate
    assert _port_name(h1, wwpn) is None
    back = _migrate(h2, h1)
    assert back["outcome"] == "committed", back
    assert _port_name(h1, wwpn) == wwpn and _port_name(h2, wwpn) is None
    # X4: the record (CLI, API) times every phase and counts the IO in flight
    for rec in (shown, back):
        report = rec["report"]
        assert all(ms is not None and ms >= 0 for _, ms in report["summary"]), report
        assert report["guest_in_flight_at_handoff"] is not None
        assert report["precopy_rounds"] and report["bytes_sent"] >= 0
    api = h1.api("GET", f"/v1/migrations/{back['id']}")
    assert api["outcome"] == "committed" and api["report"]["downtime_ns"] > 0
    listed = h1.cli("vm", "show", "vm1").stdout
    assert shown["id"] in listed and back["id"] in listed
    # B2: the drain found nothing outstanding in the VF (it completes in order)
    assert back["report"]["drained"] is True
    h1.cli("vm", "stop", "vm1")
    result = verify_result(h1, "vm1")
    assert result["ok"] and result["errors"] == 0, result


def test_ping_pong_migrations_under_verify_lose_nothing(cluster: tuple[Host, Host]) -> None:
    h1, h2 = cluster
    _start_verify_vm(h1)
    count = int(os.environ.get("VFDIRECT_PINGPONG", "50"))
    pair = [(h1, h2), (h2, h1)]
    outstanding = []
    for i in range(count):
        src, dst = pair[i % 2]
        shown = _migrate(src, dst)
        assert shown["outcome"] == "committed", (i, shown)
        outstanding.append(shown["report"]["guest_in_flight_at_handoff"])
        wait_verify_progress(dst, "vm1")
    # IO was in flight when the VF was quiesced (asserted, not assumed)
    assert sum(outstanding) > 0, outstanding
    last = pair[(count - 1) % 2][1]
    last.cli("vm", "stop", "vm1")
    result = verify_result(last, "vm1")
    assert result["ok"] and result["errors"] == 0 and result.get("mismatches", 0) == 0, result
    print(f"{count} migrations; guest requests in flight at the hand-off: "
          f"{sum(outstanding)} total, max {max(outstanding)}")


def _fio(uri: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite", "--bs=4k",
         "--size=1M", "--iodepth=8", "--verify=crc32c", "--do_verify=1", "--randrepeat=1",
         "--verify_state_save=0", *extra], capture_output=True, text=True, timeout=180,
        check=False)


def test_nbd_export_serves_the_same_data_after_migration(
        cluster: tuple[Host, Host], tmp_path: Path) -> None:
    if shutil.which("fio") is None:
        pytest.skip("fio missing (./vfd.sh installs it)")
    h1, h2 = cluster
    sock = Path(tempfile.mkdtemp(prefix="vfmig-", dir="/tmp")) / "sda.sock"
    try:
        h1.cli("vm", "create", "vm1", "--memory", "16MiB")
        h1.cli("vm", "attach", "vm1", "d1")
        h1.cli("vm", "export", "vm1", "sda", "--unix", str(sock))
        h1.cli("vm", "start", "vm1")
        uri = f"nbd+unix:///sda?socket={sock}"
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert time.monotonic() < deadline, "the export never listened"
            time.sleep(0.1)
        written = _fio(uri)
        assert written.returncode == 0, written.stderr
        shown = _migrate(h1, h2)
        assert shown["outcome"] == "committed", shown
        # the destination's VM serves the export (it binds once the source let go)
        deadline = time.monotonic() + 30
        while True:
            verified = _fio(uri, "--verify_only")
            if verified.returncode == 0:
                break
            assert time.monotonic() < deadline, verified.stderr
            time.sleep(0.5)
        on2 = h2.cli_json("vm", "show", "vm1")
        assert on2["vm"]["host"] == "h2" and on2["exports"], on2
        h2.cli("vm", "stop", "vm1")
    finally:
        shutil.rmtree(sock.parent, ignore_errors=True)
