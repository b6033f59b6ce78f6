"""A VM created with the ``verify`` workload (``vm create --workload verify``, kept in
the VM's spec file) keeps doing verified IO while its host is killed with SIGKILL and
started again; the restarted host finds inventory and adapter in agreement, and the VM
stopped through the API (SIGTERM) reports 0 errors."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from host_helpers import ARRAY_WWN, Host, wait_gone

from vfdirect.adapter.pf_client import PfClient
from vfdirect.host.inventory import Inventory
from vfdirect.storage import StorageArray

A = ARRAY_WWN.canonical()


def _console(h: Host, name: str) -> list[dict[str, Any]]:
    out = []
    path = h.run_dir / "vms" / name / "console.log"
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    return out


def _progress(h: Host, name: str) -> dict[str, Any]:
    events = [e for e in _console(h, name) if e.get("event") == "verify_progress"]
    return events[-1] if events else {"writes": 0, "reads": 0, "verified": 0, "errors": 0}


def _wait_progress(h: Host, name: str, beyond: dict[str, Any],
                   timeout: float = 30.0) -> dict[str, Any]:
    """The VM's counters rose beyond ``beyond`` (writes and verified reads)."""
    deadline = time.monotonic() + timeout
    while True:
        now = _progress(h, name)
        if now["writes"] > beyond["writes"] and now["verified"] > beyond["verified"]:
            return now
        assert time.monotonic() < deadline, f"no progress beyond {beyond}: {now}"
        time.sleep(0.1)


def test_verify_workload_survives_a_kill9_of_its_host(tmp_path: Path, san: StorageArray,
                                                      hosts: list[Host]) -> None:
    h = Host(tmp_path / "run", arrays=(san.directory,))
    hosts.append(h)
    h.start()
    h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
          "--chunk-blocks", "64")
    h.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256")
    h.cli("vm", "create", "vm1", "--workload", "verify")
    h.cli("vm", "attach", "vm1", "d1")
    assert json.loads((h.run_dir / "vms" / "vm1" / "spec.json").read_text()) == {
        "workload": "verify"}
    vm = h.cli_json("vm", "start", "vm1")
    vf, vm_pid = int(vm["vf"]), int(vm["pid"])
    assert h.cli_json("vm", "show", "vm1")["workload"] == "verify"
    before = _wait_progress(h, "vm1", _progress(h, "vm1"))
    h.kill9()
    # the host is gone; the VM's IO goes on, verified
    assert Path(f"/proc/{vm_pid}").exists()
    during = _wait_progress(h, "vm1", before)
    assert during["errors"] == 0, during
    h.start()
    ready = [e for e in h.events() if e["event"] == "host_ready"][-1]
    assert ready["reconciled"]["vms_kept"] == ["vm1"]
    shown = h.cli_json("vm", "show", "vm1")
    assert (shown["vm"]["state"], shown["vm"]["pid"], shown["vm"]["vf"]) == (
        "running", vm_pid, vf)
    assert shown["vf_mapping"] is not None and shown["vf_mapping"] == \
        shown["inventory_mapping"]
    assert "matches the inventory" in h.cli("vm", "show", "vm1").stdout
    with Inventory.open(h.db) as inv:
        view = inv.vm_get("vm1")
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert pf.vf_get(vf)["vm"] == {"name": "vm1", "pid": view.pid}
    after = _wait_progress(h, "vm1", during)
    # stopped through the API (SIGTERM): drain, final read-back pass, result line
    assert h.api("POST", "/v1/vms/vm1/stop")["state"] == "stopped"
    assert wait_gone(vm_pid)
    results = [e for e in _console(h, "vm1") if e.get("workload") == "verify"]
    assert results, h.cli("vm", "console", "vm1").stdout[-4000:]
    result = results[-1]
    assert result["ok"] is True and result["errors"] == 0, result
    assert result["verified"] >= after["verified"] > 0 and result["stopped"] is True
    assert result["final_checked"] == result["final_lbas"] > 0
    assert result["journal"]["pending"] == 0 and result["journal"]["failed"] == 0
