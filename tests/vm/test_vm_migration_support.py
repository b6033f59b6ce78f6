"""The VM process's side of live migration (SYSTEM.md 5, 6), with real processes:

* the dirty log (``vm-run --dirty-log``): every page the guest runtime changes is marked.
  The proof snapshots the memory file around intervals in which ONLY the guest writes
  (the VM stopped with SIGSTOP, its VF quiesced and drained, then the VM continued with
  the VF still quiesced: it reaps what the VF completed, journals, fills data-out
  buffers and publishes requests the VF does not fetch) and compares with the marks
  collected (clear, then a barrier) at the start and end of each interval;
* the worst IO stall (``max_stall_ms``) in the progress events and the result, and the
  stall across a restart (``vm_stall``);
* a VM stopped on adapter 1, its memory file copied, resumed with ``--restart`` on the
  copy, on a VF of a SECOND adapter daemon (same array, same fabric): the verify
  workload carries on with no error, and the requests in flight at the stop complete
  exactly once (the two VFs' write counters add up to the journal's);
* ``VmProcess.spawn`` passes ``--dirty-log`` and, with ``restart``, keeps the memory.

Why quiesce and drain before the copy: the new process gives each vring the base
``used.idx`` found in memory (the front end's reconnect rule), which is right only if the
device side completed, in its used ring, everything it fetched. The hypervisor's
quiesce and drain (SYSTEM.md 5 steps 2-3) make it so before the copy is taken."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ARRAY_WWN, Daemon, vm_mapping
from vm_helpers import VmProc, shm_path, unlink

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.guest.fwtable import FWTABLE_MAX_BYTES, FirmwareTable, FwDisk, encode_fwtable
from vfdirect.core.guest.journal import Journal
from vfdirect.core.guest.layout import HEADER_ADDR, GuestLayout
from vfdirect.core.guest.virtscsi import VirtioScsiDriver
from vfdirect.core.migration.dirty import PAGE_SIZE, PageMarks
from vfdirect.core.virtio import RegionMemory
from vfdirect.core.wwn import Wwn
from vfdirect.host.vms import VmProcess, process_stopped
from vfdirect.storage import StorageArray
from vfdirect.transport.shm import SharedMemory

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vfdirect.adapter.vf") is None,
                       reason="the adapter's VF data path (vfdirect.adapter.vf) is missing"),
    pytest.mark.timeout(240),
]

VPORT = Wwn.naa5(0x6401)
VPORT_NN = Wwn.naa5(0x6402)
TIMEOUT_S = 15.0
MEMORY = 8 << 20

_fence_lock = threading.Lock()


def fence() -> None:
    """A full barrier (a locked instruction) between clearing the marks and reading."""
    _fence_lock.acquire()
    _fence_lock.release()


def prepare(pf: PfClient, san: StorageArray, *, zone: bool = True) -> dict[str, Any]:
    pf.array_attach(san.directory)  # the fabric lives beside the array: shared
    pf.vf_enable(2)
    pf.vport_create(VPORT, VPORT_NN)
    if zone:
        pf.fabric_zone_create("vm0", [VPORT, *san.target_ports])
        pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0, 1, 2])
    doc, _ = vm_mapping(san)
    return doc


def assign(pf: PfClient, pid: int, doc: dict[str, Any]) -> None:
    pf.vf_assign(0, "vm0", pid)
    pf.vport_bind(VPORT, 0)
    pf.mapping_load(0, doc)


def table(doc: dict[str, Any], socket: Path) -> FirmwareTable:
    return FirmwareTable("vm0", "vm0-uuid", str(socket), tuple(
        FwDisk(VPORT, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
               e["block_size"], e["serial"], Wwn.parse(e["wwn"])) for e in doc["luns"]))


def vf_io(pf: PfClient) -> dict[str, Any]:
    return dict(pf.adapter_get_stats()["vfs"][0]["io"] or {})


def wait_for(what: str, check: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def progress_writes(vm: VmProc) -> int:
    return max((e.get("writes", 0) for e in vm.events() if e["event"] == "verify_progress"),
               default=0)


def stop_vm_and_device(vm: VmProc, pf: PfClient) -> None:
    """SIGSTOP the VM, then quiesce and drain its VF: from here on nothing writes."""
    os.kill(vm.pid, signal.SIGSTOP)
    pf.vf_quiesce(0)
    drained, outstanding = pf.vf_drain(0, 10_000)
    assert drained, outstanding


def pause_at_safe_point(vm: VmProc) -> None:
    """SIGUSR2: the VM stops itself where no store is under way."""
    os.kill(vm.pid, signal.SIGUSR2)
    wait_for("the VM to stop at a safe point", lambda: process_stopped(vm.pid), 10.0)


def in_flight(path: Path) -> tuple[int, int]:
    """(requests the device has or completed, requests prepared but unpublished) in a
    memory file, seen by a driver attached to a private copy of it."""
    buf = bytearray(path.read_bytes())
    memory = RegionMemory.from_buffers([(0, buf)])
    layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), len(buf))
    driver = VirtioScsiDriver.attach(memory, layout)
    return len(driver.recovered), len(driver.unsent)


def journal_of(path: Path) -> dict[str, int]:
    buf = bytearray(path.read_bytes())
    memory = RegionMemory.from_buffers([(0, buf)])
    layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), len(buf))
    return Journal.open(memory, layout.journal_addr, layout.params.journal_size).summary()


# -- the dirty log ---------------------------------------------------------------------------


def test_every_page_the_guest_changes_is_marked(
        tmp_path: Path, san: StorageArray, adapter: Daemon, memfile: Path,
        vms: list[VmProc]) -> None:
    dirty = shm_path("dirty-complete")
    try:
        with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
            doc = prepare(pf, san)
            fw = tmp_path / "fw.json"
            fw.write_text(json.dumps(table(doc, adapter.run_dir / "vf0.sock").dump()))
            vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size",
                        str(MEMORY), "--fwtable", str(fw), "--workload", "verify",
                        "--depth", "8", "--window", "64", "--progress-ms", "50",
                        "--paused", "--dirty-log", str(dirty))
            vms.append(vm)
            vm.wait_event("vm_paused")
            assert dirty.stat().st_size == PageMarks.size_for(MEMORY)
            assign(pf, vm.pid, doc)
            vm.go()
            wait_for("IO", lambda: progress_writes(vm) > 20)
            with SharedMemory.open(memfile) as mem_shm, SharedMemory.open(dirty) as dmap:
                marks = PageMarks(dmap.buffer, MEMORY)
                memory = mem_shm.buffer
                checked_pages = 0
                try:
                    for _cycle in range(6):
                        stop_vm_and_device(vm, pf)
                        marks.collect(fence)
                        before = bytes(memory)
                        # the guest alone: it reaps, journals, submits; the VF waits
                        os.kill(vm.pid, signal.SIGCONT)
                        time.sleep(0.15)
                        pause_at_safe_point(vm)
                        runs = marks.collect(fence)
                        after = bytes(memory)
                        marked = {p for first, count in runs
                                  for p in range(first, first + count)}
                        changed = {p for p in range(MEMORY // PAGE_SIZE)
                                   if before[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]
                                   != after[p * PAGE_SIZE:(p + 1) * PAGE_SIZE]}
                        assert changed <= marked, sorted(changed - marked)
                        checked_pages += len(changed)
                        pf.vf_resume(0)
                        os.kill(vm.pid, signal.SIGCONT)
                        time.sleep(0.15)  # both run: the device completes, the guest reaps
                finally:
                    marks.release()
                    del memory
                    os.kill(vm.pid, signal.SIGCONT)
            # the guest wrote in the intervals: data-out, journal, rings, stall clock
            assert checked_pages > 0
            assert sum(e["event"] == "vm_pause_point" for e in vm.events()) == 6
            vm.stop()
            code, result = vm.result()
            assert code == 0 and result["ok"], result
            assert result["max_stall_ms"] > 0
            progress = [e for e in vm.events() if e["event"] == "verify_progress"]
            assert progress and all("max_stall_ms" in e for e in progress)
    finally:
        unlink(dirty)


def test_load_reports_the_worst_stall(tmp_path: Path, san: StorageArray, adapter: Daemon,
                                      memfile: Path, vms: list[VmProc]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        doc = prepare(pf, san)
        fw = tmp_path / "fw.json"
        fw.write_text(json.dumps(table(doc, adapter.run_dir / "vf0.sock").dump()))
        vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size",
                    str(MEMORY), "--fwtable", str(fw), "--workload", "load", "--count",
                    "600", "--progress-ms", "20", "--paused")
        vms.append(vm)
        vm.wait_event("vm_paused")
        assign(pf, vm.pid, doc)
        vm.go()
        code, result = vm.result(timeout=120)
        assert code == 0 and result["ok"], result
        assert result["max_stall_ms"] > 0 and result["restart_stall_ms"] is None
        # no upper bound from the load's latencies: the boot scan's commands count as IO
        # too (a slow first REPORT LUNS is a stall) and are not in the load's figures
        progress = [e for e in vm.events() if e["event"] == "load_progress"]
        assert all(e["max_stall_ms"] <= result["max_stall_ms"] for e in progress)
        assert not any(e["event"] == "vm_stall" for e in vm.events())  # a cold boot


# -- resume on a copied memory file, on another adapter --------------------------------------


def test_resume_on_a_copied_memory_file_on_a_second_adapter(
        tmp_path: Path, san: StorageArray, adapter: Daemon, memfile: Path,
        vms: list[VmProc]) -> None:
    copy = shm_path("copied-memory")
    dirty_a, dirty_b = shm_path("dirty-a"), shm_path("dirty-b")
    second = Daemon(tmp_path / "host2")
    try:
        second.wait_ready()
        with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf1, \
                PfClient(second.sock, timeout=TIMEOUT_S) as pf2:
            doc = prepare(pf1, san)
            fw = tmp_path / "fw.json"
            fw.write_text(json.dumps(table(doc, adapter.run_dir / "vf0.sock").dump()))
            a = VmProc(tmp_path, "vm-a", "--memory-file", str(memfile), "--memory-size",
                       str(MEMORY), "--fwtable", str(fw), "--workload", "verify",
                       "--depth", "8", "--window", "64", "--progress-ms", "50",
                       "--paused", "--dirty-log", str(dirty_a))
            vms.append(a)
            a.wait_event("vm_paused")
            assign(pf1, a.pid, doc)
            a.go()
            wait_for("IO on adapter 1", lambda: progress_writes(a) > 30)
            # stop A with requests in flight (retry while it happens to be idle)
            for _attempt in range(10):
                stop_vm_and_device(a, pf1)
                shutil.copyfile(memfile, copy)
                found, unsent = in_flight(copy)
                if found or unsent:
                    break
                pf1.vf_resume(0)
                os.kill(a.pid, signal.SIGCONT)
                time.sleep(0.05)
            assert found or unsent, "the VM never had a request in flight"
            a.kill9()
            writes_1 = vf_io(pf1)["writes"]
            pf1.vport_unbind(VPORT)
            pf1.vport_logout(VPORT)
            # the destination: another adapter process, same array and fabric
            prepare(pf2, san, zone=False)
            b = VmProc(tmp_path, "vm-b", "--memory-file", str(copy), "--restart",
                       "--workload", "verify", "--depth", "8", "--window", "64",
                       "--count", "300", "--progress-ms", "50", "--paused",
                       "--dirty-log", str(dirty_b))
            vms.append(b)
            booted = b.wait_event("vm_booted")
            assert booted["restart"] and booted["boot_count"] == 2
            assert booted["recovered"] == found and booted["unsent"] == unsent
            b.wait_event("vm_paused")
            assign(pf2, b.pid, doc)
            # the host rewrites page 0: the VM's VF socket is adapter 2's now
            page = encode_fwtable(table(doc, second.run_dir / "vf0.sock"))
            fd = os.open(copy, os.O_RDWR)
            try:
                os.pwrite(fd, page.ljust(FWTABLE_MAX_BYTES, b"\0"), 0)
            finally:
                os.close(fd)
            b.go()
            code, result = b.result(timeout=180)
            assert code == 0, result
            assert result["ok"] and result["errors"] == 0 and result["mismatches"] == 0, result
            assert result["unresolved"] == 0 and result["boot_count"] == 2
            assert result["in_flight_at_start"] == found
            assert result["recovered_completions"] == found
            assert result["unsent_at_start"] == unsent
            connected = b.wait_event("vm_connected")
            assert connected["socket"] == str(second.run_dir / "vf0.sock")
            # in flight at the stop: completed once, not lost, not repeated
            journal = journal_of(copy)
            assert journal["pending"] == 0 and journal["failed"] == 0, journal
            writes_2 = vf_io(pf2)["writes"]
            assert writes_1 + writes_2 == journal["acked"], (writes_1, writes_2, journal)
            # the stall across the restart is measured and logged
            stall = b.wait_event("vm_stall")
            assert stall["stall_ms"] > 0
            assert result["restart_stall_ms"] == stall["stall_ms"]
            assert result["max_stall_ms"] >= stall["stall_ms"]
    finally:
        second.stop()
        for path in (copy, dirty_a, dirty_b):
            unlink(path)


def test_a_dirty_log_of_another_size_is_refused(tmp_path: Path, memfile: Path,
                                                vms: list[VmProc]) -> None:
    dirty = tmp_path / "dirty"
    dirty.write_bytes(bytes(7))
    vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", str(MEMORY),
                "--dirty-log", str(dirty))
    vms.append(vm)
    assert vm.proc.wait(30) == 2
    failed = vm.wait_event("vm_boot_failed")
    assert failed["error"].startswith("dirty log:") and "another size" in failed["error"]


# -- the host's VmProcess ---------------------------------------------------------------------


def test_vm_process_spawn_passes_the_dirty_log_and_restart_keeps_the_memory(
        tmp_path: Path) -> None:
    proc = VmProcess(tmp_path, "vmx")
    try:
        pid = proc.spawn(memory_bytes=8 << 20, workload="idle", start_timeout=30.0)
        assert proc.dirty_log.stat().st_size == PageMarks.size_for(8 << 20)
        assert proc.pause_at_safe_point(10.0) and process_stopped(pid)
        proc.send_signal(signal.SIGCONT)
        wait_for("the VM to continue", lambda: not process_stopped(pid), 10.0)
        proc.wait_event("vm_continued", after=proc.boot_offset)
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert str(proc.dirty_log).encode() in argv and b"--restart" not in argv
        proc.send_signal(signal.SIGKILL)
        assert proc.reap(10.0)
        memory_inode = proc.memory.stat().st_ino
        pid = proc.spawn(memory_bytes=8 << 20, workload="idle", restart=True,
                         extra_args=["--spin-us", "100"])
        booted = proc.wait_event("vm_booted", after=proc.boot_offset)
        assert booted["restart"] and booted["boot_count"] == 2
        assert proc.memory.stat().st_ino == memory_inode  # not deleted
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"--restart" in argv and b"--spin-us" in argv
        proc.stop(wait_s=10.0)
        # a migration's destination: started before its memory is complete
        saved = proc.memory.read_bytes()
        proc.prepare_memory(8 << 20)  # zeroed: the pages "arrive" below
        pid = proc.spawn(memory_bytes=8 << 20, workload="idle", restart=True,
                         incoming=True)
        assert all(e["event"] != "vm_booted" for e in proc._events_after(proc.boot_offset))
        proc.memory.write_bytes(saved)
        booted = proc.boot_incoming(timeout=20.0)
        assert booted["restart"] and booted["boot_count"] == 3 and booted["pid"] == pid
        proc.stop(wait_s=10.0)
        proc.remove_memory()
        assert not proc.memory.exists() and not proc.dirty_log.exists()
        proc.prepare_memory(8 << 20)
        assert proc.memory.stat().st_size == 8 << 20
    finally:
        proc.stop(wait_s=10.0)
        proc.remove_memory()
