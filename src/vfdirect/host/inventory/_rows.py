"""Rows in, records out: the inventory's lookups (each raising
:class:`~.errors.NotFoundError` naming what it looked for), its WWN registry, and the
building of :mod:`.views` records from rows, all inside the caller's transaction.

Lookups with ``lock=True`` take the row's lock (``SELECT ... FOR UPDATE`` on PostgreSQL)
before the caller decides anything from it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from vfdirect.core.alloc import Extent, LayoutError, Placement, VdiskLayout
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.ids import LunNumber, PhysicalLba, TargetId, VdiskId, VfIndex, VirtualLba
from vfdirect.core.wwn import Wwn, WwnError
from vfdirect.host.inventory import models as m
from vfdirect.host.inventory.errors import DuplicateWwnError, InventoryCorruptError, NotFoundError
from vfdirect.host.inventory.names import WwnKind
from vfdirect.host.inventory.views import (
    ArrayView,
    EventView,
    HostState,
    HostView,
    LunView,
    MappingEntry,
    MappingInfo,
    MigrationView,
    VdiskAddress,
    VdiskView,
    VmRuntime,
    VmState,
    VmView,
    VportView,
)
from vfdirect.storage.array import BackingKind

_Q = TypeVar("_Q", bound=Select[Any])


def parse_stored_wwn(text: str) -> Wwn:
    try:
        return Wwn.parse(text)
    except WwnError as exc:
        raise InventoryCorruptError(f"stored WWN {text!r}: {exc}") from None


# -- lookups ------------------------------------------------------------------------------


def locked(q: _Q) -> _Q:
    """``q`` with ``FOR UPDATE`` (PostgreSQL; SQLite's write transaction already holds
    the database's only write lock), re-reading the rows the session may hold already:
    under READ COMMITTED, what committed before the lock was granted is what counts."""
    return q.with_for_update().execution_options(populate_existing=True)


def host(s: Session, name: str) -> m.Host:
    row = s.scalar(select(m.Host).where(m.Host.name == name))
    if row is None:
        raise NotFoundError(f"no host {name!r}")
    return row


def array(s: Session, wwn: Wwn) -> m.StorageArray:
    row = s.scalar(select(m.StorageArray).where(m.StorageArray.wwn == wwn.canonical()))
    if row is None:
        raise NotFoundError(f"no storage array {wwn}")
    return row


def lun(s: Session, key: LunKey, *, lock: bool = False) -> m.PhysicalLunRow:
    q = (select(m.PhysicalLunRow)
         .join(m.StorageArray, m.StorageArray.id == m.PhysicalLunRow.array_id)
         .where(m.StorageArray.wwn == key.array.canonical(),
                m.PhysicalLunRow.lun_number == int(key.lun)))
    row = s.scalar(locked(q) if lock else q)
    if row is None:
        raise NotFoundError(f"no physical LUN {key}")
    return row


def datastore(s: Session, name: str, *, lock: bool = False) -> m.DatastoreRow:
    q = select(m.DatastoreRow).where(m.DatastoreRow.name == name)
    row = s.scalar(locked(q) if lock else q)
    if row is None:
        raise NotFoundError(f"no datastore {name!r}")
    return row


def datastore_by_id(s: Session, ident: int, *, lock: bool = False) -> m.DatastoreRow:
    q = select(m.DatastoreRow).where(m.DatastoreRow.id == ident)
    row = s.scalar(locked(q) if lock else q)
    if row is None:
        raise InventoryCorruptError(f"datastore row {ident} is missing")
    return row


def vdisk(s: Session, ref: str, *, lock: bool = False) -> m.Vdisk:
    q = select(m.Vdisk).where((m.Vdisk.id == ref) | (m.Vdisk.name == ref))
    found = list(s.scalars(locked(q) if lock else q))
    if not found:
        raise NotFoundError(f"no vdisk {ref!r}")
    # a name may look like another vdisk's id ('vd-' and 8 hex digits): the id wins
    return next((r for r in found if r.id == ref), found[0])


def vm(s: Session, name: str, *, lock: bool = False) -> m.Vm:
    q = select(m.Vm).where(m.Vm.name == name)
    row = s.scalar(locked(q) if lock else q)
    if row is None:
        raise NotFoundError(f"no VM {name!r}")
    return row


def vport(s: Session, wwpn: Wwn, *, lock: bool = False) -> m.Vport:
    name = wwpn.canonical()
    q = select(m.Vport).where((m.Vport.wwpn == name) | (m.Vport.alternate_wwpn == name))
    row = s.scalar(locked(q) if lock else q)
    if row is None:
        raise NotFoundError(f"no vport {wwpn}")
    return row


def address_row(s: Session, vdisk_id: str) -> m.VdiskAddressRow | None:
    return s.get(m.VdiskAddressRow, vdisk_id)


# -- the WWN registry ---------------------------------------------------------------------


def wwn_used(s: Session, wwn: Wwn) -> bool:
    return s.get(m.WorldWideName, wwn.canonical()) is not None


def describe_wwn(s: Session, row: m.WorldWideName) -> str:
    name = row.wwn
    if row.kind in (WwnKind.VPORT_WWPN, WwnKind.VPORT_WWNN, WwnKind.VPORT_ALTERNATE):
        column = {WwnKind.VPORT_WWPN: m.Vport.wwpn, WwnKind.VPORT_WWNN: m.Vport.wwnn,
                  WwnKind.VPORT_ALTERNATE: m.Vport.alternate_wwpn}[row.kind]
        owner = s.scalar(select(m.Vport.wwpn).where(column == name))
        role = {WwnKind.VPORT_WWPN: "the WWPN", WwnKind.VPORT_WWNN: "the WWNN",
                WwnKind.VPORT_ALTERNATE: "the alternate WWPN"}[row.kind]
        return f"{role} of vport {owner}"
    if row.kind == WwnKind.LU:
        v = s.scalar(select(m.Vdisk).where(m.Vdisk.lu_wwn == name))
        return "the LU name of a deleted vdisk" if v is None else (
            f"the LU name of vdisk {v.id} ({v.name!r})")
    if row.kind == WwnKind.ARRAY:
        return "a storage array's name"
    if row.kind == WwnKind.TARGET_PORT:
        return "a storage array's target port"
    return f"a {row.kind} name"


def check_wwn_free(s: Session, wwn: Wwn) -> None:
    row = s.get(m.WorldWideName, wwn.canonical())
    if row is not None:
        raise DuplicateWwnError(f"WWN {wwn} is already {describe_wwn(s, row)}")


def register_wwn(s: Session, wwn: Wwn, kind: str, now: datetime) -> None:
    check_wwn_free(s, wwn)
    s.add(m.WorldWideName(wwn=wwn.canonical(), kind=kind, created_at=now))
    s.flush()


def layout(s: Session, v: m.Vdisk) -> VdiskLayout:
    ds = s.get_one(m.DatastoreRow, v.datastore_id)
    extents = s.execute(
        select(m.ExtentRow, m.PhysicalLunRow.lun_number, m.StorageArray.wwn)
        .join(m.PhysicalLunRow, m.PhysicalLunRow.id == m.ExtentRow.lun_id)
        .join(m.StorageArray, m.StorageArray.id == m.PhysicalLunRow.array_id)
        .where(m.ExtentRow.vdisk_id == v.id)
        .order_by(m.ExtentRow.idx)
    ).all()
    try:
        placements = tuple(
            Placement(VirtualLba(e.vlba), Extent(
                LunKey(parse_stored_wwn(wwn), LunNumber(n)), PhysicalLba(e.start), e.count))
            for e, n, wwn in extents
        )
        return VdiskLayout(VdiskId(v.id), v.block_size, v.capacity_blocks, ds.chunk_blocks,
                           v.thin, placements)
    except LayoutError as exc:
        raise InventoryCorruptError(f"vdisk {v.id}: {exc}") from None


def mapping_info(s: Session, vm_row: m.Vm) -> MappingInfo:
    port = s.scalar(select(m.Vport).where(m.Vport.vm_id == vm_row.id))
    attached = s.execute(
        select(m.Vdisk)
        .join(m.VdiskAddressRow, m.VdiskAddressRow.vdisk_id == m.Vdisk.id)
        .where(m.VdiskAddressRow.vm_id == vm_row.id)
        .order_by(m.VdiskAddressRow.target, m.VdiskAddressRow.lun)
    ).scalars()
    entries = []
    for v in attached:
        view = vdisk_view(s, v)
        assert view.address is not None
        entries.append(MappingEntry(view, layout(s, v), view.address))
    return MappingInfo(vm_row.name, None if port is None else vport_view(s, port),
                       tuple(entries))


# -- views --------------------------------------------------------------------------------


def host_view(h: m.Host) -> HostView:
    return HostView(h.name, h.api_address, h.run_dir, HostState(h.state), h.heartbeat_at,
                    h.created_at)


def lun_view(s: Session, lun: m.PhysicalLunRow) -> LunView:
    array = s.get_one(m.StorageArray, lun.array_id)
    key = LunKey(parse_stored_wwn(array.wwn), LunNumber(lun.lun_number))
    member = s.get(m.DatastoreLun, lun.id)
    ds = None if member is None else s.get_one(m.DatastoreRow, member.datastore_id).name
    return LunView(PhysicalLun(key, lun.block_size, lun.num_blocks), BackingKind(lun.backing),
                   lun.path, ds)


def array_view(s: Session, a: m.StorageArray) -> ArrayView:
    luns = s.scalars(select(m.PhysicalLunRow).where(m.PhysicalLunRow.array_id == a.id)
                     .order_by(m.PhysicalLunRow.lun_number))
    return ArrayView(parse_stored_wwn(a.wwn), a.directory,
                     tuple(parse_stored_wwn(p) for p in a.target_ports),
                     tuple(lun_view(s, r) for r in luns), a.created_at)


def address_view(s: Session, vdisk_id: str) -> VdiskAddress | None:
    found = s.execute(
        select(m.VdiskAddressRow, m.Vm.name, m.Vport.wwpn)
        .join(m.Vm, m.Vm.id == m.VdiskAddressRow.vm_id)
        .outerjoin(m.Vport, m.Vport.id == m.VdiskAddressRow.vport_id)
        .where(m.VdiskAddressRow.vdisk_id == vdisk_id)
    ).first()
    if found is None:
        return None
    a, vm_name, wwpn = found
    return VdiskAddress(VdiskId(a.vdisk_id), vm_name,
                        None if wwpn is None else parse_stored_wwn(wwpn),
                        TargetId(a.target), a.lun)


def vdisk_view(s: Session, v: m.Vdisk) -> VdiskView:
    ds = s.get_one(m.DatastoreRow, v.datastore_id)
    allocated = s.scalar(select(func.coalesce(func.sum(m.ExtentRow.count), 0))
                         .where(m.ExtentRow.vdisk_id == v.id)) or 0
    return VdiskView(
        id=VdiskId(v.id), name=v.name, datastore=ds.name, capacity_blocks=v.capacity_blocks,
        block_size=v.block_size, thin=v.thin, allocated_blocks=int(allocated),
        chunk_blocks=ds.chunk_blocks, serial=v.serial, lu_wwn=parse_stored_wwn(v.lu_wwn),
        created_at=v.created_at, address=address_view(s, v.id),
    )


def vm_view(s: Session, v: m.Vm) -> VmView:
    host = None if v.host_id is None else s.get_one(m.Host, v.host_id).name
    vf = None if v.host_id is None else s.scalar(select(m.VfAssignment.vf_index).where(
        m.VfAssignment.vm_id == v.id, m.VfAssignment.host_id == v.host_id))
    vport = s.scalar(select(m.Vport.wwpn).where(m.Vport.vm_id == v.id))
    vdisks = s.scalars(select(m.VdiskAddressRow.vdisk_id).where(m.VdiskAddressRow.vm_id == v.id)
                       .order_by(m.VdiskAddressRow.target, m.VdiskAddressRow.lun))
    return VmView(v.name, host, v.memory_bytes, VmRuntime(v.runtime), VmState(v.state), v.pid,
                  None if vf is None else VfIndex(vf),
                  None if vport is None else parse_stored_wwn(vport),
                  tuple(VdiskId(d) for d in vdisks), v.created_at, v.updated_at)


def vport_view(s: Session, p: m.Vport) -> VportView:
    vm = None if p.vm_id is None else s.get_one(m.Vm, p.vm_id).name
    host = None if p.host_id is None else s.get_one(m.Host, p.host_id).name
    return VportView(parse_stored_wwn(p.wwpn), parse_stored_wwn(p.wwnn),
                     None if p.alternate_wwpn is None else parse_stored_wwn(p.alternate_wwpn),
                     vm, host, p.created_at)


def event_view(e: m.Event) -> EventView:
    return EventView(e.id, e.at, e.kind, e.claim, e.host, e.vm, e.vdisk, e.vport, e.migration,
                     dict(e.detail))


def migration_view(s: Session, r: m.MigrationRecord) -> MigrationView:
    src = None if r.source_host_id is None else s.get_one(m.Host, r.source_host_id).name
    dst = None if r.destination_host_id is None else \
        s.get_one(m.Host, r.destination_host_id).name
    return MigrationView(r.id, r.vm_name, src, dst, r.started_at, r.finished_at, r.outcome,
                         dict(r.phases), dict(r.detail))
