"""The guest end to end with the adapter's own VF (real processes): claim A8 (the VM
finds exactly the mapped virtual disk addresses with REPORT LUNS and INQUIRY), IO
through the VM's block layer byte for byte, the fabric's masking seen by the guest as
sense data, hotplug events from a mapping change, and a VM process killed with -9
between two requests and restarted on the same memory without losing or repeating a
write (the VF's own counters prove it)."""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ARRAY_WWN, Daemon, vm_mapping
from vm_helpers import VmProc, shm_path, unlink

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk
from vfdirect.core.guest.journal import Journal
from vfdirect.core.guest.layout import HEADER_ADDR, GuestLayout, LayoutParams
from vfdirect.core.scsi.sense import ACCESS_DENIED_NO_ACCESS_RIGHTS
from vfdirect.core.virtio import RegionMemory
from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray
from vfdirect.transport.shm import SharedMemory

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vfdirect.adapter.vf") is None,
    reason="the adapter's VF data path (vfdirect.adapter.vf) is missing")

VPORT = Wwn.naa5(0x6301)
VPORT_NN = Wwn.naa5(0x6302)
TIMEOUT_S = 15.0


def prepare(pf: PfClient, san: StorageArray, masked: tuple[int, ...]) -> dict[str, Any]:
    """Claim A steps 1-6 through the PF (the hypervisor's part before the VM runs)."""
    pf.array_attach(san.directory)
    pf.vf_enable(2)
    pf.vport_create(VPORT, VPORT_NN)
    pf.fabric_zone_create("vm0", [VPORT, *san.target_ports])
    pf.fabric_mask_grant(VPORT, ARRAY_WWN, list(masked))
    doc, _ = vm_mapping(san)  # vd-a (0,0), vd-b (0,1) on LUNs 0-1, vd-c (0,2) on LUN 2
    return doc


def assign(pf: PfClient, pid: int, doc: dict[str, Any]) -> str:
    """Claim A steps 4 and 7: the VF to the VM process, vport bound, mapping loaded."""
    sock = str(pf.vf_assign(0, "vm0", pid)["socket_path"])
    pf.vport_bind(VPORT, 0)
    pf.mapping_load(0, doc)
    return sock


def fwtable(doc: dict[str, Any], socket: str | None) -> FirmwareTable:
    """Claim A8: the addresses the hypervisor tells the VM."""
    return FirmwareTable("vm0", "vm0-uuid", socket, tuple(
        FwDisk(VPORT, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
               e["block_size"], e["serial"], Wwn.parse(e["wwn"])) for e in doc["luns"]))


def wait_vf(pf: PfClient, state: str) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while pf.vf_get(0)["state"] != state:
        assert time.monotonic() < deadline, f"VF 0 is {pf.vf_get(0)['state']}, not {state}"
        time.sleep(0.01)


def vf_io(pf: PfClient) -> dict[str, Any]:
    return dict(pf.adapter_get_stats()["vfs"][0]["io"] or {})


# -- in-process: this test process is the VM -------------------------------------------


def test_guest_block_layer_over_the_vf(san: StorageArray, adapter: Daemon) -> None:
    from vfdirect.vm.block import BlockLayer, CheckConditionError  # noqa: PLC0415
    from vfdirect.vm.frontend import VhostUserFrontend  # noqa: PLC0415
    from vfdirect.vm.guest import boot_guest  # noqa: PLC0415
    from vfdirect.vm.scsi import ScsiHost  # noqa: PLC0415

    path = shm_path("inproc")
    guest = boot_guest(path, params=LayoutParams(memory_size=8 << 20, journal_size=4096))
    frontend = None
    try:
        with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
            doc = prepare(pf, san, masked=(0, 1))  # LUN 2 (vd-c) is NOT masked to us
            sock = assign(pf, os.getpid(), doc)
            frontend = VhostUserFrontend(sock)
            frontend.connect(guest, deadline=time.monotonic() + TIMEOUT_S)
            wait_vf(pf, "CONNECTED")
            host = ScsiHost(guest, frontend)
            layer = BlockLayer(host, fwtable(doc, sock))
            disks = layer.scan()
            # claim A8: exactly the mapped virtual disk addresses
            assert [(d.name, d.address, d.num_blocks, d.block_size, d.serial)
                    for d in disks] == [
                ("sda", (0, 0), 256, 512, doc["luns"][0]["serial"]),
                ("sdb", (0, 1), 10000, 512, doc["luns"][1]["serial"]),
                ("sdc", (0, 2), 128, 512, doc["luns"][2]["serial"])]
            assert disks[0].wwn == doc["luns"][0]["wwn"]
            # IO byte for byte, several requests in flight; vd-b spans two LUNs
            sda, sdb, sdc = disks
            payload = {lba: os.urandom(512 * 16) for lba in range(0, 256, 16)}
            requests = [sda.submit_write(lba, data) for lba, data in payload.items()]
            layer.wait(requests, TIMEOUT_S)
            assert all(r.error is None for r in requests)
            assert sda.read(0, 256) == b"".join(payload.values())
            big = os.urandom(512 * 600)
            sdb.write(9700, big[:512 * 300], fua=True)
            sdb.write(8000, big)
            sdb.flush()
            assert sdb.read(8000, 600) == big
            # the fabric refuses LUN 2: the guest sees CHECK CONDITION, ACCESS DENIED
            with pytest.raises(CheckConditionError) as info:
                sdc.read(0, 1)
            assert info.value.sense is not None
            assert info.value.sense.sense == ACCESS_DENIED_NO_ACCESS_RIGHTS
            io = vf_io(pf)
            # 16 writes, then 300 and 600 blocks in 128-block commands: 3 + 5
            assert io["writes"] == len(payload) + 3 + 5
            assert io["errors"]["by_sense_key"] == {"ILLEGAL_REQUEST": 1}
            # hotplug: the hypervisor drops vd-c from the mapping, then adds it back
            smaller = {**doc, "luns": doc["luns"][:2]}
            pf.mapping_load(0, smaller)
            deadline = time.monotonic() + TIMEOUT_S
            while sdc.present and time.monotonic() < deadline:
                layer.poll(0.05)
            assert not sdc.present
            pf.mapping_load(0, doc)
            while not sdc.present and time.monotonic() < deadline:
                layer.poll(0.05)
            assert sdc.present and layer.disk_at(0, 2) is sdc
            assert [c["event"] for c in layer.changes][-2:] == ["removed", "added"]
            assert host.frontend.kicks_sent < host.completed  # EVENT_IDX suppressed kicks
            # the brief poll before sleeping: with a window longer than the VF's answer
            # time a synchronous read never sleeps on the call eventfd; without, it does
            slept = {}
            for spin in (0.0, 5e-3):
                host.spin_s = spin
                before = frontend.sleeps
                for i in range(40):
                    sda.read(i, 1)
                slept[spin] = frontend.sleeps - before
            assert slept[5e-3] <= 10 and 2 * slept[5e-3] < slept[0.0], slept
    finally:
        if frontend is not None:
            frontend.close()
        guest.close()
        unlink(path)


