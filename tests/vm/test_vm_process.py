"""``vfdirect vm-run`` as a real process against a vhost-user back end in the test
process: the paused start-up handshake, the selftest workload, SIGTERM, and the
journaled sequence of numbered writes surviving ``kill -9`` and ``--restart`` without
losing or repeating a write (the back end records every command it executed)."""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_backend import FakeVhostBackend
from guest_device import make_lu
from vm_helpers import VmProc

from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk
from vfdirect.core.guest.journal import EntryState, Journal
from vfdirect.core.guest.layout import HEADER_ADDR, GuestLayout
from vfdirect.core.scsi import Target
from vfdirect.core.virtio import RegionMemory
from vfdirect.core.wwn import Wwn
from vfdirect.transport.shm import SharedMemory

MEM = "8MiB"


def targets() -> dict[int, Target]:
    t0, t1 = Target(), Target()
    t0.add_lu(0, make_lu(256, serial="SER-A", n=1))
    t0.add_lu(1, make_lu(512, serial="SER-B", n=2))
    t1.add_lu(3, make_lu(128, serial="SER-C", n=3))
    return {0: t0, 1: t1}


def fw(socket: Path | None) -> FirmwareTable:
    port = Wwn.naa5(0x6101)
    return FirmwareTable("vm0", "vm0-id", None if socket is None else str(socket), (
        FwDisk(port, 0, 0, "vd-a", 256, 512, "SER-A", Wwn.naa5(0x9001)),
        FwDisk(port, 0, 1, "vd-b", 512, 512, "SER-B", Wwn.naa5(0x9002)),
        FwDisk(port, 1, 3, "vd-c", 128, 512, "SER-C", Wwn.naa5(0x9003))))


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[FakeVhostBackend]:
    b = FakeVhostBackend(tmp_path / "vf0.sock", targets())
    b.start()
    yield b
    b.stop()
    assert not b.errors, b.errors


def start(vms: list[VmProc], tmp: Path, name: str, *args: str) -> VmProc:
    vm = VmProc(tmp, name, *args)
    vms.append(vm)
    return vm


def journal_of(path: Path) -> tuple[list[tuple[int, EntryState]], dict[str, int]]:
    """The journal as the hypervisor sees it: straight from the memory file."""
    shm = SharedMemory.open(path)
    try:
        memory = RegionMemory.from_buffers([(0, shm.buffer)])
        layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), shm.size)
        journal = Journal.open(memory, layout.journal_addr, layout.params.journal_size)
        entries = [(e.seq, e.state) for e in journal.entries()]
        summary = journal.summary()
        del journal, memory
    finally:
        shm.close()
    return entries, summary


def test_selftest_with_a_firmware_table_file(tmp_path: Path, backend: FakeVhostBackend,
                                             memfile: Path, vms: list[VmProc]) -> None:
    table = tmp_path / "fw.json"
    table.write_text(json.dumps(fw(backend.path).dump()))
    vm = start(vms, tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", MEM,
               "--fwtable", str(table), "--workload", "selftest")
    code, result = vm.result()
    assert code == 0, result
    assert result["ok"] and result["verified_blocks"] == 9 and not result["errors"]
    assert [(d["name"], d["target"], d["lun"]) for d in result["disks"]] == [
        ("sda", 0, 0), ("sdb", 0, 1), ("sdc", 1, 3)]
    assert result["missing"] == result["unexpected"] == result["mismatched"] == []
    assert backend.peer_pids == [vm.pid]
    events = [e["event"] for e in vm.events() if not e["event"].startswith("disk_")]
    assert events == ["vm_booted", "vm_connected", "vm_scanned", "vm_stopped"]


def test_paused_until_sigusr1_then_reads_page0(tmp_path: Path, backend: FakeVhostBackend,
                                               memfile: Path, vms: list[VmProc]) -> None:
    """The hypervisor's handshake: start paused, assign the VF to the pid, write page 0,
    then SIGUSR1; the VM reads the socket path from the table written while paused."""
    vm = start(vms, tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", MEM,
               "--paused", "--workload", "selftest")
    paused = vm.wait_event("vm_paused")
    assert paused["pid"] == vm.pid
    time.sleep(0.2)
    assert backend.connections == 0  # it waits
    shm = SharedMemory.open(memfile)
    try:
        shm.buffer[:4096] = fw(backend.path).encode().ljust(4096, b"\0")
    finally:
        shm.close()
    vm.go()
    code, result = vm.result()
    assert code == 0 and result["ok"], result
    assert backend.peer_pids == [vm.pid]


