"""Self-check: the SCSI target core over a real physical LUN, through the fabric.

Builds, in a directory of its own, what a host builds before a VM may do IO: a storage
array with a physical LUN (a sparse file, or a block device given by the operator), a
fabric in which the adapter's physical port and an NPIV virtual port are logged in and
zoned with the array port, the LUN masked to the virtual port, a datastore and a thick
virtual disk carved out of it; then drives a SCSI target exposing that virtual disk with
the commands a guest's scan and IO issue, and checks every answer against SPC-4/SBC-3.
"""

from __future__ import annotations

import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from vfdirect.core.alloc import Datastore
from vfdirect.core.array import PhysicalLun
from vfdirect.core.fabric import Fabric
from vfdirect.core.ids import LunNumber, VdiskId
from vfdirect.core.scsi import (
    LogicalUnit,
    LuIdentity,
    ScsiResult,
    Status,
    Target,
    decode_lun,
    parse_report_luns,
)
from vfdirect.core.scsi import sense as sk
from vfdirect.core.wwn import Wwn
from vfdirect.storage import LunPool, StorageArray, open_vdisk


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(slots=True)
class Report:
    backing: str
    block_size: int
    lun_blocks: int
    vdisk_blocks: int
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "backing": self.backing,
            "block_size": self.block_size,
            "lun_blocks": self.lun_blocks,
            "vdisk_blocks": self.vdisk_blocks,
            "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in self.checks],
        }


class SelfCheckError(Exception):
    """The self-check could not be set up (bad size, unusable device...)."""


def _cdb10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBIBHB", op, flags, lba, 0, blocks, 0)


def _cdb16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return struct.pack(">BBQIBB", op, flags, lba, blocks, 0, 0)


def _sense_name(r: ScsiResult) -> str:
    sd = r.sense_data()
    return sd.sense.name if sd is not None else "no sense"


def _is(r: ScsiResult, expected: sk.Sense) -> bool:
    sd = r.sense_data()
    return r.status == Status.CHECK_CONDITION and sd is not None and sd.sense == expected


@contextmanager
def _workdir(directory: str | None) -> Iterator[Path]:
    if directory is not None:
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="vfdirect-selfcheck-") as tmp:
        yield Path(tmp)


def run_selfcheck(
    *,
    size_bytes: int = 64 << 20,
    block_size: int = 512,
    device: str | None = None,
    directory: str | None = None,
    progress: Callable[[Check], None] | None = None,
) -> Report:
    """Run every check; the result lists each with its outcome. Raises
    :class:`SelfCheckError` only when the storage cannot be set up at all."""
    if block_size not in (512, 4096):
        raise SelfCheckError(f"block size must be 512 or 4096, not {block_size}")
    with _workdir(directory) as work:
        array_wwn = Wwn.naa5(0xA77A0001)
        array_dir = work / "array"
        if (array_dir / "array.json").exists():
            raise SelfCheckError(f"{array_dir} already holds an array; use an empty --dir")
        array = StorageArray.create(array_dir, array_wwn)
        try:
            if device is not None:
                lun = array.lun_register_blockdev(device, lun=0)
                backing = f"block device {device}"
            else:
                blocks = size_bytes // block_size
                if blocks < 4096:
                    raise SelfCheckError(
                        f"size {size_bytes} bytes is too small: at least {4096 * block_size}"
                    )
                lun = array.lun_create(blocks, block_size=block_size, lun=0)
                backing = f"sparse file {array.lun_path(0)}"
        except OSError as exc:
            raise SelfCheckError(f"cannot set up the physical LUN: {exc}") from exc
        pool = LunPool([array])
        try:
            report = Report(backing=backing, block_size=lun.block_size,
                            lun_blocks=lun.num_blocks, vdisk_blocks=0)
            _run(array, lun, fresh=device is None, pool=pool, report=report,
                 progress=progress)
            return report
        finally:
            pool.close()


