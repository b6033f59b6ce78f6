"""Fuzz target ``scsi_cdb``: the SCSI target core over a real block backend.

A storage array in a temporary directory (one sparse-file physical LUN), the fabric with
a vport masked to it, two thick vdisks carved out of the LUN (the fuzzed one exposed as
LUN 0 of a :class:`~vfdirect.core.scsi.Target`, and a neighbour), and every physical
read or write audited against the fuzzed vdisk's extents.

Each input is one command: the LUN number, the CDB (any bytes), and data buffers whose
sizes come from the input. Invariants (a violation is a crash input):

* ``Target.execute`` returns a status and never raises; no internal error is counted;
* CHECK CONDITION carries decodable sense; an opcode the target does not implement gets
  ILLEGAL REQUEST, INVALID COMMAND OPERATION CODE; transfers stay within the buffers;
* no physical IO falls outside the fuzzed vdisk's extents (auditor), and the bytes of the
  LUN outside those extents are unchanged (hash checked every 512 inputs).

Run: ``.venv/bin/python fuzz/fuzz_scsi_cdb.py -max_total_time=60 -seed=1 [corpus]``.
"""

from __future__ import annotations

import hashlib
import struct
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import atheris
import fuzzlib
from fuzzlib import Stats, Violation

with atheris.instrument_imports(include=["vfdirect"]):
    from vfdirect.core.alloc import Datastore
    from vfdirect.core.array import LunKey, PhysicalLun
    from vfdirect.core.fabric import Fabric
    from vfdirect.core.ids import VdiskId
    from vfdirect.core.scsi import LogicalUnit, LuIdentity, Status, Target
    from vfdirect.core.scsi import sense as sk
    from vfdirect.core.scsi.opcodes import Opcode
    from vfdirect.core.scsi.sense import SenseKey, decode_sense
    from vfdirect.core.wwn import Wwn
    from vfdirect.storage import LunPool, StorageArray, open_vdisk

TARGET = "scsi_cdb"
LUN_BLOCKS = 8192
BLOCK = 512
HASH_EVERY = 512


