"""Isolation suite (issue 8): VM A against VM B (memory, LUNs, extents), PF-only methods
unreachable from a VF connection, LUN masking hot revoke and grant, a duplicate WWPN
refused, resetting one VF leaves the others untouched, freed extents read as zeros.

Real processes throughout: an adapter daemon run with ``--audit`` (its auditor must count
0 violations), VM A driven by this process through its VF (so that it can address
anything), VM B a VM process verifying its disks all along; the freed-extents test runs
a ``vfdirect host`` (``host start --audit``), whose hypervisor zeroes a deleted vdisk.
Counters (checks, faults injected, IOs in flight at each fault) are printed and written
to ``artifacts/proof/isolation.json``."""

from __future__ import annotations

import mmap
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from isolation_helpers import (
    ARRAY_WWN,
    OK,
    PATTERN,
    TIMEOUT_S,
    VPORT_A,
    VPORT_B,
    Counters,
    Daemon,
    Rig,
    blocks_with_pattern,
    extent_blocks,
    lun_bytes,
    rw,
    start_rig,
    submit_writes,
)
from prometheus_client.parser import text_string_to_metric_families

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.guest.fwtable import FWTABLE_MAX_BYTES
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.scsi import Status, decode_sense, parse_report_luns
from vfdirect.core.scsi.sense import ACCESS_DENIED_NO_ACCESS_RIGHTS, LOGICAL_UNIT_NOT_SUPPORTED
from vfdirect.core.virtio.scsi import VirtioScsiResponse
from vfdirect.core.wwn import Wwn

pytestmark = pytest.mark.timeout(120)

INQUIRY = bytes([0x12, 0, 0, 0, 96, 0])
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0])
#: blocks per command when VM A fills a disk
STEP = 128


@pytest.fixture(scope="module")
def counters() -> Iterator[Counters]:
    c = Counters("isolation")
    yield c
    c.publish()


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory, counters: Counters) -> Iterator[Rig]:
    r = start_rig(tmp_path_factory.mktemp("iso"), "iso", counters)
    try:
        r.wait_b_beyond(r.b_progress())
        yield r
    finally:
        audit = None
        try:
            audit = r.audit()
        except Exception:
            audit = None
        r.close()
        if audit is not None:
            counters.extra["audit"] = {k: audit[k] for k in (
                "checks", "memory_checks", "extent_checks", "memory_violations",
                "extent_violations")}


def _sense(c: Any) -> object:
    return decode_sense(c.sense).sense


def _lun_list(c: Any) -> list[int]:
    return [int.from_bytes(raw[:2], "big") & 0x3FFF for raw in parse_report_luns(c.data)]


def _no_violation(rig: Rig) -> dict[str, Any]:
    audit = rig.audit()
    c = rig.counters
    c.check(audit["enabled"] is True)
    c.check(audit["memory_violations"] == 0 and audit["extent_violations"] == 0, audit)
    c.check(audit["violations"] == [], audit)
    return audit


# -- VM A against VM B: LUNs ---------------------------------------------------------------


def test_isolation_vm_a_sees_only_its_own_luns(rig: Rig) -> None:
    c, a = rig.counters, rig.a
    report = a.scsi(0, 0, REPORT_LUNS, data_in=256)
    c.check((report.response, report.status) == OK, report)
    c.check(_lun_list(report) == [0, 1], _lun_list(report))  # A's two disks, nothing of B
    # B's disks sit at the same addresses in B's own namespace: through A's VF they are
    # A's disks (a0: 256 blocks, a1: 384), never B's (512 blocks each)
    for lun, blocks in ((0, 256), (1, 384)):
        cap = a.scsi(0, lun, bytes([0x25] + [0] * 9), data_in=8)
        c.check((cap.response, cap.status) == OK, cap)
        c.check(int.from_bytes(cap.data[:4], "big") == blocks - 1, cap.data)
    # addresses A's mapping lacks: the no-LU answer, or BAD_TARGET for a target id
    for lun in (2, 5, 16383):
        inq = a.scsi(0, lun, INQUIRY, data_in=96)
        c.check(inq.response == VirtioScsiResponse.OK)
        c.check((inq.status == Status.GOOD and inq.data[0] == 0x7F) or
                (inq.status == Status.CHECK_CONDITION and
                _sense(inq) == LOGICAL_UNIT_NOT_SUPPORTED), inq)
        rd = a.scsi(0, lun, rw(0x28, 0, 1), data_in=512)
        c.check(rd.status == Status.CHECK_CONDITION and
                _sense(rd) == LOGICAL_UNIT_NOT_SUPPORTED, rd)
    for target in (1, 7, 255):
        c.check(a.scsi(target, 0, INQUIRY, data_in=96).response == VirtioScsiResponse.BAD_TARGET)
        wr = a.scsi(target, 0, rw(0x2A, 0, 1), data_out=PATTERN)
        c.check(wr.response == VirtioScsiResponse.BAD_TARGET)
    # the fabric masks B's LUN 2 to B's vport only
    masks = rig.pf.fabric_show()
    text = repr(masks)
    c.check(VPORT_A.canonical() in text and VPORT_B.canonical() in text)
    # nothing of A reached LUN 2 (B's own LUN)
    c.check(blocks_with_pattern(rig.san, 2, 0, 8192) == 0)
    _no_violation(rig)