def _run(
    array: StorageArray,
    lun: PhysicalLun,
    *,
    fresh: bool,
    pool: LunPool,
    report: Report,
    progress: Callable[[Check], None] | None,
) -> None:
    lun_key, block_size, lun_blocks = lun.key, lun.block_size, lun.num_blocks
    # Fabric: the adapter's physical port logs in (FLOGI), the virtual port of the VM
    # under it (FDISC), both zoned with the array port; the LUN is masked to the vport.
    fabric = Fabric()
    array_port = array.target_ports[0]
    fabric.target_port_add(array_port, array.wwn)
    phys_wwpn, phys_wwnn = Wwn.naa5(0x100000001), Wwn.naa5(0x100000000)
    vport, vnode = Wwn.naa5(0x200000001), Wwn.naa5(0x200000000)
    fabric.flogi(phys_wwpn, phys_wwnn)
    fabric.fdisc(phys_wwpn, vport, vnode)
    fabric.zone_create("selfcheck", [array_port, vport])
    fabric.mask_grant(vport, lun_key)

    # Datastore and a thick vdisk over half of the LUN (first mapping: vdisk -> extents).
    ds = Datastore("selfcheck", block_size)
    ds.lun_add(PhysicalLun(lun_key, block_size, lun_blocks), fresh=fresh)
    for extent in ds.pending_zero():  # a block device's old content is scrubbed first
        pool.zero(extent)
        ds.mark_zeroed(extent)
    vdisk_id = VdiskId("vd-selfcheck")
    ds.vdisk_create(vdisk_id, max(ds.usage().free_blocks // 2, 1), thin=False)
    layout = ds.vdisk_layout(vdisk_id)
    vblocks = layout.capacity_blocks
    device = open_vdisk(ds, vdisk_id, luns=pool, fabric=fabric, initiator=vport)
    identity = LuIdentity(
        vendor="VFDIRECT", product="VIRTUAL DISK", revision="0001",
        serial="SELFCHECK0001", wwn=Wwn.naa5(0x300000001), target_port_wwn=vport,
        relative_target_port=1,
    )
    target = Target()
    target.add_lu(0, LogicalUnit(device, identity))
    report.vdisk_blocks = vblocks

    def check(name: str, ok: bool, detail: str) -> None:
        c = Check(name, ok, detail)
        report.checks.append(c)
        if progress is not None:
            progress(c)

    def run(cdb: bytes, *, lun: int = 0, out: bytes = b"", in_len: int = 0
            ) -> tuple[ScsiResult, bytes]:
        buf = bytearray(in_len)
        r = target.execute(lun, cdb, [memoryview(out)] if out else (),
                           [memoryview(buf)] if in_len else ())
        return r, bytes(buf[: r.data_in_len])

    r, _ = run(bytes(6))
    check("TEST UNIT READY", r.good, f"status {r.status.name}")

    r, data = run(bytes((0x12, 0, 0, 0, 96, 0)), in_len=96)
    ok = r.good and len(data) >= 36 and data[0] == 0 and data[8:16] == b"VFDIRECT"
    check("INQUIRY standard", ok, f"device type {data[0] & 0x1F if data else '?'}, "
          f"vendor {data[8:16].decode(errors='replace').strip() if data else '?'}")

    r, data = run(bytes((0x12, 1, 0x00, 0, 255, 0)), in_len=255)
    pages = list(data[4:4 + data[3]]) if r.good and len(data) >= 4 else []
    check("INQUIRY VPD 00h", r.good and {0x00, 0x80, 0x83, 0xB0} <= set(pages),
          f"pages {' '.join(f'{p:02x}' for p in pages)}")

    r, data = run(bytes((0x12, 1, 0x80, 0, 255, 0)), in_len=255)
    serial = data[4:4 + data[3]].decode(errors="replace").strip() if len(data) >= 4 else ""
    check("INQUIRY VPD 80h serial", r.good and serial == identity.serial, serial)

    r, data = run(bytes((0x12, 1, 0x83, 0, 255, 0)), in_len=255)
    found = identity.wwn.raw in data if r.good else False
    check("INQUIRY VPD 83h NAA", found, identity.wwn.canonical())

    r, data = run(bytes((0x12, 1, 0xB0, 0, 255, 0)), in_len=255)
    check("INQUIRY VPD B0h limits", r.good and len(data) >= 16 and data[1] == 0xB0,
          f"{len(data)} bytes")

    r, data = run(bytes((0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0)), in_len=4096)
    luns = [decode_lun(raw) for raw in parse_report_luns(data)] if r.good else []
    check("REPORT LUNS", luns == [LunNumber(0)], f"LUNs {luns}")

    r, data = run(bytes((0x12, 0, 0, 0, 36, 0)), lun=1, in_len=36)
    check("INQUIRY to an absent LUN", r.good and data[:1] == b"\x7f",
          "peripheral qualifier 011b, type 1Fh" if data[:1] == b"\x7f" else data[:1].hex())

    r, data = run(bytes((0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0)), in_len=8)
    last10, bl10 = struct.unpack(">II", data) if len(data) == 8 else (-1, -1)
    check("READ CAPACITY(10)", r.good and last10 == vblocks - 1 and bl10 == block_size,
          f"last LBA {last10}, block {bl10}")

    r, data = run(bytes((0x9E, 0x10)) + bytes(8) + struct.pack(">I", 32) + bytes(2), in_len=32)
    last16, bl16 = struct.unpack(">QI", data[:12]) if len(data) >= 12 else (-1, -1)
    check("READ CAPACITY(16)", r.good and last16 == vblocks - 1 and bl16 == block_size,
          f"last LBA {last16}, block {bl16}")

    nblk = 16
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(nblk * block_size))
    r, _ = run(_cdb10(0x2A, 8, nblk, flags=0x08), out=pattern)  # WRITE(10) FUA
    r2, back = run(_cdb10(0x28, 8, nblk), in_len=len(pattern))
    check("WRITE(10) FUA + READ(10)", r.good and r2.good and back == pattern,
          f"{nblk} blocks at LBA 8 read back byte for byte" if back == pattern else "mismatch")

    last_block = bytes((0xA5 ^ (i & 0xFF)) for i in range(block_size))
    r, _ = run(_cdb16(0x8A, vblocks - 1, 1), out=last_block)
    r2, back = run(_cdb16(0x88, vblocks - 1, 1), in_len=block_size)
    check("WRITE(16) + READ(16) last block", r.good and r2.good and back == last_block,
          f"LBA {vblocks - 1}")

    r, _ = run(_cdb16(0x88, vblocks - 1, 2), in_len=2 * block_size)
    check("READ past the end", _is(r, sk.LBA_OUT_OF_RANGE), _sense_name(r))

    r, _ = run(_cdb16(0x88, (1 << 64) - 1, 2), in_len=2 * block_size)
    check("READ wrapping 2^64", _is(r, sk.LBA_OUT_OF_RANGE), _sense_name(r))

    r, _ = run(bytes((0x35, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
    check("SYNCHRONIZE CACHE(10)", r.good, f"status {r.status.name}")

    r, data = run(bytes((0x1A, 0x08, 0x08, 0, 255, 0)), in_len=255)
    wce = len(data) >= 7 and data[4] == 0x08 and bool(data[6] & 0x04)
    check("MODE SENSE(6) caching page", r.good and wce, "WCE=1" if wce else data.hex())

    r, _ = run(bytes((0x04, 0, 0, 0, 0, 0)))  # FORMAT UNIT is not implemented
    check("unsupported opcode", _is(r, sk.INVALID_COMMAND_OPERATION_CODE), _sense_name(r))

    r, _ = run(bytes((0x28, 0, 0, 0, 0, 0, 0xFF, 0, 1, 0)), in_len=block_size)  # reserved byte 6
    sd = r.sense_data()
    fp = sd.field_pointer if sd is not None else None
    check("reserved bits in a CDB", _is(r, sk.INVALID_FIELD_IN_CDB) and fp is not None,
          f"{_sense_name(r)}, field pointer byte {fp.byte if fp else '?'}")

    fabric.mask_revoke(vport, lun_key)
    r, _ = run(_cdb10(0x28, 8, 1), in_len=block_size)
    check("IO after LUN masking revoked", r.status == Status.CHECK_CONDITION,
          _sense_name(r))
    fabric.mask_grant(vport, lun_key)
    r, back = run(_cdb10(0x28, 8, 1), in_len=block_size)
    check("IO after LUN masking granted again", r.good and back == pattern[:block_size],
          f"status {r.status.name}")