# -- the VM as its own process -------------------------------------------------------------


def test_vm_process_selftest_over_the_vf(tmp_path: Path, san: StorageArray, adapter: Daemon,
                                         memfile: Path, vms: list[VmProc]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        doc = prepare(pf, san, masked=(0, 1, 2))
        table = tmp_path / "fw.json"
        sock = str(adapter.run_dir / "vf0.sock")
        table.write_text(json.dumps(fwtable(doc, sock).dump()))
        vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", "8MiB",
                    "--fwtable", str(table), "--workload", "selftest", "--paused")
        vms.append(vm)
        # the handshake: start paused, assign the VF to the pid, then let it boot
        assert vm.wait_event("vm_paused")["pid"] == vm.pid
        assert assign(pf, vm.pid, doc) == sock
        vm.go()
        code, result = vm.result()
        assert code == 0, result
        assert result["ok"] and result["verified_blocks"] == 9, result
        assert [(d["target"], d["lun"]) for d in result["disks"]] == [(0, 0), (0, 1), (0, 2)]
        assert result["missing"] == result["unexpected"] == result["mismatched"] == []
        assert pf.vf_get(0)["vm"] == {"name": "vm0", "pid": vm.pid}
        assert vf_io(pf)["writes"] == 9


def _journal(path: Path) -> dict[str, int]:
    shm = SharedMemory.open(path)
    try:
        memory = RegionMemory.from_buffers([(0, shm.buffer)])
        layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), shm.size)
        summary = Journal.open(memory, layout.journal_addr,
                               layout.params.journal_size).summary()
        del memory
    finally:
        shm.close()
    return summary


COUNT = 300


def test_kill9_between_requests_then_restart_over_the_vf(
        tmp_path: Path, san: StorageArray, adapter: Daemon, memfile: Path,
        vms: list[VmProc]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        doc = prepare(pf, san, masked=(0, 1, 2))
        table = tmp_path / "fw.json"
        table.write_text(json.dumps(fwtable(doc, str(adapter.run_dir / "vf0.sock")).dump()))
        common = ["--memory-file", str(memfile), "--workload", "sequence", "--count",
                  str(COUNT), "--depth", "4", "--paused"]
        first = VmProc(tmp_path, "vm1", *common, "--memory-size", "8MiB", "--fwtable",
                       str(table), "--interval-ms", "3")
        vms.append(first)
        first.wait_event("vm_paused")
        assign(pf, first.pid, doc)
        first.go()
        deadline = time.monotonic() + 60
        while _journal(memfile)["acked"] < COUNT // 3:
            assert time.monotonic() < deadline and first.proc.poll() is None
            time.sleep(0.005)
        first.kill9()
        acked_at_kill = _journal(memfile)["acked"]
        assert acked_at_kill < COUNT
        wait_vf(pf, "ASSIGNED")  # the VF finished what it took and let the front end go
        writes_first = vf_io(pf)["writes"]
        # the hypervisor hands the VF to the new VM process (a new pid)
        pf.vf_unassign(0)
        second = VmProc(tmp_path, "vm2", *common, "--restart")
        vms.append(second)
        second.wait_event("vm_paused")
        assign(pf, second.pid, doc)
        writes_reassigned = vf_io(pf)["writes"]
        second.go()
        code, result = second.result(timeout=120)
        assert code == 0, result
        assert result["ok"] and result["acked"] == COUNT and result["pending"] == 0, result
        assert result["verified_blocks"] == COUNT and result["boot_count"] == 2
        assert _journal(memfile) == {"pending": 0, "acked": COUNT, "failed": 0}
        # the VF executed exactly COUNT writes over both VM processes: none repeated
        writes_second = vf_io(pf)["writes"] - writes_reassigned
        assert writes_first + writes_second == COUNT, (writes_first, writes_second)
        assert acked_at_kill <= writes_first