# -- VM A against VM B: extents and memory ---------------------------------------------------


def test_isolation_a_fills_its_disks_b_extents_and_memory_untouched(rig: Rig) -> None:
    c, a = rig.counters, rig.a
    canary = Path(rig.b_mem).read_bytes()[:FWTABLE_MAX_BYTES]
    c.check(any(canary), "VM B's firmware table is in its memory")
    before = rig.b_progress()
    for lun, name in ((0, "a0"), (1, "a1")):
        blocks = rig.layouts[name].capacity_blocks
        for lba in range(0, blocks, STEP):
            n = min(STEP, blocks - lba)
            w = rig.write_a(0, lun, lba, n)
            c.check((w.response, w.status) == OK, w)
            r = a.scsi(0, lun, rw(0x28, lba, n), data_in=512 * n)
            c.check((r.response, r.status, r.data) == (*OK, PATTERN * n))
            c.ios += 2
    # A's extents hold the pattern, where the first mapping says, and nowhere else
    mine = 0
    for name in ("a0", "a1"):
        for lun, start, count in extent_blocks(rig.layouts[name]):
            got = blocks_with_pattern(rig.san, lun, start, count)
            c.check(got == count, f"{name}: {got}/{count} blocks at {lun}:{start}")
            mine += got
    everywhere = sum(blocks_with_pattern(rig.san, lun, 0, 8192) for lun in (0, 1, 2))
    c.check(everywhere == mine == 256 + 384, (everywhere, mine))
    for name in ("b0", "b1"):  # B's extents: written by B, never by A
        for lun, start, count in extent_blocks(rig.layouts[name]):
            c.check(blocks_with_pattern(rig.san, lun, start, count) == 0)
    # B's memory: its firmware table intact, its verify still right
    c.check(Path(rig.b_mem).read_bytes()[:FWTABLE_MAX_BYTES] == canary)
    after = rig.wait_b_beyond(before)
    c.check(int(after["errors"]) == 0, after)
    # the auditor saw every access of both VFs, and no violation
    audit = _no_violation(rig)
    per_vf = audit["per_vf"]
    for vf in ("0", "1"):
        c.check(per_vf[vf]["memory_checks"] > 0 and per_vf[vf]["extent_checks"] > 0, per_vf)
    # the adapter maps guest memory of A and B only: nothing else from /dev/shm
    maps = Path(f"/proc/{rig.adapter.proc.pid}/maps").read_text()
    shm = {line.split(None, 5)[5].removesuffix(" (deleted)") for line in maps.splitlines()
           if len(line.split(None, 5)) == 6 and "/dev/shm/" in line}
    c.check(shm <= {str(rig.a_mem), str(rig.b_mem)} and str(rig.b_mem) in shm, shm)


# -- PF-only methods from a VF connection --------------------------------------------------


