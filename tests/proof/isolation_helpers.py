"""Helpers of the isolation suite (issue 8): the two-VM rig on one audited adapter, and
the suite's counters (printed, and written to ``artifacts/proof/isolation.json``).

The rig reuses the adapter and VM test helpers (``tests/adapter``, ``tests/vm``): an
adapter daemon started with ``--audit``; VM A is the test process itself (a vhost-user
front end over a shared-memory guest, on VF 0, vport A masked LUNs 0-1), so that the
tests can address anything through A's VF; VM B is a real VM process running the verify
workload on VF 1 (vport B, masked LUNs 0-2): its disk b0 lives on LUN 2, which A's vport
is not masked to, and b1 on the datastore A's disks come from (LUNs 0-1)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1]
for _sub in ("adapter", "vm", "core/guest", "host"):
    if str(_TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(_TESTS / _sub))

from daemon_helpers import ARRAY_WWN, CHUNK, Daemon, entry, make_san  # noqa: E402
from vf_frontend_helpers import DATA_BASE, DATA_STRIDE, RESP_SIZE, FrontEnd, rw  # noqa: E402
from vf_test_helpers import lun_bytes, mem_path, wait_for, wait_state  # noqa: E402
from vm_helpers import VmProc, shm_path, unlink  # noqa: E402

from vfdirect.adapter.pf_client import PfClient  # noqa: E402
from vfdirect.core.alloc import Datastore, VdiskLayout  # noqa: E402
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk  # noqa: E402
from vfdirect.core.ids import VdiskId  # noqa: E402
from vfdirect.core.scsi import Status  # noqa: E402
from vfdirect.core.virtio.scsi import ScsiRequestHeader, VirtioScsiResponse  # noqa: E402
from vfdirect.core.wwn import Wwn  # noqa: E402
from vfdirect.storage import StorageArray  # noqa: E402

__all__ = [
    "ARRAY_WWN", "CHUNK", "Counters", "Daemon", "FrontEnd", "Rig", "VmProc", "lun_bytes",
    "make_san", "rw", "start_rig", "wait_for", "wait_state",
]

TIMEOUT_S = 15.0
VPORT_A = Wwn.naa5(0x6A01)
VPORT_A_NN = Wwn.naa5(0x6A02)
VPORT_B = Wwn.naa5(0x6B01)
VPORT_B_NN = Wwn.naa5(0x6B02)
#: one block of VM A's pattern (every block of its disks is written with it)
PATTERN = (b"ISOLATION-VM-A\xa5" * 35)[:512]


@dataclass
class Counters:
    """What the suite did: checks asserted, faults injected, IOs in flight at each."""

    suite: str
    checks: int = 0
    faults: int = 0
    inflight: list[int] = field(default_factory=list)
    ios: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self, ok: object, what: str = "") -> None:
        """Count one check and assert it."""
        self.checks += 1
        assert ok, what

    def fault(self, in_flight: int) -> None:
        self.faults += 1
        self.inflight.append(in_flight)

    def dump(self) -> dict[str, Any]:
        return {"suite": self.suite, "checks": self.checks, "faults": self.faults,
                "inflight_sum": sum(self.inflight),
                "inflight_max": max(self.inflight, default=0), "ios": self.ios,
                **self.extra}

    def publish(self) -> None:
        """Print the counters and write them as one JSON line under artifacts/proof."""
        line = json.dumps(self.dump(), sort_keys=True)
        print(f"\n[proof] {line}")
        root = Path(__file__).resolve().parents[2]
        with contextlib.suppress(OSError):
            out = root / "artifacts" / "proof"
            os.makedirs(out, exist_ok=True)
            (out / f"{self.suite}.json").write_text(line + "\n")


@dataclass
class Rig:
    san: StorageArray
    adapter: Daemon
    pf: PfClient
    a: FrontEnd
    a_mem: Path
    b: VmProc
    b_mem: Path
    layouts: dict[str, VdiskLayout]
    counters: Counters

    def audit(self) -> dict[str, Any]:
        return dict(self.pf.adapter_get_stats()["audit"])

    def vf_io(self, vf: int) -> dict[str, Any]:
        return dict(self.pf.adapter_get_stats()["vfs"][vf]["io"] or {})

    def outstanding(self, vf: int) -> int:
        return int(self.pf.adapter_get_stats()["vfs"][vf]["outstanding"])

    def b_progress(self) -> dict[str, Any]:
        events = [e for e in self.b.events() if e["event"] == "verify_progress"]
        return events[-1] if events else {"writes": 0, "verified": 0, "errors": 0}

    def wait_b_beyond(self, before: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """VM B's verify made progress past ``before`` (writes and verified reads)."""
        deadline = time.monotonic() + timeout
        while True:
            now = self.b_progress()
            if int(now["writes"]) > int(before["writes"]) and \
                    int(now["verified"]) > int(before["verified"]):
                return now
            assert self.b.proc.poll() is None, self.b.err_path.read_text()[-3000:]
            assert time.monotonic() < deadline, f"VM B made no progress beyond {before}"
            time.sleep(0.05)

    def write_a(self, target: int, lun: int, lba: int, blocks: int) -> Any:
        return self.a.scsi(target, lun, rw(0x2A, lba, blocks), data_out=PATTERN * blocks)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pf.close()
        with contextlib.suppress(Exception):
            self.a.close()
        self.b.stop()
        self.adapter.stop()
        unlink(self.b_mem)
        unlink(self.a_mem)