class AuditedLun:
    """A physical LUN backend that counts every IO and those outside ``allowed``
    (``[start, end)`` block ranges)."""

    def __init__(self, inner: Any, allowed: list[tuple[int, int]], stats: Stats) -> None:
        self.inner = inner
        self.allowed = allowed
        self.stats = stats

    @property
    def block_size(self) -> int:
        return int(self.inner.block_size)

    @property
    def num_blocks(self) -> int:
        return int(self.inner.num_blocks)

    def _check(self, lba: int, bufs: Sequence[memoryview]) -> None:
        blocks = sum(b.nbytes for b in bufs) // self.block_size
        self.stats.add("audit_checks")
        if not any(s <= lba and lba + blocks <= e for s, e in self.allowed):
            self.stats.add("extent_violations")
            self.stats.flush()
            raise Violation(f"physical IO of {blocks} blocks at {lba} outside the vdisk's "
                            f"extents {self.allowed}")

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self._check(lba, bufs)
        self.inner.read_blocks(lba, bufs)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self._check(lba, bufs)
        self.inner.write_blocks(lba, bufs, fua=fua)

    def flush(self) -> None:
        self.inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def setup() -> Callable[[bytes], None]:
    stats = Stats(TARGET)
    work = Path(tempfile.mkdtemp(prefix="vfd-fuzz-scsi-", dir=fuzzlib.config().get("tmp")))
    array = StorageArray.create(work / "array", Wwn.naa5(0xF0220001))
    lun = array.lun_create(LUN_BLOCKS, block_size=BLOCK, lun=0)
    fabric = Fabric()
    port = array.target_ports[0]
    fabric.target_port_add(port, array.wwn)
    phys, vport = Wwn.naa5(0xF0220010), Wwn.naa5(0xF0220020)
    fabric.flogi(phys, Wwn.naa5(0xF0220011))
    fabric.fdisc(phys, vport, Wwn.naa5(0xF0220021))
    fabric.zone_create("fuzz", [port, vport])
    fabric.mask_grant(vport, lun.key)
    ds = Datastore("fuzz", BLOCK, chunk_blocks=64)
    ds.lun_add(PhysicalLun(lun.key, BLOCK, LUN_BLOCKS), fresh=True)
    ds.vdisk_create(VdiskId("vd-before"), 100, thin=False)
    ds.vdisk_create(VdiskId("vd-fuzz"), 1000, thin=False)
    ds.vdisk_create(VdiskId("vd-after"), 300, thin=False)
    extents = ds.vdisk_layout(VdiskId("vd-fuzz")).extents()
    allowed = [(int(e.start), int(e.end)) for e in extents]
    pool = LunPool([array])
    audited = AuditedLun(pool.get(lun.key), allowed, stats)

    def luns(key: LunKey) -> Any:
        return audited if key == lun.key else pool.get(key)

    device = open_vdisk(ds, VdiskId("vd-fuzz"), luns=luns, fabric=fabric, initiator=vport)
    # the neighbours are written once, so that a stray write would change their bytes
    path = array.lun_path(0)
    with open(path, "r+b") as f:
        f.write(bytes(range(256)) * (LUN_BLOCKS * BLOCK // 256))
    identity = LuIdentity(vendor="VFDIRECT", product="FUZZ DISK", revision="0001",
                          serial="FUZZ0001", wwn=Wwn.naa5(0xF0220030), target_port_wwn=vport,
                          relative_target_port=1)
    target = Target()
    target.add_lu(0, LogicalUnit(device, identity))

    def outside_hash() -> str:
        h = hashlib.sha256()
        data = path.read_bytes()
        pos = 0
        for s, e in sorted(allowed):
            h.update(data[pos * BLOCK:s * BLOCK])
            pos = e
        h.update(data[pos * BLOCK:])
        return h.hexdigest()

    baseline = outside_hash()
    known = {int(o) for o in Opcode}

    def test_one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        lun_no = fdp.PickValueInList([0, 0, 0, 0, 1, 16383, fdp.ConsumeIntInRange(0, 20000)])
        out_len = fdp.PickValueInList([0, 0, 512, 4096, fdp.ConsumeIntInRange(0, 70000)])
        in_len = fdp.PickValueInList([0, 255, 512, 4096, fdp.ConsumeIntInRange(0, 70000)])
        split = fdp.ConsumeIntInRange(0, 3)
        mode = fdp.ConsumeIntInRange(0, 2)
        if mode == 0:  # a known opcode, the rest of the CDB fuzzed
            op = fdp.PickValueInList(sorted(known))
            cdb = bytes([op]) + fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 31))
        elif mode == 1:  # READ/WRITE(10/16) near and past the end of the vdisk
            op = fdp.PickValueInList([0x28, 0x2A, 0x88, 0x8A])
            lba, blocks = fdp.ConsumeIntInRange(0, 1100), fdp.ConsumeIntInRange(0, 16)
            flags = fdp.PickValueInList([0, 0x08, fdp.ConsumeIntInRange(0, 255)])
            cdb = (struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0) if op < 0x80 else
                   struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0))
            if op in (0x2A, 0x8A):
                out_len = blocks * BLOCK if fdp.ConsumeIntInRange(0, 3) else out_len
            else:
                in_len = blocks * BLOCK if fdp.ConsumeIntInRange(0, 3) else in_len
        else:
            cdb = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
        out = bytearray(fdp.ConsumeBytes(out_len).ljust(out_len, b"\xA5"))
        inbuf = bytearray(in_len)
        stats.add("inputs")
        try:
            result = target.execute(lun_no, cdb, _cut(out, split), _cut(inbuf, split))
        except Exception as exc:  # the core promises never to raise
            stats.flush()
            raise Violation(f"Target.execute raised {exc!r} for CDB {cdb.hex()}") from exc
        errors = target.internal_errors + sum(
            lu.internal_errors for n in target.luns() if (lu := target.lu(n)) is not None)
        if errors:
            stats.add("internal_errors", errors)
            stats.flush()
            raise Violation(f"internal error counted for CDB {cdb.hex()} (LUN {lun_no})")
        stats.add("completion_checks")
        if not isinstance(result.status, Status):
            raise Violation(f"status {result.status!r} is not a SAM-5 status")
        if result.data_in_len > in_len or result.data_out_len > out_len:
            raise Violation(f"transfer past the buffers for CDB {cdb.hex()}: {result}")
        if result.status == Status.CHECK_CONDITION:
            stats.add("rejected")
            stats.add("check_conditions")
            try:
                sd = decode_sense(result.sense)
            except Exception as exc:
                raise Violation(f"undecodable sense {result.sense.hex()}") from exc
            stats.add(f"sense_key_{sd.sense.key.name.lower()}")
            if lun_no == 0 and cdb and cdb[0] not in known:
                if sd.sense != sk.INVALID_COMMAND_OPERATION_CODE:
                    raise Violation(f"unknown opcode {cdb[0]:#x} got {sd.sense}")
                stats.add("invalid_opcode")
            if sd.sense.key == SenseKey.ILLEGAL_REQUEST:
                stats.add("illegal_request")
        else:
            stats.add("processed")
            stats.add(f"status_{result.status.name.lower()}")
        if stats.counts["inputs"] % HASH_EVERY == 0:
            stats.add("outside_hash_checks")
            if outside_hash() != baseline:
                stats.add("extent_violations")
                stats.flush()
                raise Violation("LUN bytes outside the fuzzed vdisk's extents changed")
        stats.tick()

    return test_one


def _cut(buf: bytearray, pieces: int) -> list[memoryview]:
    if not buf:
        return []
    view = memoryview(buf)
    step = max(1, len(buf) // (pieces + 1))
    return [view[i:i + step] for i in range(0, len(buf), step)]


if __name__ == "__main__":
    fuzzlib.main(TARGET, setup)