def test_isolation_pf_methods_unreachable_from_a_vf_connection(rig: Rig) -> None:
    c, pf = rig.counters, rig.pf
    b_before = rig.vf_io(1)
    progress = rig.b_progress()
    sock = pf.vf_assign(2, "vm-x", os.getpid())["socket_path"]
    frame = b'{"jsonrpc": "2.0", "id": 1, "method": "vf_reset", "params": {"vf": 1}}'
    rig.counters.fault(rig.outstanding(1))
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(TIMEOUT_S)
        s.connect(sock)
        s.sendall(frame + bytes(64))
        try:
            answer = s.recv(4096)
        except ConnectionResetError:
            answer = b""
    c.check(answer == b"", answer)  # not a vhost-user message: the VF hangs up
    # ... and nothing else happened: VF 1 is served on, not reset; the PF still answers
    c.check(pf.vf_get(1)["state"] == "CONNECTED")
    rig.wait_b_beyond(progress)
    c.check(rig.vf_io(1)["ios"] > b_before["ios"])
    c.check(pf.vf_get(0)["state"] == "CONNECTED")
    refused = [e for e in rig.adapter.events() if e["event"] in ("vf_fault", "vf_disconnect",
                                                                  "vf_protocol_error")
               and e.get("vf") == 2]
    c.check(refused, "the adapter logged the bad frame on VF 2")
    c.check(all(e.get("vf") != 1 for e in rig.adapter.events() if e["event"] == "vf_fault"))
    pf.vf_reset(2)
    # the PF socket itself refuses a process of another user (the VF's peer, say)
    rig.counters.fault(rig.outstanding(1))
    code = ("import socket,sys\n"
            "s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
            "s.settimeout(5)\n"
            "try:\n"
            "    s.connect(sys.argv[1])\n"
            "    s.send(b'{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"adapter_identify\"}')\n"
            "    print('ANSWER' if s.recv(65536) else 'REFUSED: EOF')\n"
            "except OSError as exc:\n"
            "    print('REFUSED:', type(exc).__name__)\n")
    python = shutil.which("python3", path="/usr/bin:/bin")  # one "nobody" may run
    if os.geteuid() == 0 and python is not None:
        child = subprocess.run([python, "-c", code, str(rig.adapter.sock)],
                               capture_output=True, text=True, timeout=30, check=False,
                               user=65534, group=65534)
        c.check(child.stdout.startswith("REFUSED"), child.stdout + child.stderr)
        c.extra["pf_socket_as_nobody"] = child.stdout.strip()
    c.check(pf.adapter_identify()["max_vfs"] >= 4)
    _no_violation(rig)


# -- LUN masking, hot -------------------------------------------------------------------------


def test_isolation_lun_masking_hot_revoke_and_grant(rig: Rig) -> None:
    c, a, pf = rig.counters, rig.a, rig.pf
    lun, start, _ = extent_blocks(rig.layouts["a0"])[0]
    fresh = os.urandom(8 * 512)
    before = lun_bytes(rig.san, lun, start + 16, 8)
    progress = rig.b_progress()
    rig.counters.fault(rig.outstanding(1))
    pf.fabric_mask_revoke(VPORT_A, ARRAY_WWN, [0])
    w = a.scsi(0, 0, rw(0x2A, 16, 8), data_out=fresh)
    c.check(w.status == Status.CHECK_CONDITION and _sense(w) == ACCESS_DENIED_NO_ACCESS_RIGHTS, w)
    r = a.scsi(0, 0, rw(0x28, 16, 8), data_in=4096)
    c.check(r.status == Status.CHECK_CONDITION and _sense(r) == ACCESS_DENIED_NO_ACCESS_RIGHTS)
    c.check(lun_bytes(rig.san, lun, start + 16, 8) == before)  # nothing was written
    # B's own vport is masked separately: it carries on meanwhile
    rig.wait_b_beyond(progress)
    pf.fabric_mask_grant(VPORT_A, ARRAY_WWN, [0])
    w = a.scsi(0, 0, rw(0x2A, 16, 8), data_out=fresh)
    c.check((w.response, w.status) == OK, w)
    r = a.scsi(0, 0, rw(0x28, 16, 8), data_in=4096)
    c.check((r.response, r.status, r.data) == (*OK, fresh))
    c.check(lun_bytes(rig.san, lun, start + 16, 8) == fresh)
    c.ios += 4
    _no_violation(rig)


# -- a duplicate WWPN -------------------------------------------------------------------------


def test_isolation_duplicate_wwpn_refused(rig: Rig, tmp_path: Path) -> None:
    c, pf = rig.counters, rig.pf
    rig.counters.fault(rig.outstanding(1))
    with pytest.raises(PfError) as info:
        pf.vport_create(VPORT_B, Wwn.naa5(0x6B99))
    c.check(info.value.code is ErrorCode.CONFLICT, info.value)
    c.check(VPORT_B.canonical() in info.value.message, info.value.message)
    # another adapter on the same fabric: it may name the WWPN, never log it in
    other = Daemon(tmp_path / "host2", "--array", str(rig.san.directory)).wait_ready()
    try:
        with PfClient(other.sock, timeout=TIMEOUT_S) as pf2:
            pf2.vport_create(VPORT_A, Wwn.naa5(0x6A99))
            rig.counters.fault(rig.outstanding(1))
            with pytest.raises(PfError) as info:
                pf2.vport_login(VPORT_A)
            c.check(info.value.code is ErrorCode.FABRIC_REFUSED, info.value)
            c.check(info.value.message.startswith("DuplicatePortName"), info.value.message)
    finally:
        other.stop()
    c.check(pf.vf_get(0)["state"] == pf.vf_get(1)["state"] == "CONNECTED")


