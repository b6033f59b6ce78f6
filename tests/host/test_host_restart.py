"""The host killed with SIGKILL and started again: the adapter and the VMs ran on
without it; the new host attaches to the same adapter, reconciles it with the inventory
(claim A9: everything it needs is in the inventory) and carries on. Also: a VM that died
while its host was down is found stopped and its VF released; SIGTERM stops everything."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host, pg_schema, wait_gone

from vfdirect.adapter.pf_client import PfClient
from vfdirect.host.inventory import Inventory
from vfdirect.storage import StorageArray

A = ARRAY_WWN.canonical()


def _running_vm(h: Host, name: str = "vm1") -> dict[str, Any]:
    h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
          "--chunk-blocks", "64")
    h.cli("vdisk", "create", f"{name}-d1", "--datastore", "ds0", "--blocks", "256")
    h.cli("vm", "create", name)
    h.cli("vm", "attach", name, f"{name}-d1")
    return dict(h.cli_json("vm", "start", name))


def _agree(h: Host, name: str, vf: int) -> None:
    """The inventory and the adapter say the same about the VM."""
    with Inventory.open(h.db) as inv:
        table = inv.vm_mapping_table(name)
        view = inv.vm_get(name)
    assert view.vf == vf and view.vport is not None
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        got = pf.vf_get(vf)
        assert got["vm"] == {"name": name, "pid": view.pid}
        assert got["vport"] == view.vport.canonical()
        assert pf.mapping_get(vf) == table


def test_kill9_host_restart_attaches_and_reconciles(tmp_path: Path, san: StorageArray,
                                                    hosts: list[Host]) -> None:
    h = Host(tmp_path / "run", arrays=(san.directory,))
    hosts.append(h)
    h.start()
    vm = _running_vm(h)
    vf, vm_pid, adapter_pid = int(vm["vf"]), int(vm["pid"]), h.adapter_pid
    h.kill9()
    # the adapter and the VM run on without their host
    assert Path(f"/proc/{adapter_pid}").exists() and Path(f"/proc/{vm_pid}").exists()
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert pf.vf_get(vf)["state"] == "CONNECTED"
        pf.mapping_unload(vf)  # drift while the host is away: reconciliation repairs it
    h.start()
    status = h.cli_json("host", "status")
    assert status["adapter"]["attached"] is True and status["adapter"]["pid"] == adapter_pid
    ready = [e for e in h.events() if e["event"] == "host_ready"][-1]
    assert ready["reconciled"]["vms_kept"] == ["vm1"]
    assert ready["reconciled"]["mappings_reloaded"] == ["vm1"]
    after = h.cli_json("vm", "show", "vm1")["vm"]
    assert (after["state"], after["pid"], after["vf"]) == ("running", vm_pid, vf)
    _agree(h, "vm1", vf)
    # and it carries on: a hot attach, then a stop of the VM it did not start
    h.cli("vdisk", "create", "late", "--datastore", "ds0", "--blocks", "64")
    h.cli("vm", "attach", "vm1", "late")
    _agree(h, "vm1", vf)
    assert h.cli_json("vm", "stop", "vm1")["state"] == "stopped"
    assert wait_gone(vm_pid)
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert pf.vf_get(vf)["state"] == "IDLE"


def test_vm_that_died_while_the_host_was_down_is_stopped(tmp_path: Path, san: StorageArray,
                                                         hosts: list[Host]) -> None:
    h = Host(tmp_path / "run", arrays=(san.directory,))
    hosts.append(h)
    h.start()
    vm = _running_vm(h)
    vf, vm_pid = int(vm["vf"]), int(vm["pid"])
    h.kill9()
    os.kill(vm_pid, signal.SIGKILL)
    assert wait_gone(vm_pid)
    h.start()
    ready = [e for e in h.events() if e["event"] == "host_ready"][-1]
    assert ready["reconciled"]["vms_stopped"] == ["vm1"]
    after = h.cli_json("vm", "list")[0]
    assert (after["state"], after["pid"], after["vf"]) == ("stopped", None, None)
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert pf.vf_get(vf)["state"] == "IDLE"
    # and it starts again, on a new process
    again = h.cli_json("vm", "start", "vm1")
    assert again["state"] == "running" and again["pid"] != vm_pid
    _agree(h, "vm1", int(again["vf"]))


def test_sigterm_stops_the_vms_and_the_adapter(tmp_path: Path, san: StorageArray,
                                               hosts: list[Host]) -> None:
    h = Host(tmp_path / "run", arrays=(san.directory,))
    hosts.append(h)
    h.start()
    vm = _running_vm(h)
    host_pid, adapter_pid, vm_pid = h.pid, h.adapter_pid, int(vm["pid"])
    os.kill(host_pid, signal.SIGTERM)
    assert wait_gone(host_pid, 30) and wait_gone(adapter_pid, 30) and wait_gone(vm_pid, 30)
    with Inventory.open(h.db) as inv:
        view = inv.vm_get("vm1")
        assert (view.state.value, view.vf) == ("stopped", None)
    assert not (h.run_dir / "api.sock").exists()
    last = [json.loads(ln)["event"] for ln in (h.run_dir / "host.log").read_text().splitlines()
            if ln.startswith("{")][-1]
    assert last == "host_stopped"


def test_kill9_restart_on_postgresql(tmp_path: Path, san: StorageArray,
                                     hosts: list[Host]) -> None:
    """The same restart with the inventory in PostgreSQL (claim A9 across machines)."""
    server = os.environ.get("VFDIRECT_TEST_PG_URL")
    if not server:
        pytest.skip("VFDIRECT_TEST_PG_URL is not set (start a server with "
                    "scripts/postgres-test-server.sh start)")
    with pg_schema(server) as url:
        h = Host(tmp_path / "run", arrays=(san.directory,), db=url)
        hosts.append(h)
        try:
            h.start()
            assert h.cli_json("host", "status")["inventory"].startswith("postgresql")
            vm = _running_vm(h)
            vf, vm_pid = int(vm["vf"]), int(vm["pid"])
            h.kill9()
            h.start()
            after = h.cli_json("vm", "show", "vm1")["vm"]
            assert (after["state"], after["pid"], after["vf"]) == ("running", vm_pid, vf)
            _agree(h, "vm1", vf)
        finally:
            h.cleanup()