def _layouts(san: StorageArray) -> dict[str, VdiskLayout]:
    ds0 = Datastore("ds0", 512, chunk_blocks=CHUNK)
    for n in (0, 1):
        ds0.lun_add(san.lun_get(n), fresh=True)
    ds2 = Datastore("ds2", 512, chunk_blocks=CHUNK)
    ds2.lun_add(san.lun_get(2), fresh=True)
    return {"a0": ds0.vdisk_create(VdiskId("a0"), 256),
            "b1": ds0.vdisk_create(VdiskId("b1"), 512),
            "a1": ds0.vdisk_create(VdiskId("a1"), 384),
            "b0": ds2.vdisk_create(VdiskId("b0"), 512)}


def _doc(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"format": "vfdirect.vf-mapping", "version": 1, "luns": list(entries)}


def start_rig(root: Path, name: str, counters: Counters) -> Rig:
    """The adapter (audited), VM A (this process, VF 0) and VM B (verify, VF 1)."""
    san = make_san(root / "san")
    adapter = Daemon(root / "host", "--audit").wait_ready()
    pf = PfClient(adapter.sock, timeout=TIMEOUT_S)
    a_mem = mem_path(root, "vm-a")
    b_mem = shm_path(f"iso-{name}"[:40])
    lay = _layouts(san)
    doc_a = _doc(entry(0, 0, lay["a0"]), entry(0, 1, lay["a1"]))
    doc_b = _doc(entry(0, 0, lay["b0"]), entry(0, 1, lay["b1"]))
    pf.array_attach(san.directory)
    pf.vf_enable(4)
    pf.vport_create(VPORT_A, VPORT_A_NN)
    pf.vport_create(VPORT_B, VPORT_B_NN)
    pf.fabric_zone_create("vms", [VPORT_A, VPORT_B, *san.target_ports])
    pf.fabric_mask_grant(VPORT_A, ARRAY_WWN, [0, 1])
    pf.fabric_mask_grant(VPORT_B, ARRAY_WWN, [0, 1, 2])
    # VM B: a VM process, paused until its VF is ready
    table = root / "fw-b.json"
    sock_b = str(adapter.run_dir / "vf1.sock")
    table.write_text(json.dumps(FirmwareTable("vm-b", "vm-b-uuid", sock_b, tuple(
        FwDisk(VPORT_B, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
               e["block_size"], e["serial"], Wwn.parse(e["wwn"]))
        for e in doc_b["luns"])).dump()))
    b = VmProc(root, "vm-b", "--memory-file", str(b_mem), "--memory-size", "8MiB",
               "--fwtable", str(table), "--workload", "verify", "--depth", "4",
               "--window", "64", "--progress-ms", "100", "--paused")
    a: FrontEnd | None = None
    try:
        b.wait_event("vm_paused")
        pf.vf_assign(1, "vm-b", b.pid)
        pf.vport_bind(VPORT_B, 1)
        pf.mapping_load(1, doc_b)
        b.go()
        # VM A: this process
        sock_a = str(pf.vf_assign(0, "vm-a", os.getpid())["socket_path"])
        pf.vport_bind(VPORT_A, 0)
        pf.mapping_load(0, doc_a)
        a = FrontEnd(sock_a, a_mem).setup()
        wait_state(pf, 0, "CONNECTED")
        wait_state(pf, 1, "CONNECTED")
    except BaseException:
        if a is not None:
            a.close()
        pf.close()
        b.stop()
        adapter.stop()
        unlink(b_mem)
        unlink(a_mem)
        raise
    return Rig(san, adapter, pf, a, a_mem, b, b_mem, lay, counters)


def extent_blocks(layout: VdiskLayout) -> list[tuple[int, int, int]]:
    """(LUN number, first block, block count) of each placement of ``layout``."""
    return [(int(p.extent.lun.lun), int(p.extent.start), p.extent.count)
            for p in layout.placements]


def blocks_with_pattern(san: StorageArray, lun: int, start: int, count: int) -> int:
    """How many blocks of ``[start, start+count)`` on LUN ``lun`` hold VM A's pattern."""
    data = lun_bytes(san, lun, start, count)
    return sum(1 for i in range(0, len(data), 512) if data[i:i + 512] == PATTERN)


OK = (VirtioScsiResponse.OK, Status.GOOD)
#: guest-memory room of one request submitted without waiting (header, data, response)
SLOT = 0x2000


def submit_writes(fe: FrontEnd, lun: int, lbas: list[int], data: bytes,
                  queue: int = 3) -> list[int]:
    """WRITE(10)s of ``data`` (one block) at each of ``lbas``, put in request queue
    ``queue`` and kicked, without waiting for them: they are in flight as the guest
    sees it. The heads, in order."""
    heads = []
    base = DATA_BASE + (queue - 2) * DATA_STRIDE
    for k, lba in enumerate(lbas):
        slot = base + k * SLOT
        raw = ScsiRequestHeader.build(0, lun, rw(0x2A, lba, 1)).encode()
        fe.memory.write(slot, raw)
        fe.memory.write(slot + 0x100, data)
        fe.memory.write(slot + 0x100 + len(data), bytes(RESP_SIZE))
        heads.append(fe.submit(queue, [(slot, len(raw)), (slot + 0x100, len(data))],
                               [(slot + 0x100 + len(data), RESP_SIZE)]))
    return heads