# -- resetting one VF ---------------------------------------------------------------------------


def test_isolation_reset_one_vf_leaves_the_others_untouched(rig: Rig) -> None:
    c, pf = rig.counters, rig.pf
    # VF 0 stops fetching; VM A submits 8 writes meanwhile: in flight at the reset
    lun, start, _ = extent_blocks(rig.layouts["a1"])[0]
    lbas = list(range(200, 208))
    on_lun = lun_bytes(rig.san, lun, start + 200, 8)
    pf.vf_quiesce(0)
    heads = submit_writes(rig.a, 1, lbas, b"\x5a" * 512)
    c.check(len(set(heads)) == 8)
    drained, _ = pf.vf_drain(0, 2000)
    c.check(drained)
    # VF 0's DMA window holds VM A's memory file and nothing else (its saved record)
    record, fds = pf.vf_state_save(0)
    try:
        inodes = {os.fstat(fd).st_ino for fd in fds if _is_regular(fd)}
    finally:
        for fd in fds:
            os.close(fd)
    c.check(inodes == {os.stat(rig.a_mem).st_ino}, (inodes, record.get("regions")))
    c.check(os.stat(rig.b_mem).st_ino not in inodes)
    b_before = rig.vf_io(1)
    progress = rig.b_progress()
    rig.counters.fault(len(heads) + rig.outstanding(0) + rig.outstanding(1))
    view = pf.vf_reset(0)
    c.check(view["state"] == "IDLE", view)
    c.check(rig.a.drivers[3].pop_used() is None)  # never executed, never completed
    c.check(lun_bytes(rig.san, lun, start + 200, 8) == on_lun)
    after = rig.wait_b_beyond(progress)
    after = rig.wait_b_beyond(after)
    c.check(int(after["errors"]) == 0, after)
    c.check(pf.vf_get(1)["state"] == "CONNECTED")
    io = rig.vf_io(1)
    c.check(io["ios"] > b_before["ios"] and io["errors"]["faults"] == 0, io)
    _no_violation(rig)
    # VM B, stopped: its final read-back pass finds every acknowledged write
    rig.b.proc.send_signal(signal.SIGTERM)
    code, result = rig.b.result(timeout=60)
    c.check(code == 0 and result["ok"] and result["errors"] == 0, result)
    c.check(result["mismatches"] == 0 and result["final_checked"] == result["final_lbas"] > 0,
            result)
    c.ios += int(result["writes"]) + int(result["verified"])


def _is_regular(fd: int) -> bool:
    import stat  # noqa: PLC0415

    return stat.S_ISREG(os.fstat(fd).st_mode)


# -- freed extents read as zeros (the hypervisor zeroes a deleted vdisk) ----------------------


