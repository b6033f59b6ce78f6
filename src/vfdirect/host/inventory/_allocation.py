"""The datastore allocator over rows: a datastore's pure
:class:`~vfdirect.core.alloc.Datastore` is loaded from its member LUNs, dirty ranges and
extents, decides, and what it changed is written back, all inside the caller's write
transaction (which holds the datastore row's lock).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from vfdirect.core.alloc import AllocError, Datastore, SpaceUsage, VdiskLayout
from vfdirect.core.alloc import OutOfSpaceError as AllocOutOfSpaceError
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.ids import LunNumber
from vfdirect.host.inventory import _rows as rows
from vfdirect.host.inventory import models as m
from vfdirect.host.inventory.errors import (
    ConflictError,
    InvalidArgumentError,
    InventoryCorruptError,
    OutOfSpaceError,
)
from vfdirect.host.inventory.views import DatastoreView
from vfdirect.storage.array import BackingKind


@dataclass(slots=True)
class Allocation:
    """A datastore's allocator, loaded from its rows, and how to write it back."""

    row: m.DatastoreRow
    datastore: Datastore
    lun_ids: dict[LunKey, int]

    @classmethod
    def load(cls, s: Session, row: m.DatastoreRow) -> Allocation:
        members = s.execute(
            select(m.PhysicalLunRow, m.StorageArray.wwn)
            .join(m.DatastoreLun, m.DatastoreLun.lun_id == m.PhysicalLunRow.id)
            .join(m.StorageArray, m.StorageArray.id == m.PhysicalLunRow.array_id)
            .where(m.DatastoreLun.datastore_id == row.id)
            .order_by(m.DatastoreLun.position)
        ).all()
        keys: dict[int, LunKey] = {}
        luns: list[dict[str, Any]] = []
        for lun, array_wwn in members:
            key = LunKey(rows.parse_stored_wwn(array_wwn), LunNumber(lun.lun_number))
            keys[lun.id] = key
            luns.append(PhysicalLun(key, lun.block_size, lun.num_blocks).dump())

        def extent(lun_id: int, start: int, count: int, owner: str) -> dict[str, Any]:
            key = keys.get(lun_id)
            if key is None:
                raise InventoryCorruptError(
                    f"datastore {row.name!r}: {owner} lies on LUN row {lun_id}, "
                    "which is not a member"
                )
            return {**key.dump(), "start": start, "count": count}

        dirty = [
            extent(d.lun_id, d.start, d.count, "a dirty range")
            for d in s.scalars(
                select(m.DirtyRange)
                .where(m.DirtyRange.datastore_id == row.id)
                .order_by(m.DirtyRange.lun_id, m.DirtyRange.start)
            )
        ]
        vdisks: dict[str, dict[str, Any]] = {}
        for v in s.scalars(
            select(m.Vdisk).where(m.Vdisk.datastore_id == row.id).order_by(m.Vdisk.id)
        ):
            vdisks[v.id] = {
                "format": "vfdirect.vdisk-layout", "version": 1, "vdisk_id": v.id,
                "block_size": v.block_size, "capacity_blocks": v.capacity_blocks,
                "chunk_blocks": row.chunk_blocks, "thin": v.thin, "placements": [],
            }
        for e in s.scalars(
            select(m.ExtentRow)
            .join(m.Vdisk, m.Vdisk.id == m.ExtentRow.vdisk_id)
            .where(m.Vdisk.datastore_id == row.id)
            .order_by(m.ExtentRow.vdisk_id, m.ExtentRow.idx)
        ):
            vdisks[e.vdisk_id]["placements"].append(
                {"vlba": e.vlba, **extent(e.lun_id, e.start, e.count, f"vdisk {e.vdisk_id!r}")}
            )
        dump = {
            "format": "vfdirect.datastore", "version": 1, "name": row.name,
            "block_size": row.block_size, "chunk_blocks": row.chunk_blocks,
            "luns": luns, "dirty": dirty, "vdisks": list(vdisks.values()),
        }
        try:
            datastore = Datastore.load(dump)
        except AllocError as exc:
            raise InventoryCorruptError(f"datastore {row.name!r}: {exc}") from None
        return cls(row, datastore, {k: i for i, k in keys.items()})

    def save_layout(self, s: Session, layout: VdiskLayout) -> None:
        """Replace the vdisk's extent rows with ``layout``'s placements (the first
        mapping, claim A2)."""
        s.execute(delete(m.ExtentRow).where(m.ExtentRow.vdisk_id == layout.vdisk_id))
        s.add_all(
            m.ExtentRow(
                vdisk_id=layout.vdisk_id, idx=i, vlba=int(p.vlba),
                lun_id=self.lun_ids[p.extent.lun], start=int(p.extent.start),
                count=p.extent.count,
            )
            for i, p in enumerate(layout.placements)
        )
        s.flush()

    def save_dirty(self, s: Session) -> None:
        """Replace the datastore's dirty-range rows with the allocator's (canonical) ones."""
        s.execute(delete(m.DirtyRange).where(m.DirtyRange.datastore_id == self.row.id))
        s.add_all(
            m.DirtyRange(
                datastore_id=self.row.id, lun_id=self.lun_ids[e.lun], start=int(e.start),
                count=e.count,
            )
            for e in self.datastore.pending_zero()
        )
        s.flush()


def out_of_space(exc: AllocOutOfSpaceError, what: str) -> OutOfSpaceError:
    return OutOfSpaceError(
        f"{what}: {exc}", needed_blocks=exc.needed_blocks, free_blocks=exc.free_blocks,
        dirty_blocks=exc.dirty_blocks,
    )


# -- datastores ---------------------------------------------------------------------------


def datastore_add_lun(s: Session, alloc: Allocation, key: LunKey, fresh: bool | None) -> None:
    lun = rows.lun(s, key, lock=True)
    member = s.get(m.DatastoreLun, lun.id)
    if member is not None:
        owner = s.get_one(m.DatastoreRow, member.datastore_id).name
        raise ConflictError(f"LUN {key} is already in datastore {owner!r}")
    if fresh is None:
        fresh = lun.backing == BackingKind.FILE.value
    try:
        alloc.datastore.lun_add(PhysicalLun(key, lun.block_size, lun.num_blocks), fresh=fresh)
    except AllocError as exc:
        raise InvalidArgumentError(f"datastore {alloc.row.name!r}: {exc}") from None
    last = s.scalar(select(func.max(m.DatastoreLun.position))
                    .where(m.DatastoreLun.datastore_id == alloc.row.id))
    s.add(m.DatastoreLun(lun_id=lun.id, datastore_id=alloc.row.id,
                         position=0 if last is None else last + 1))
    s.flush()
    alloc.lun_ids[key] = lun.id



def datastore_view(s: Session, alloc: Allocation) -> DatastoreView:
    usage: SpaceUsage = alloc.datastore.usage()
    count = s.scalar(select(func.count()).select_from(m.Vdisk)
                     .where(m.Vdisk.datastore_id == alloc.row.id)) or 0
    r = alloc.row
    return DatastoreView(r.name, r.block_size, r.chunk_blocks, alloc.datastore.luns(), usage,
                         count, r.created_at)


