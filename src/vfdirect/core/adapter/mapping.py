"""A VF's mapping table: the copy of the hypervisor's mapping info it holds (claim A4).

Rules of this module:

* an entry (:class:`LuMapping`) is addressed by (virtual target id 0..255, LUN 0..16383),
  the second mapping's virtual disk address under the VF's vport; it carries the vdisk's
  id and geometry, its first mapping (a :class:`~vfdirect.core.alloc.VdiskLayout`, in its
  own dump form) and the logical unit's identity (serial, NAA WWN) the guest will read
  in INQUIRY VPD pages 80h and 83h;
* the VF never allocates: a thin vdisk must be **fully allocated** before it is mapped
  (the hypervisor inflates it first), so a layout with a hole is refused; so are entries
  whose geometry disagrees with their layout, a vdisk or a virtual address mapped twice,
  and physical extents shared by two entries (two vdisks over the same blocks would
  corrupt each other);
* :meth:`MappingTable.dump` is canonical (entries sorted by address, layouts in their
  canonical dump), so the table read back with ``mapping_get`` equals what the
  hypervisor's inventory sent;
* every malformed input is a :class:`MappingError` naming the entry and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from vfdirect.core.alloc.errors import AllocError
from vfdirect.core.alloc.extent import Extent
from vfdirect.core.alloc.layout import VdiskLayout
from vfdirect.core.array import BLOCK_SIZES, MAX_LUN, LunKey, dump_field, parse_wwn
from vfdirect.core.ids import LunNumber, TargetId, VdiskId
from vfdirect.core.wwn import Wwn

MAPPING_FORMAT = "vfdirect.vf-mapping"
MAPPING_VERSION = 1
#: Highest virtual target id (the virtio-scsi target byte).
MAX_TARGET = 255
#: Longest LU serial number (the SCSI core's LuIdentity limit).
MAX_SERIAL_LEN = 64
#: Most LUNs one VF's table holds.
MAX_MAPPED_LUNS = 4096


class MappingError(ValueError):
    """A mapping table (or a VF record holding one) is malformed."""


def _check_serial(serial: str, where: str) -> str:
    if not serial or len(serial) > MAX_SERIAL_LEN:
        raise MappingError(f"{where}: serial must be 1..{MAX_SERIAL_LEN} characters")
    if any(not 0x20 <= ord(c) <= 0x7E for c in serial):
        # SPC-4 4.4.1: INQUIRY ASCII fields carry only 20h..7Eh
        raise MappingError(f"{where}: serial {serial!r} has characters outside ASCII 20h-7Eh")
    return serial


@dataclass(frozen=True, slots=True)
class LuMapping:
    """One virtual disk at one virtual disk address of the VF."""

    target: TargetId
    lun: LunNumber
    vdisk_id: VdiskId
    block_size: int
    capacity_blocks: int
    serial: str
    wwn: Wwn
    layout: VdiskLayout

    @property
    def address(self) -> tuple[int, int]:
        return (int(self.target), int(self.lun))

    def __post_init__(self) -> None:
        where = f"entry (target {self.target}, lun {self.lun})"
        if not 0 <= self.target <= MAX_TARGET:
            raise MappingError(f"{where}: target must be in 0..{MAX_TARGET}")
        if not 0 <= self.lun <= MAX_LUN:
            raise MappingError(f"{where}: lun must be in 0..{MAX_LUN}")
        if self.block_size not in BLOCK_SIZES:
            raise MappingError(f"{where}: block_size {self.block_size} is not one of "
                               f"{BLOCK_SIZES}")
        _check_serial(self.serial, where)
        lay = self.layout
        if (lay.vdisk_id, lay.block_size, lay.capacity_blocks) != (
            self.vdisk_id, self.block_size, self.capacity_blocks
        ):
            raise MappingError(
                f"{where}: vdisk {self.vdisk_id!r} of {self.capacity_blocks} x "
                f"{self.block_size}-byte blocks, but its layout is of {lay.vdisk_id!r}, "
                f"{lay.capacity_blocks} x {lay.block_size}"
            )
        holes = lay.num_chunks - lay.allocated_chunks
        if holes:
            raise MappingError(
                f"{where}: vdisk {self.vdisk_id!r} is thin with {holes} unallocated "
                f"chunk(s); a VF maps only fully allocated vdisks (inflate it first)"
            )

    def dump(self) -> dict[str, Any]:
        return {
            "target": int(self.target),
            "lun": int(self.lun),
            "vdisk_id": self.vdisk_id,
            "block_size": self.block_size,
            "capacity_blocks": self.capacity_blocks,
            "serial": self.serial,
            "wwn": self.wwn.canonical(),
            "layout": self.layout.dump(),
        }

    @classmethod
    def load(cls, data: Mapping[str, Any], where: str = "entry") -> LuMapping:
        err = MappingError
        try:
            layout_data = dump_field(data, "layout", Mapping, err)
            layout = VdiskLayout.load(layout_data)
        except AllocError as exc:
            raise err(f"{where}: layout: {exc}") from None
        return cls(
            target=TargetId(dump_field(data, "target", int, err)),
            lun=LunNumber(dump_field(data, "lun", int, err)),
            vdisk_id=VdiskId(dump_field(data, "vdisk_id", str, err)),
            block_size=dump_field(data, "block_size", int, err),
            capacity_blocks=dump_field(data, "capacity_blocks", int, err),
            serial=dump_field(data, "serial", str, err),
            wwn=parse_wwn(dump_field(data, "wwn", str, err), f"{where}: wwn", err),
            layout=layout,
        )


@dataclass(frozen=True, slots=True)
class MappingTable:
    """A VF's mapping table: entries sorted by (target, lun)."""

    entries: tuple[LuMapping, ...] = ()
    _by_address: dict[tuple[int, int], LuMapping] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        entries = tuple(sorted(self.entries, key=lambda e: e.address))
        object.__setattr__(self, "entries", entries)
        if len(entries) > MAX_MAPPED_LUNS:
            raise MappingError(f"a VF maps at most {MAX_MAPPED_LUNS} LUNs, not {len(entries)}")
        by_address: dict[tuple[int, int], LuMapping] = {}
        vdisks: dict[str, tuple[int, int]] = {}
        wwns: dict[Wwn, tuple[int, int]] = {}
        for e in entries:
            if e.address in by_address:
                raise MappingError(f"target {e.target} lun {e.lun} is mapped twice")
            if e.vdisk_id in vdisks:
                raise MappingError(f"vdisk {e.vdisk_id!r} is mapped at two addresses")
            if e.wwn in wwns:
                raise MappingError(f"LU WWN {e.wwn} is given to two LUNs")
            by_address[e.address] = e
            vdisks[e.vdisk_id] = e.address
            wwns[e.wwn] = e.address
        extents = sorted((p.extent, e.vdisk_id) for e in entries for p in e.layout.placements)
        for (a, va), (b, vb) in pairwise(extents):
            if a.overlaps(b):
                raise MappingError(f"vdisks {va!r} and {vb!r} share physical blocks ({a}, {b})")
        object.__setattr__(self, "_by_address", by_address)

    def __len__(self) -> int:
        return len(self.entries)

    def lookup(self, target: int, lun: int) -> LuMapping | None:
        return self._by_address.get((target, lun))

    def targets(self) -> tuple[TargetId, ...]:
        return tuple(sorted({e.target for e in self.entries}))

    def physical_luns(self) -> tuple[LunKey, ...]:
        """Every physical LUN the table reaches (what the fabric must mask to the vport)."""
        return tuple(sorted({k for e in self.entries for k in e.layout.luns()}))

    def extents(self) -> tuple[Extent, ...]:
        return tuple(p.extent for e in self.entries for p in e.layout.placements)

    def dump(self) -> dict[str, Any]:
        return {
            "format": MAPPING_FORMAT,
            "version": MAPPING_VERSION,
            "luns": [e.dump() for e in self.entries],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> MappingTable:
        err = MappingError
        if dump_field(data, "format", str, err) != MAPPING_FORMAT:
            raise err(f'"format" must be "{MAPPING_FORMAT}"')
        version = dump_field(data, "version", int, err)
        if version != MAPPING_VERSION:
            raise err(f"unsupported {MAPPING_FORMAT} version {version}")
        extra = set(data) - {"format", "version", "luns"}
        if extra:
            raise err(f"unknown fields: {', '.join(sorted(map(str, extra)))}")
        items = dump_field(data, "luns", list, err)
        if len(items) > MAX_MAPPED_LUNS:
            raise err(f"a VF maps at most {MAX_MAPPED_LUNS} LUNs, not {len(items)}")
        entries = []
        for i, item in enumerate(items):
            if not isinstance(item, Mapping):
                raise err(f"luns[{i}] must be an object")
            entries.append(LuMapping.load(item, f"luns[{i}]"))
        return cls(tuple(entries))