def test_isolation_freed_extents_read_as_zeros(tmp_path: Path, counters: Counters) -> None:
    from host_helpers import ARRAY_WWN as HOST_ARRAY  # noqa: PLC0415
    from host_helpers import Host  # noqa: PLC0415
    from host_helpers import make_san as host_san  # noqa: PLC0415

    from vfdirect.host.client import ApiError  # noqa: PLC0415

    c = counters
    san = host_san(tmp_path / "san", luns=1)
    h = Host(tmp_path / "run", arrays=(san.directory,), extra=("--audit",))
    try:
        h.start()
        h.api("POST", "/v1/datastores", {"name": "ds0", "luns": [f"{HOST_ARRAY.canonical()}:0"],
                                         "block_size": 512, "chunk_blocks": 64})
        h.api("POST", "/v1/vdisks", {"datastore": "ds0", "name": "d1",
                                     "capacity_blocks": 256, "thin": False})
        # the rest of the LUN is taken: the next vdisk can only get d1's freed space
        h.api("POST", "/v1/vdisks", {"datastore": "ds0", "name": "fill",
                                     "capacity_blocks": 8192 - 256, "thin": False})
        h.api("POST", "/v1/vms", {"name": "vm1", "memory_bytes": 8 << 20})
        h.api("POST", "/v1/vms/vm1/attach", {"vdisk": "d1"})
        vf = int(h.api("POST", "/v1/vms/vm1/start", {})["vf"])
        with PfClient(h.run_dir / "pf.sock", timeout=TIMEOUT_S) as pf:
            c.check(pf.adapter_get_stats()["audit"]["enabled"] is True)  # host start --audit
            vport = pf.vf_get(vf)["vport"]
            # a duplicate WWPN, through the hypervisor's API: a clear error
            c.fault(pf.adapter_get_stats()["vfs"][vf]["outstanding"])
            with pytest.raises(ApiError) as info:
                h.api("POST", "/v1/vports", {"wwpn": vport})
            c.check(info.value.status == 409 and vport in info.value.message,
                    (info.value.status, info.value.message))
            extents = _extents(pf.mapping_get(vf), "d1")
            data = os.urandom(256 * 512)
            _pf_io(pf, vport, rw(0x2A, 0, 256), data)
            c.ios += 1
            for lun, start, count, vlba in extents:
                c.check(lun_bytes(san, lun, start, count) ==
                        data[vlba * 512:(vlba + count) * 512])
            h.api("POST", "/v1/vms/vm1/detach", {"vdisk": "d1"})
            h.api("DELETE", "/v1/vdisks/d1")
            h.api("POST", "/v1/vdisks", {"datastore": "ds0", "name": "d2",
                                         "capacity_blocks": 256, "thin": False})
            h.api("POST", "/v1/vms/vm1/attach", {"vdisk": "d2"})
            again = _extents(pf.mapping_get(vf), "d2")
            old = {(lun, b) for lun, s, n, _ in extents for b in range(s, s + n)}
            new = {(lun, b) for lun, s, n, _ in again for b in range(s, s + n)}
            c.check(old & new, "the new vdisk got the freed extents")  # they overlap
            for lun, start, count, _ in again:
                c.check(not any(lun_bytes(san, lun, start, count)))
            got = _pf_io(pf, vport, rw(0x28, 0, 256), None, 256 * 512)
            c.ios += 1
            c.check(got == bytes(256 * 512), "a freed extent read back non-zero data")
            audit = pf.adapter_get_stats()["audit"]
            c.check(audit["extent_checks"] >= 2 and audit["extent_violations"] == 0, audit)
        # the host's /metrics carries the auditor's counters
        with h.client() as client:
            text = client.get("/metrics")
        scraped = {s.name: s.value for f in text_string_to_metric_families(text)
                   for s in f.samples if s.name.startswith("vfdirect_audit_")}
        c.check(scraped.get("vfdirect_audit_checks_total", 0) > 0, scraped)
        c.check(scraped.get("vfdirect_audit_extent_violations_total") == 0 ==
                scraped.get("vfdirect_audit_memory_violations_total"), scraped)
        c.extra["freed_blocks_reused"] = len(old & new)
    finally:
        h.cleanup()


def _extents(mapping: Any, vdisk: str) -> list[tuple[int, int, int, int]]:
    """(LUN, start, count, first virtual block) of ``vdisk`` in a VF's mapping."""
    entries = mapping["luns"]
    assert len(entries) == 1, f"{vdisk}: the VM has one disk, not {entries}"
    entry = entries[0]
    return [(int(p["lun"]), int(p["start"]), int(p["count"]), int(p["vlba"]))
            for p in entry["layout"]["placements"]]


def _pf_io(pf: PfClient, vport: str, cdb: bytes, data: bytes | None,
           length: int = 0) -> bytes:
    """One command through the PF IO path, acting for ``vport`` at (0, 0)."""
    size = max(len(data or b""), length)
    fd = os.memfd_create("iso-pf-io", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, size)
        with mmap.mmap(fd, size) as buf:
            if data is not None:
                buf[:len(data)] = data
            buffer_id, _ = pf.pf_io_buffer_attach(fd)
            try:
                r = pf.pf_io_submit(vport, 0, 0, cdb, buffer=buffer_id, sg=[(0, size)],
                                    direction="to_device" if data is not None else
                                    "from_device")
            finally:
                pf.pf_io_buffer_detach(buffer_id)
            assert r["status"] == Status.GOOD, r
            return bytes(buf[:size])
    finally:
        os.close(fd)
