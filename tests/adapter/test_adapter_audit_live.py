"""The adapter's auditor (issue 8): it has teeth (a deliberately wrong translation or
memory table injected in-process is counted), and through a real adapter run with
``--audit`` a verify VM and the PF IO path count checks and no violation."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import sys
from pathlib import Path
from typing import Any

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for _sub in ("vm", "core/guest"):
    if str(_TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(_TESTS / _sub))

from daemon_helpers import CHUNK, Daemon, make_san, vm_mapping  # noqa: E402
from test_vm_adapter import VPORT, assign, fwtable, prepare  # noqa: E402
from vm_helpers import VmProc, shm_path, unlink  # noqa: E402

from vfdirect.adapter.audit import Auditor  # noqa: E402
from vfdirect.adapter.pf_client import PfClient  # noqa: E402
from vfdirect.core.adapter.mapping import MappingTable  # noqa: E402
from vfdirect.core.alloc.extent import Extent  # noqa: E402
from vfdirect.core.alloc.layout import Placement, VdiskLayout  # noqa: E402
from vfdirect.core.array import LunKey  # noqa: E402
from vfdirect.core.ids import LunNumber, PhysicalLba  # noqa: E402
from vfdirect.core.virtio import GuestMemoryError, MemoryRegion  # noqa: E402
from vfdirect.core.wwn import Wwn  # noqa: E402
from vfdirect.host.metrics import _audit_metrics  # noqa: E402
from vfdirect.storage.pool import LunPool  # noqa: E402
from vfdirect.storage.vdisk import VdiskBlockDevice  # noqa: E402

TIMEOUT_S = 15.0
INITIATOR = Wwn.naa5(0x6391)


class _Everyone:
    """A fabric that lets every IO through: the test is about the auditor, not masking."""

    def authorize(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> None:
        return None


def _shifted(layout: VdiskLayout, by: int) -> VdiskLayout:
    """The same vdisk, every placement moved ``by`` blocks on its LUN: a wrong
    translation (as a corrupted layout or a bug in the VF would produce)."""
    return VdiskLayout(layout.vdisk_id, layout.block_size, layout.capacity_blocks,
                       layout.chunk_blocks, layout.thin,
                       tuple(Placement(p.vlba, Extent(p.extent.lun,
                                                      PhysicalLba(p.extent.start + by),
                                                      p.extent.count))
                             for p in layout.placements))


@pytest.mark.timeout(30)
def test_the_auditor_counts_a_shifted_translation(tmp_path: Path) -> None:
    san = make_san(tmp_path / "san")
    doc, layouts = vm_mapping(san)
    table = MappingTable.load(doc)
    auditor = Auditor()
    scope = auditor.scope(0, [table])
    pool = LunPool([san])
    try:
        def device(layout: VdiskLayout) -> VdiskBlockDevice:
            return VdiskBlockDevice(
                layout, luns=lambda key: auditor.wrap_lun(scope, key, pool.get(key)),
                fabric=_Everyone(), initiator=INITIATOR)

        # the right translation: every block of vd-c (LUN 2, 128 blocks) passes
        good = device(layouts["vd-c"])
        data = memoryview(bytearray(os.urandom(128 * 512)))
        good.write_blocks(0, [data])
        good.read_blocks(0, [memoryview(bytearray(128 * 512))])
        good.flush()
        snap = auditor.snapshot()
        assert snap["extent_checks"] == 3 and snap["extent_violations"] == 0, snap
        # shifted by 4 chunks: the IO leaves the mapping's extents and is counted
        bad = device(_shifted(layouts["vd-c"], 4 * CHUNK))
        bad.write_blocks(8, [data[:16 * 512]])
        bad.read_blocks(120, [memoryview(bytearray(8 * 512))])
        snap = auditor.snapshot()
        assert snap["extent_violations"] == 2, snap
        first = snap["violations"][0]
        assert first == {"vf": 0, "kind": "extent", "op": "write",
                         "address": 4 * CHUNK + 8, "length": 16,
                         "lun": f"{san.wwn.canonical().lower()}/2"}
        assert auditor.vf_snapshot(0)["extent_violations"] == 2
        # ... and not fixed: the write landed where the wrong translation said
        with open(san.lun_path(2), "rb") as f:
            f.seek((4 * CHUNK + 8) * 512)
            assert f.read(16 * 512) == bytes(data[:16 * 512])
        # a LUN outside the mapping: even a flush is a violation
        other = LunKey(san.wwn, LunNumber(2))
        empty = Auditor.scope(5, [])
        auditor.wrap_lun(empty, other, pool.get(other)).flush()
        assert auditor.snapshot()["extent_violations"] == 3
    finally:
        pool.close()


def test_the_auditor_counts_memory_outside_the_granted_table() -> None:
    auditor = Auditor()
    # the VF mapped two pages, the front end granted one: the bounds checks of the
    # memory pass, the audit (from the table as sent) does not
    memory = auditor.memory(3, [MemoryRegion(0x10000, memoryview(bytearray(0x2000)))],
                            granted=[(0x10000, 0x1000)])
    memory.store_u16(0x10010, 7)
    assert memory.load_u16(0x10010) == 7
    memory.write(0x10ff0, b"x" * 16)
    assert auditor.snapshot()["memory_violations"] == 0
    assert memory.read(0x10ff8, 16) == b"x" * 8 + bytes(8)  # 8 bytes past the grant
    memory.views(0x11800, 64)
    snap = auditor.snapshot()
    assert (snap["memory_checks"], snap["memory_violations"]) == (5, 2), snap
    assert snap["violations"][0] == {"vf": 3, "kind": "memory", "op": "read",
                                     "address": 0x10ff8, "length": 16}
    # an access the memory refuses did not happen: checked by nobody, not a violation
    with pytest.raises(GuestMemoryError):
        memory.read(0x20000, 4)
    assert auditor.snapshot()["memory_checks"] == 5


def _audit_of(pf: PfClient) -> dict[str, Any]:
    return dict(pf.adapter_get_stats()["audit"])


def _rw10(op: int, lba: int, blocks: int) -> bytes:
    return bytes([op, 0]) + lba.to_bytes(4, "big") + bytes([0]) + \
        blocks.to_bytes(2, "big") + bytes([0])


@pytest.mark.timeout(90)
@pytest.mark.parametrize("io_threads", [0, 2])
def test_audited_adapter_counts_checks_and_no_violation(
        tmp_path: Path, request: pytest.FixtureRequest, io_threads: int) -> None:
    san = make_san(tmp_path / "san")
    memfile = shm_path(f"audit-live-{io_threads}-{os.getpid()}")
    adapter = Daemon(tmp_path / "host1", "--audit", "--io-threads", str(io_threads))
    vm: VmProc | None = None
    fd = os.memfd_create("audit-pf-io", os.MFD_CLOEXEC)
    try:
        adapter.wait_ready()
        assert any(e["event"] == "adapter_ready" and e.get("audit") is True
                   for e in adapter.events())
        with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
            assert _audit_of(pf)["checks"] == 0
            doc = prepare(pf, san, masked=(0, 1, 2))
            table = tmp_path / "fw.json"
            table.write_text(json.dumps(fwtable(doc, str(adapter.run_dir / "vf0.sock"))
                                        .dump()))
            vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size",
                        "8MiB", "--fwtable", str(table), "--workload", "verify",
                        "--depth", "4", "--window", "48", "--count", "300", "--paused")
            vm.wait_event("vm_paused")
            assign(pf, vm.pid, doc)
            vm.go()
            code, result = vm.result()
            assert code == 0 and result["ok"] and result["errors"] == 0, result
            # the PF IO path, acting for the VF's vport: one write, one read
            os.ftruncate(fd, 1 << 16)
            with mmap.mmap(fd, 1 << 16) as buf:
                buffer_id, _ = pf.pf_io_buffer_attach(fd)
                buf[0:4096] = os.urandom(4096)
                w = pf.pf_io_submit(VPORT, 0, 1, _rw10(0x2A, 100, 8), buffer=buffer_id,
                                    sg=[(0, 4096)], direction="to_device")
                r = pf.pf_io_submit(VPORT, 0, 1, _rw10(0x28, 100, 8), buffer=buffer_id,
                                    sg=[(8192, 4096)], direction="from_device")
                assert w["status"] == r["status"] == 0
                assert buf[8192:8192 + 4096] == buf[0:4096]
                pf.pf_io_buffer_detach(buffer_id)
            audit = _audit_of(pf)
            per_vf = pf.adapter_get_stats()["vfs"][0]["io"]["audit"]
        keys = ("checks", "memory_checks", "extent_checks", "memory_violations",
                "extent_violations")
        line = json.dumps({"suite": "audit", "io_threads": io_threads, "faults": 0,
                           "ios": result["writes"] + result["reads"] + 2,
                           **{k: audit[k] for k in keys}}, sort_keys=True)
        print("\n[proof]", line)
        with contextlib.suppress(OSError):
            out = _TESTS.parent / "artifacts" / "proof"
            os.makedirs(out, exist_ok=True)
            (out / f"audit-io{io_threads}.json").write_text(line + "\n")
        assert audit["enabled"] is True
        assert audit["memory_checks"] > 1000 and audit["extent_checks"] >= result["writes"]
        assert audit["memory_violations"] == audit["extent_violations"] == 0, audit
        assert audit["violations"] == []
        assert per_vf["memory_checks"] > 0 and per_vf["extent_checks"] > 0
        # the two PF IOs were checked against VF 0's mapping
        assert audit["extent_checks"] >= per_vf["extent_checks"]
        assert not [e for e in adapter.events() if e["event"] == "audit_violation"]
    finally:
        os.close(fd)
        if vm is not None:
            vm.stop()
        adapter.stop()
        unlink(memfile)


@pytest.mark.timeout(30)
def test_audit_off_by_default_and_on_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Daemon(tmp_path / "plain")
    try:
        plain.wait_ready()
        with PfClient(plain.sock, timeout=TIMEOUT_S) as pf:
            assert pf.adapter_get_stats()["audit"] == {"enabled": False}
    finally:
        plain.stop()
    monkeypatch.setenv("VFDIRECT_AUDIT", "1")
    audited = Daemon(tmp_path / "env")
    try:
        audited.wait_ready()
        with PfClient(audited.sock, timeout=TIMEOUT_S) as pf:
            assert pf.adapter_get_stats()["audit"]["enabled"] is True
    finally:
        audited.stop()


def test_audit_counters_in_prometheus_form() -> None:
    assert list(_audit_metrics("h1", {"enabled": False})) == []
    families = {f.name: f for f in _audit_metrics(
        "h1", {"enabled": True, "checks": 12, "memory_violations": 0,
               "extent_violations": 1})}
    assert set(families) == {"vfdirect_audit_checks", "vfdirect_audit_memory_violations",
                             "vfdirect_audit_extent_violations"}
    assert families["vfdirect_audit_checks"].samples[0].value == 12.0
    assert families["vfdirect_audit_extent_violations"].samples[0].value == 1.0
