"""Claim A end to end through real processes: the host daemon (CLI -> REST API), its
adapter (PF socket), a VM process (``vm-run``) on its VF, and the shared fabric read from
this test process. One host and one running VM are set up for the module; each test
checks one claim step's observable effect.

Set-up, as an operator would: datastore ds0 over LUNs 0 and 1, vdisks d1 (256 blocks,
thin) and d2 (10000 blocks: more than a LUN, so it spans both), VM vm1 with both attached,
``vm start vm1``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host, make_san

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.guest.fwtable import FWTABLE_MAX_BYTES, decode_fwtable
from vfdirect.host.inventory import Inventory
from vfdirect.storage.shared_fabric import SharedFabric

A = ARRAY_WWN.canonical()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("claims")
    san = make_san(root / "san")
    h = Host(root / "run", arrays=(san.directory,))
    try:
        h.start()
        h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
              "--chunk-blocks", "64")
        d1 = h.cli_json("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256",
                        "--thin")
        d2 = h.cli_json("vdisk", "create", "d2", "--datastore", "ds0", "--blocks", "10000")
        h.cli("vm", "create", "vm1", "--memory", "16MiB")
        h.cli("vm", "attach", "vm1", "d1")
        h.cli("vm", "attach", "vm1", "d2")
        vm = h.cli_json("vm", "start", "vm1")
        yield {"host": h, "san": san, "d1": d1, "d2": d2, "vm": vm}
    finally:
        h.cleanup()


def _events(h: Host, claim: str, vm: str | None = None) -> list[dict[str, Any]]:
    return list(h.api("GET", f"/v1/events?claim={claim}" + (f"&vm={vm}" if vm else "")))


def _inventory(h: Host) -> Inventory:
    return Inventory.open(h.db)


def _console_events(h: Host, vm: str) -> list[dict[str, Any]]:
    text = h.cli("vm", "console", vm).stdout
    return [json.loads(ln) for ln in text.splitlines() if ln.startswith('{"ts"')]


def _wait_console(h: Host, vm: str, event: str, pred: Any = None,
                  timeout: float = 20.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for e in _console_events(h, vm):
            if e.get("event") == event and (pred is None or pred(e)):
                return e
        assert time.monotonic() < deadline, f"no {event} in the console of {vm}"
        time.sleep(0.1)


def test_vm_is_running_as_a_process_on_its_vf(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    vm = env["vm"]
    assert vm["state"] == "running" and vm["vf"] is not None and vm["pid"]
    assert Path(f"/proc/{vm['pid']}/cmdline").read_bytes().count(b"vfdirect.cli.vm_run") == 1
    adapter = h.cli_json("adapter", "show")
    vf = next(v for v in adapter["vfs"] if v["vf"] == vm["vf"])
    assert vf["state"] == "CONNECTED" and vf["vm"] == {"name": "vm1", "pid": vm["pid"]}


def test_claim_A1_vdisks_created_on_the_datastore(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    listed = {v["name"]: v for v in h.cli_json("vdisk", "list")}
    assert listed["d1"]["capacity_blocks"] == 256 and listed["d2"]["capacity_blocks"] == 10000
    # d1 was made thin (nothing allocated); a VF maps only allocated space, so the VM's
    # start inflated it
    assert env["d1"]["thin"] and env["d1"]["allocated_blocks"] == 0
    assert listed["d1"]["allocated_blocks"] == 256
    events = {e["vdisk"]: e for e in _events(h, "A1")}
    assert set(events) == {env["d1"]["id"], env["d2"]["id"]}
    d2_luns = {x["lun"] for x in events[env["d2"]["id"]]["detail"]["extents"]}
    assert d2_luns == {0, 1}  # 10000 blocks do not fit one 8192-block LUN
    ds = h.cli_json("datastore", "list")[0]
    assert ds["free_blocks"] == 2 * 8192 - 256 - 10048  # whole 64-block chunks
    text = h.cli("vdisk", "list").stdout.splitlines()
    assert text[0].split()[:3] == ["ID", "NAME", "DATASTORE"] and len(text) == 3


def test_claim_A2_mapping_info_both_mappings(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    mapping = h.api("GET", "/v1/vms/vm1/mapping")
    with _inventory(h) as inv:
        first = {e["vdisk"]: e["layout"] for e in mapping["entries"]}
        assert first == {d: inv.vdisk_layout(d).dump() for d in first}
        vport = inv.vm_get("vm1").vport
    second = {(e["name"], e["target"], e["lun"]) for e in mapping["entries"]}
    assert second == {("d1", 0, 0), ("d2", 0, 1)}
    assert mapping["vport"] == vport.canonical()
    assert mapping["physical_luns"] == [f"{A}/0", f"{A}/1"]
    built = _events(h, "A2", "vm1")
    assert built and {v["vdisk"] for v in built[0]["detail"]["vdisks"]} == set(first)


def test_claim_A3_vdisks_allocated_to_the_vm(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    mine = h.cli_json("vdisk", "list", "--vm", "vm1")
    assert {v["name"] for v in mine} == {"d1", "d2"}
    assert all(v["vm"] == "vm1" for v in mine)
    events = _events(h, "A3", "vm1")
    assert {e["vdisk"] for e in events} >= {env["d1"]["id"], env["d2"]["id"]}


def test_claim_A4_vf_mapping_equals_the_inventory_table(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    vf = env["vm"]["vf"]
    with _inventory(h) as inv:
        table = inv.vm_mapping_table("vm1")
    # read back from the adapter on a PF connection of this test's own
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert pf.mapping_get(vf) == table
    shown = h.cli_json("vm", "show", "vm1")
    assert shown["vf_mapping"] == shown["inventory_mapping"] == table
    loaded = _events(h, "A4", "vm1")
    assert loaded and loaded[0]["detail"]["vf"] == vf and loaded[0]["detail"]["luns"] == 2


def test_claim_A5_vport_created_and_luns_masked_to_it(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    ports = h.cli_json("vport", "list")
    assert len(ports) == 1
    wwpn = ports[0]["wwpn"]
    assert [e["vport"] for e in _events(h, "A5") if e["kind"] == "vport_create"] == [wwpn]
    fabric = SharedFabric(env["san"].directory.parent / "fabric")
    try:
        config = json.dumps(fabric.show()["config"])
    finally:
        fabric.close()
    assert wwpn in config  # zoned and masked
    masked = [e for e in _events(h, "A5", "vm1") if e["kind"] == "fabric_mask_grant"]
    assert masked and masked[-1]["detail"]["luns"] == {A: [0, 1]}


def test_claim_A6_vport_associated_with_the_mapping_info(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    ports = h.cli_json("vport", "list")
    assert ports[0]["vm"] == "vm1"
    with _inventory(h) as inv:
        info = inv.mapping_build("vm1")
    assert info.vport is not None and info.vport.wwpn.canonical() == ports[0]["wwpn"]
    assert {e.address.vport for e in info.entries} == {info.vport.wwpn}
    assert [e["vport"] for e in _events(h, "A6", "vm1")] == [ports[0]["wwpn"]]


def test_claim_A7_vport_bound_and_logged_in(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    wwpn = h.cli_json("vport", "list")[0]["wwpn"]
    adapter = h.cli_json("adapter", "show")
    vf = next(v for v in adapter["vfs"] if v["vf"] == env["vm"]["vf"])
    assert vf["vport"] == wwpn
    fabric = SharedFabric(env["san"].directory.parent / "fabric")
    try:
        logins = {lg["wwpn"]: lg for lg in fabric.show()["logins"]}
    finally:
        fabric.close()
    assert logins[wwpn]["pid"] == h.adapter_pid
    assert _events(h, "A7", "vm1")[0]["detail"]["vf"] == env["vm"]["vf"]


def test_claim_A8_guest_finds_exactly_the_recorded_addresses(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    memory = h.run_dir / "vms" / "vm1" / "memory"
    with open(memory, "rb") as f:
        table = decode_fwtable(f.read(FWTABLE_MAX_BYTES))
    with _inventory(h) as inv:
        info = inv.mapping_build("vm1")
    recorded = {(int(e.address.target), e.address.lun, e.vdisk.id) for e in info.entries}
    assert {(d.target, d.lun, d.vdisk) for d in table.disks} == recorded
    assert {d.wwpn for d in table.disks} == {info.vport.wwpn} if info.vport else False
    assert table.vf_socket == str(h.run_dir / f"vf{env['vm']['vf']}.sock")
    scanned = _wait_console(h, "vm1", "vm_scanned")
    found = {(d["target"], d["lun"], d["serial"]) for d in scanned["disks"]}
    assert found == {(t, u, e.vdisk.serial) for (t, u, _), e in
                     zip(sorted(recorded), sorted(info.entries,
                                                  key=lambda e: (e.address.target,
                                                                 e.address.lun)),
                         strict=True)}
    assert scanned["missing"] == scanned["unexpected"] == scanned["mismatched"] == []
    assert _events(h, "A8", "vm1")[0]["detail"]["addresses"] == [[0, 0], [0, 1]]


def test_hot_attach_and_detach_reach_the_vf_and_the_guest(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    vf = env["vm"]["vf"]
    h.cli("vdisk", "create", "d3", "--datastore", "ds0", "--blocks", "128")
    address = h.cli_json("vm", "attach", "vm1", "d3")
    assert (address["target"], address["lun"]) == (0, 2)
    with _inventory(h) as inv:
        table = inv.vm_mapping_table("vm1")
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert pf.mapping_get(vf) == table and len(table["luns"]) == 3
    _wait_console(h, "vm1", "disk_added", lambda e: (e["target"], e["lun"]) == (0, 2))
    h.cli("vm", "detach", "vm1", "d3")
    _wait_console(h, "vm1", "disk_removed", lambda e: (e["target"], e["lun"]) == (0, 2))
    with PfClient(h.run_dir / "pf.sock", timeout=30) as pf:
        assert len(pf.mapping_get(vf)["luns"]) == 2
    h.cli("vdisk", "delete", "d3")


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]


def test_pause_and_resume_keep_the_vf(env: dict[str, Any]) -> None:
    h: Host = env["host"]
    pid, vf = env["vm"]["pid"], env["vm"]["vf"]
    paused = h.cli_json("vm", "pause", "vm1")
    assert paused["state"] == "paused" and _proc_state(pid) == "T"
    proc = h.cli("vm", "pause", "vm1", check=False)
    assert proc.returncode == 1 and "is paused, not running" in proc.stderr
    adapter = h.cli_json("adapter", "show")
    assert next(v for v in adapter["vfs"] if v["vf"] == vf)["state"] == "CONNECTED"
    resumed = h.cli_json("vm", "resume", "vm1")
    assert resumed["state"] == "running" and _proc_state(pid) in {"S", "R"}