def test_sigterm_is_a_clean_shutdown(tmp_path: Path, backend: FakeVhostBackend,
                                     memfile: Path, vms: list[VmProc]) -> None:
    vm = start(vms, tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", MEM,
               "--socket", str(backend.path))
    vm.wait_event("vm_scanned")
    assert vm.stop() == 0
    assert "vm_stopped" in [e["event"] for e in vm.events()]
    assert backend.disconnected.wait(5)
    _, result = vm.result()
    assert result["workload"] == "idle" and result["ok"]
    assert result["unexpected"] == []  # no firmware table: nothing was expected


def test_no_socket_anywhere_is_an_error(tmp_path: Path, memfile: Path,
                                        vms: list[VmProc]) -> None:
    vm = start(vms, tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", MEM)
    assert vm.proc.wait(20) == 2
    assert vm.wait_event("vm_no_vf")


def test_restart_without_a_booted_memory_file_is_refused(tmp_path: Path, memfile: Path,
                                                         vms: list[VmProc]) -> None:
    SharedMemory.create(memfile, 8 << 20).close()
    vm = start(vms, tmp_path, "vm", "--memory-file", str(memfile), "--restart",
               "--socket", "/nonexistent")
    assert vm.proc.wait(20) == 2
    assert "never booted" in vm.wait_event("vm_boot_failed")["error"]


COUNT = 240


def test_kill9_mid_sequence_then_restart_loses_and_repeats_nothing(
        tmp_path: Path, backend: FakeVhostBackend, memfile: Path,
        vms: list[VmProc]) -> None:
    common = ["--memory-file", str(memfile), "--socket", str(backend.path),
              "--workload", "sequence", "--count", str(COUNT), "--depth", "6"]
    first = start(vms, tmp_path, "vm1", *common, "--memory-size", MEM, "--interval-ms", "2")
    first.wait_event("vm_scanned")
    # Let it get well into the sequence; then the device holds the writes (as a slow
    # disk would) and the VM is killed with several of them in flight.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        _, summary = journal_of(memfile)
        if summary["acked"] >= COUNT // 3:
            break
        time.sleep(0.01)
    backend.set_hold(lambda header: header.cdb[0] == 0x8A)
    while time.monotonic() < deadline and len(backend.device.held) < 6:
        time.sleep(0.005)
    first.kill9()
    before, summary = journal_of(memfile)
    assert COUNT // 3 <= summary["acked"] < COUNT
    assert backend.disconnected.wait(5)
    second = start(vms, tmp_path, "vm2", *common, "--restart")
    code, result = second.result()
    assert code == 0, result
    booted = second.events()[0]
    assert booted["event"] == "vm_booted" and booted["restart"] and booted["boot_count"] == 2
    assert booted["recovered"] == 6  # completed by the back end while no VM ran
    assert result["ok"] and result["acked"] == COUNT and result["pending"] == 0
    assert result["verified_blocks"] == COUNT and not result["errors"]
    # The journal: every seq exactly once, all acknowledged.
    entries, summary = journal_of(memfile)
    assert [seq for seq, _ in entries] == list(range(COUNT))
    assert summary == {"pending": 0, "acked": COUNT, "failed": 0}
    # The device: each numbered write executed exactly once (by LBA and disk; the
    # sequence writes each block once: 240 writes over 3 disks of >= 128 blocks).
    writes = Counter((e.target, e.lun, int.from_bytes(e.cdb[2:10], "big"))
                     for e in backend.device.executed if e.cdb[0] == 0x8A)
    selftest_free = sum(writes.values())
    assert selftest_free == COUNT, f"{selftest_free} writes executed for {COUNT}"
    assert max(writes.values()) == 1
    # and the kill really left writes in flight for the second process to settle
    assert backend.connections == 2
    assert sum(state is EntryState.PENDING for _, state in before) == 6


def test_sigterm_mid_sequence_leaves_a_consistent_journal(
        tmp_path: Path, backend: FakeVhostBackend, memfile: Path, vms: list[VmProc]) -> None:
    vm = start(vms, tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", MEM,
               "--socket", str(backend.path), "--workload", "sequence", "--count", "5000",
               "--interval-ms", "2")
    vm.wait_event("vm_scanned")
    time.sleep(0.3)
    assert vm.stop() == 0
    _, result = vm.result()
    assert result["stopped"] and not result["complete"] and result["ok"]
    assert result["pending"] == 0 and result["acked"] == result["verified_blocks"] > 0
    _, summary = journal_of(memfile)
    assert summary == {"pending": 0, "acked": result["acked"], "failed": 0}
