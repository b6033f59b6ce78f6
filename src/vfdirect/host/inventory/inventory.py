"""The hypervisor's inventory: everything it creates, kept in a database (claim A9).

Rules of this module:

* :class:`Inventory` is the repository: one method, one transaction; a method either
  commits all it did or, raising an :class:`~.errors.InventoryError`, nothing at all;
* it returns the frozen records of :mod:`.views`, never ORM rows;
* space is handed out by the pure allocator (:class:`~vfdirect.core.alloc.Datastore`):
  inside the write transaction, the datastore's state is loaded from its rows (member
  LUNs, dirty ranges, every vdisk's extents), the allocator decides, and what changed is
  written back. The datastore's row is locked first (``SELECT ... FOR UPDATE`` on
  PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` already holds the only write lock), so two
  processes allocating on one datastore take turns and never hand out a block twice;
* every mutating method appends an event (with the claim step it performs) in the same
  transaction, so the log never tells of a change that did not happen.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self, TypeVar

from sqlalchemy import Engine, delete, func, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session

from vfdirect.core.adapter.mapping import (
    MAX_MAPPED_LUNS,
    MAX_TARGET,
    LuMapping,
    MappingError,
    MappingTable,
)
from vfdirect.core.alloc import (
    AllocError,
    Datastore,
    Extent,
    VdiskLayout,
    VirtualRangeError,
)
from vfdirect.core.alloc import OutOfSpaceError as AllocOutOfSpaceError
from vfdirect.core.array import BLOCK_SIZES, MAX_LUN, LunKey
from vfdirect.core.ids import LunNumber, VdiskId, VfIndex
from vfdirect.core.wwn import Wwn, WwnError
from vfdirect.host.inventory import _rows as rows
from vfdirect.host.inventory import models as m
from vfdirect.host.inventory._allocation import (
    Allocation,
    datastore_add_lun,
    datastore_view,
    out_of_space,
)
from vfdirect.host.inventory.database import (
    DEFAULT_BUSY_TIMEOUT_S,
    WRITE_OPTION,
    DatabaseOptions,
    current_revision,
    database_url,
    make_engine,
    upgrade_to_head,
)
from vfdirect.host.inventory.errors import (
    AlreadyAttachedError,
    ConflictError,
    InvalidArgumentError,
    InventoryBusyError,
    InventoryCorruptError,
    InventoryError,
    NotAllocatedError,
    NotFoundError,
    WrongStateError,
)
from vfdirect.host.inventory.names import RandomBits, VdiskNames, VportNames, WwnKind
from vfdirect.host.inventory.views import (
    VM_TRANSITIONS,
    ArrayView,
    DatastoreView,
    EventView,
    HostState,
    HostView,
    LunView,
    MappingInfo,
    MigrationOutcome,
    MigrationView,
    VdiskAddress,
    VdiskView,
    VfAssignmentView,
    VmRuntime,
    VmState,
    VmView,
    VportView,
)
from vfdirect.storage.array import BackingKind
from vfdirect.storage.array import StorageArray as ArrayShell

T = TypeVar("T")
Clock = Callable[[], datetime]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
#: How often a random name is drawn again before giving up (each draw is 32 bits).
_NAME_ATTEMPTS = 64
#: PostgreSQL SQLSTATEs after which the whole transaction is simply run again.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock
_RETRIES = 5
#: VM states in which the VM has no process (its pid is forgotten).
_NO_PROCESS = frozenset({VmState.DEFINED, VmState.STOPPED})

def _utc_now() -> datetime:
    return datetime.now(UTC)


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidArgumentError(
            f"{what} name {name!r} must be 1..64 characters of letters, digits, '.', '_' "
            "and '-', starting with a letter or digit"
        )
    return name


def _check_count(value: object, what: str, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{what} must be an integer >= {minimum}, not {value!r}")
    return value


def _wwn(value: Wwn | str, what: str) -> Wwn:
    if isinstance(value, Wwn):
        return value
    try:
        return Wwn.parse(value)
    except WwnError as exc:
        raise InvalidArgumentError(f"{what}: {exc}") from None


class Inventory:
    """The hypervisor's inventory over SQLite (a file, the default) or PostgreSQL.

    Claim A9: the mapping info (extents and virtual disk addresses), and everything
    else the hypervisor creates, is kept in this database, which the hypervisor reaches
    and which survives its restart: :meth:`open` on the same file or URL finds it all.

    Open with :meth:`open`; the schema is brought to the current migration head then.
    One ``Inventory`` per process (it owns a connection pool); a process started with
    ``fork`` opens its own.
    """

    def __init__(self, engine: Engine, *, clock: Clock | None = None,
                 rng: RandomBits | None = None) -> None:
        self._engine = engine
        self._writer = engine.execution_options(**{WRITE_OPTION: True})
        self._clock: Clock = clock or _utc_now
        self._rng: RandomBits = rng or secrets.SystemRandom()

    @classmethod
    def open(
        cls,
        target: str | os.PathLike[str],
        *,
        busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S,
        clock: Clock | None = None,
        rng: RandomBits | None = None,
        echo: bool = False,
    ) -> Inventory:
        """Open (creating it if needed) the inventory at ``target``: an SQLite file path,
        an ``sqlite:///`` URL or a ``postgresql+psycopg://`` URL; then upgrade its
        schema to head (a no-op when it is there already)."""
        try:
            url = database_url(target)
        except ValueError as exc:
            raise InvalidArgumentError(f"inventory database {os.fspath(target)!r}: {exc}") from None
        engine = make_engine(url, DatabaseOptions(busy_timeout_s=busy_timeout_s, echo=echo))
        try:
            # claim A9: what a previous run stored is found again, at the current schema
            upgrade_to_head(engine)
        except OperationalError as exc:
            engine.dispose()
            raise InventoryBusyError(f"inventory {url.render_as_string()}: {exc.orig}") from exc
        except BaseException:
            engine.dispose()
            raise
        return cls(engine, clock=clock, rng=rng)

    def close(self) -> None:
        self._engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @property
    def url(self) -> str:
        """The database URL (password hidden)."""
        return self._engine.url.render_as_string(hide_password=True)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._engine.dialect.name

    def schema_revision(self) -> str | None:
        """The Alembic revision the database is at."""
        return current_revision(self._engine)

    # -- transactions ----------------------------------------------------------------------

    def _write(self, fn: Callable[[Session], T]) -> T:
        return self._run(self._writer, fn)

    def _read(self, fn: Callable[[Session], T]) -> T:
        return self._run(self._engine, fn)

    def _run(self, engine: Engine, fn: Callable[[Session], T]) -> T:
        for attempt in range(_RETRIES):
            try:
                with Session(engine, autoflush=True) as s, s.begin():
                    return fn(s)
            except InventoryError:
                raise
            except IntegrityError as exc:
                raise ConflictError(f"refused by the database: {exc.orig}") from exc
            except DBAPIError as exc:
                sqlstate = getattr(exc.orig, "sqlstate", None)
                if sqlstate in _RETRY_SQLSTATES and attempt + 1 < _RETRIES:
                    continue
                if isinstance(exc, OperationalError) and "locked" in str(exc.orig):
                    raise InventoryBusyError(f"inventory is busy: {exc.orig}") from exc
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _now(self) -> datetime:
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the inventory's clock must return aware datetimes")
        return now

    def _event(self, s: Session, kind: str, *, claim: str | None = None,
               host: str | None = None, vm: str | None = None, vdisk: str | None = None,
               vport: str | None = None, migration: str | None = None,
               detail: dict[str, Any] | None = None) -> m.Event:
        row = m.Event(at=self._now(), kind=kind, claim=claim, host=host, vm=vm, vdisk=vdisk,
                      vport=vport, migration=migration, detail=detail or {})
        s.add(row)
        s.flush()
        return row

    # -- hosts -----------------------------------------------------------------------------

    def host_register(self, name: str, *, api_address: str | None = None,
                      run_dir: str | None = None) -> HostView:
        """Add a host, or update its address and run directory; either way it is UP with
        a fresh heartbeat."""
        _check_name(name, "host")

        def op(s: Session) -> HostView:
            now = self._now()
            row = s.scalar(select(m.Host).where(m.Host.name == name).with_for_update())
            if row is None:
                row = m.Host(name=name, created_at=now, state=HostState.UP.value)
                s.add(row)
            row.api_address, row.run_dir = api_address, run_dir
            row.state, row.heartbeat_at = HostState.UP.value, now
            s.flush()
            self._event(s, "host_register", host=name,
                        detail={"api_address": api_address, "run_dir": run_dir})
            return rows.host_view(row)

        return self._write(op)

    def host_heartbeat(self, name: str) -> HostView:
        def op(s: Session) -> HostView:
            row = rows.host(s, name)
            row.heartbeat_at = self._now()
            s.flush()
            return rows.host_view(row)

        return self._write(op)

    def host_set_state(self, name: str, state: HostState) -> HostView:
        state = HostState(state)

        def op(s: Session) -> HostView:
            row = rows.host(s, name)
            row.state = state.value
            s.flush()
            self._event(s, "host_state", host=name, detail={"state": state.value})
            return rows.host_view(row)

        return self._write(op)

    def host_get(self, name: str) -> HostView:
        return self._read(lambda s: rows.host_view(rows.host(s, name)))

    def host_list(self) -> tuple[HostView, ...]:
        return self._read(lambda s: tuple(
            rows.host_view(h) for h in s.scalars(select(m.Host).order_by(m.Host.name))
        ))

    # -- storage arrays and physical LUNs --------------------------------------------------

    def array_register(self, wwn: Wwn | str, directory: str,
                       target_ports: Sequence[Wwn | str] = ()) -> ArrayView:
        """Add a storage array (its WWN and target port names join the WWN registry)."""
        array_wwn = _wwn(wwn, "array WWN")
        ports = [_wwn(p, "target port") for p in target_ports]
        if len(set(ports)) != len(ports) or array_wwn in ports:
            raise InvalidArgumentError(f"array {array_wwn}: target port names must be unique")

        def op(s: Session) -> ArrayView:
            now = self._now()
            rows.register_wwn(s, array_wwn, WwnKind.ARRAY, now)
            for p in ports:
                rows.register_wwn(s, p, WwnKind.TARGET_PORT, now)
            row = m.StorageArray(wwn=array_wwn.canonical(), directory=str(directory),
                                 target_ports=[p.canonical() for p in ports], created_at=now)
            s.add(row)
            s.flush()
            self._event(s, "array_register", detail={"array": array_wwn.canonical(),
                                                     "directory": str(directory)})
            return rows.array_view(s, row)

        return self._write(op)

    def array_import(self, array: ArrayShell) -> ArrayView:
        """Register a storage array shell and all its LUNs; what is registered already is
        kept (a LUN whose geometry or backing changed is refused)."""
        entries = [array.lun_entry(int(lun.key.lun)) for lun in array.lun_list()]

        def op(s: Session) -> ArrayView:
            now = self._now()
            row = s.scalar(select(m.StorageArray)
                           .where(m.StorageArray.wwn == array.wwn.canonical())
                           .with_for_update())
            if row is None:
                rows.register_wwn(s, array.wwn, WwnKind.ARRAY, now)
                for p in array.target_ports:
                    rows.register_wwn(s, p, WwnKind.TARGET_PORT, now)
                row = m.StorageArray(wwn=array.wwn.canonical(), directory=str(array.directory),
                                     target_ports=[p.canonical() for p in array.target_ports],
                                     created_at=now)
                s.add(row)
                s.flush()
            added = []
            for entry in entries:
                lun = entry.lun
                have = s.scalar(select(m.PhysicalLunRow).where(
                    m.PhysicalLunRow.array_id == row.id,
                    m.PhysicalLunRow.lun_number == int(lun.key.lun)))
                if have is None:
                    s.add(m.PhysicalLunRow(
                        array_id=row.id, lun_number=int(lun.key.lun), block_size=lun.block_size,
                        num_blocks=lun.num_blocks, backing=entry.backing.value, path=entry.path))
                    added.append(int(lun.key.lun))
                elif (have.block_size, have.num_blocks, have.backing, have.path) != (
                    lun.block_size, lun.num_blocks, entry.backing.value, entry.path
                ):
                    raise ConflictError(
                        f"LUN {lun.key} is registered as {have.num_blocks} x {have.block_size}"
                        f"-byte blocks ({have.backing} {have.path}); the array now says "
                        f"{lun.num_blocks} x {lun.block_size} ({entry.backing.value} "
                        f"{entry.path})"
                    )
            s.flush()
            self._event(s, "array_import", detail={"array": array.wwn.canonical(),
                                                   "luns_added": added})
            return rows.array_view(s, row)

        return self._write(op)

    def lun_register(self, array: Wwn | str, lun: int, *, block_size: int, num_blocks: int,
                     path: str, backing: BackingKind = BackingKind.FILE) -> LunView:
        """Add a physical LUN of a registered array."""
        array_wwn = _wwn(array, "array WWN")
        if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
            raise InvalidArgumentError(f"LUN number {lun!r} is not in 0..{MAX_LUN}")
        if block_size not in BLOCK_SIZES:
            raise InvalidArgumentError(f"block size {block_size} is not one of {BLOCK_SIZES}")
        _check_count(num_blocks, "LUN capacity in blocks")
        backing = BackingKind(backing)

        def op(s: Session) -> LunView:
            a = rows.array(s, array_wwn)
            if s.scalar(select(m.PhysicalLunRow.id).where(
                    m.PhysicalLunRow.array_id == a.id, m.PhysicalLunRow.lun_number == lun)):
                raise ConflictError(f"array {array_wwn} already has LUN {lun}")
            row = m.PhysicalLunRow(array_id=a.id, lun_number=lun, block_size=block_size,
                                   num_blocks=num_blocks, backing=backing.value, path=path)
            s.add(row)
            s.flush()
            self._event(s, "lun_register", detail={"array": array_wwn.canonical(), "lun": lun})
            return rows.lun_view(s, row)

        return self._write(op)

    def array_get(self, wwn: Wwn | str) -> ArrayView:
        key = _wwn(wwn, "array WWN")
        return self._read(lambda s: rows.array_view(s, rows.array(s, key)))

    def array_list(self) -> tuple[ArrayView, ...]:
        return self._read(lambda s: tuple(
            rows.array_view(s, a)
            for a in s.scalars(select(m.StorageArray).order_by(m.StorageArray.wwn))
        ))

    def lun_get(self, key: LunKey) -> LunView:
        return self._read(lambda s: rows.lun_view(s, rows.lun(s, key)))

    def lun_list(self, array: Wwn | str | None = None) -> tuple[LunView, ...]:
        array_wwn = None if array is None else _wwn(array, "array WWN")

        def op(s: Session) -> tuple[LunView, ...]:
            q = (select(m.PhysicalLunRow)
                 .join(m.StorageArray, m.StorageArray.id == m.PhysicalLunRow.array_id)
                 .order_by(m.StorageArray.wwn, m.PhysicalLunRow.lun_number))
            if array_wwn is not None:
                q = q.where(m.StorageArray.id == rows.array(s, array_wwn).id)
            return tuple(rows.lun_view(s, r) for r in s.scalars(q))

        return self._read(op)

    # -- datastores ------------------------------------------------------------------------

    def datastore_create(self, name: str, *, block_size: int = 512,
                         chunk_blocks: int | None = None, luns: Iterable[LunKey] = (),
                         fresh: bool | None = None) -> DatastoreView:
        """A new datastore over ``luns`` (more with :meth:`datastore_lun_add`). ``fresh``:
        whether the LUNs read as zeros; by default file LUNs do (new sparse files) and
        block devices do not (all their space starts dirty, to be zeroed before use)."""
        _check_name(name, "datastore")
        try:
            probe = Datastore(name, block_size, chunk_blocks)
        except AllocError as exc:
            raise InvalidArgumentError(f"datastore {name!r}: {exc}") from None
        keys = list(luns)

        def op(s: Session) -> DatastoreView:
            if s.scalar(select(m.DatastoreRow.id).where(m.DatastoreRow.name == name)):
                raise ConflictError(f"datastore {name!r} already exists")
            row = m.DatastoreRow(name=name, block_size=block_size,
                                 chunk_blocks=probe.chunk_blocks, created_at=self._now())
            s.add(row)
            s.flush()
            alloc = Allocation(row, probe, {})
            for key in keys:
                datastore_add_lun(s, alloc, key, fresh)
            alloc.save_dirty(s)
            self._event(s, "datastore_create", detail={
                "datastore": name, "block_size": block_size, "chunk_blocks": probe.chunk_blocks,
                "luns": [str(k) for k in keys]})
            return datastore_view(s, alloc)

        return self._write(op)

    def datastore_lun_add(self, name: str, lun: LunKey, *,
                          fresh: bool | None = None) -> DatastoreView:
        """Add a member LUN (after the others in allocation order)."""
        def op(s: Session) -> DatastoreView:
            alloc = Allocation.load(s, rows.datastore(s, name, lock=True))
            datastore_add_lun(s, alloc, lun, fresh)
            alloc.save_dirty(s)
            self._event(s, "datastore_lun_add", detail={"datastore": name, "lun": str(lun)})
            return datastore_view(s, alloc)

        return self._write(op)

    def datastore_get(self, name: str) -> DatastoreView:
        return self._read(lambda s: datastore_view(s, Allocation.load(s, rows.datastore(s, name))))

    def datastore_list(self) -> tuple[DatastoreView, ...]:
        return self._read(lambda s: tuple(
            datastore_view(s, Allocation.load(s, d))
            for d in s.scalars(select(m.DatastoreRow).order_by(m.DatastoreRow.name))
        ))

    def datastore_dump(self, name: str) -> dict[str, Any]:
        """The allocator's state, as :meth:`Datastore.dump` (LUNs, dirty space, layouts)."""
        return self._read(lambda s: Allocation.load(s, rows.datastore(s, name)).datastore.dump())

    def datastore_pending_zero(self, name: str) -> tuple[Extent, ...]:
        """Freed space the host must zero, then report with :meth:`datastore_mark_zeroed`."""
        return self._read(
            lambda s: Allocation.load(s, rows.datastore(s, name)).datastore.pending_zero()
        )

    def datastore_mark_zeroed(self, name: str, extent: Extent) -> None:
        """``extent`` (whole chunks, all dirty) was zeroed: it becomes free space."""
        def op(s: Session) -> None:
            alloc = Allocation.load(s, rows.datastore(s, name, lock=True))
            try:
                alloc.datastore.mark_zeroed(extent)
            except AllocError as exc:
                raise InvalidArgumentError(f"datastore {name!r}: {exc}") from None
            alloc.save_dirty(s)
            self._event(s, "datastore_zeroed", detail={"datastore": name, "extent": extent.dump()})

        self._write(op)

    # -- vdisks ----------------------------------------------------------------------------

    def vdisk_create(self, datastore: str, name: str, capacity_blocks: int, *,
                     thin: bool = False) -> VdiskView:
        """A new vdisk of ``capacity_blocks`` blocks of the datastore's block size; thick
        (every chunk allocated now, possibly over several LUNs) or thin. Refused with
        :class:`OutOfSpaceError` (nothing changed) when the space is not there."""
        _check_name(name, "vdisk")
        _check_count(capacity_blocks, f"vdisk {name!r}: capacity in blocks")

        def op(s: Session) -> VdiskView:
            alloc = Allocation.load(s, rows.datastore(s, datastore, lock=True))
            if s.scalar(select(m.Vdisk.id).where(m.Vdisk.name == name)):
                raise ConflictError(f"vdisk {name!r} already exists")
            names = self._new_vdisk_names(s)
            try:
                # claim A1: the hypervisor creates the virtual disk on the datastore
                layout = alloc.datastore.vdisk_create(names.id, capacity_blocks, thin=thin)
            except AllocOutOfSpaceError as exc:
                raise out_of_space(exc, f"vdisk {name!r}") from None
            except AllocError as exc:
                raise InvalidArgumentError(f"vdisk {name!r}: {exc}") from None
            now = self._now()
            rows.register_wwn(s, names.lu_wwn, WwnKind.LU, now)
            row = m.Vdisk(id=names.id, name=name, datastore_id=alloc.row.id,
                          capacity_blocks=capacity_blocks, block_size=alloc.row.block_size,
                          thin=thin, serial=names.serial, lu_wwn=names.lu_wwn.canonical(),
                          created_at=now)
            s.add(row)
            s.flush()
            # claim A2 (first mapping): the vdisk's physical regions, stored as rows
            alloc.save_layout(s, layout)
            self._event(s, "vdisk_create", claim="A1", vdisk=names.id, detail={
                "name": name, "datastore": datastore, "capacity_blocks": capacity_blocks,
                "thin": thin, "extents": [p.extent.dump() for p in layout.placements]})
            return rows.vdisk_view(s, row)

        return self._write(op)

    def vdisk_allocate(self, vdisk: str, vlba: int, count: int) -> VdiskLayout:
        """Back every chunk of virtual blocks ``[vlba, vlba + count)`` of a vdisk (a thin
        vdisk's first write); idempotent. This is the storage layer's ``ThinAllocator``."""
        def op(s: Session) -> VdiskLayout:
            v = rows.vdisk(s, vdisk)
            alloc = Allocation.load(s, rows.datastore_by_id(s, v.datastore_id, lock=True))
            try:
                before = alloc.datastore.vdisk_layout(VdiskId(v.id))
                layout = alloc.datastore.vdisk_allocate(VdiskId(v.id), vlba, count)
            except AllocOutOfSpaceError as exc:
                raise out_of_space(exc, f"vdisk {v.id} ({v.name!r})") from None
            except (AllocError, VirtualRangeError) as exc:
                raise InvalidArgumentError(f"vdisk {v.id} ({v.name!r}): {exc}") from None
            if layout != before:
                alloc.save_layout(s, layout)
                self._event(s, "vdisk_allocate", vdisk=v.id, detail={
                    "vlba": vlba, "count": count,
                    "allocated_blocks": layout.allocated_blocks})
            return layout

        return self._write(op)

    def vdisk_inflate(self, vdisk: str) -> VdiskView:
        """Allocate every chunk of a thin vdisk (a VF maps only fully allocated vdisks);
        all or nothing."""
        def op(s: Session) -> VdiskView:
            v = rows.vdisk(s, vdisk)
            alloc = Allocation.load(s, rows.datastore_by_id(s, v.datastore_id, lock=True))
            try:
                before = alloc.datastore.vdisk_layout(VdiskId(v.id))
                layout = alloc.datastore.vdisk_allocate(VdiskId(v.id), 0, v.capacity_blocks)
            except AllocOutOfSpaceError as exc:
                raise out_of_space(exc, f"inflating vdisk {v.id} ({v.name!r})") from None
            if layout != before:
                alloc.save_layout(s, layout)
                self._event(s, "vdisk_inflate", vdisk=v.id, detail={
                    "allocated_blocks": layout.allocated_blocks})
            return rows.vdisk_view(s, v)

        return self._write(op)

    def vdisk_delete(self, vdisk: str) -> tuple[Extent, ...]:
        """Delete a detached vdisk. Its extents become dirty ranges (never handed out
        again before the host zeroes them, :meth:`datastore_mark_zeroed`) and are
        returned. Its LU name stays in the WWN registry, so it is never reused."""
        def op(s: Session) -> tuple[Extent, ...]:
            v = rows.vdisk(s, vdisk)
            alloc = Allocation.load(s, rows.datastore_by_id(s, v.datastore_id, lock=True))
            v = rows.vdisk(s, v.id, lock=True)
            attached = rows.address_row(s, v.id)
            if attached is not None:
                vm = s.get_one(m.Vm, attached.vm_id)
                raise ConflictError(
                    f"vdisk {v.id} ({v.name!r}) is attached to VM {vm.name!r}; detach it first"
                )
            dirty = alloc.datastore.vdisk_delete(VdiskId(v.id))
            s.execute(delete(m.ExtentRow).where(m.ExtentRow.vdisk_id == v.id))
            s.delete(v)
            s.flush()
            alloc.save_dirty(s)
            self._event(s, "vdisk_delete", vdisk=v.id, detail={
                "name": v.name, "datastore": alloc.row.name,
                "dirty": [e.dump() for e in dirty]})
            return dirty

        return self._write(op)

    def vdisk_get(self, vdisk: str) -> VdiskView:
        """A vdisk by id (``vd-…``) or name."""
        return self._read(lambda s: rows.vdisk_view(s, rows.vdisk(s, vdisk)))

    def vdisk_list(self, *, datastore: str | None = None,
                   vm: str | None = None) -> tuple[VdiskView, ...]:
        def op(s: Session) -> tuple[VdiskView, ...]:
            q = select(m.Vdisk).order_by(m.Vdisk.name)
            if datastore is not None:
                q = q.where(m.Vdisk.datastore_id == rows.datastore(s, datastore).id)
            if vm is not None:
                q = q.join(m.VdiskAddressRow, m.VdiskAddressRow.vdisk_id == m.Vdisk.id).where(
                    m.VdiskAddressRow.vm_id == rows.vm(s, vm).id)
            return tuple(rows.vdisk_view(s, v) for v in s.scalars(q))

        return self._read(op)

    def vdisk_layout(self, vdisk: str) -> VdiskLayout:
        """A vdisk's first mapping, as stored."""
        return self._read(lambda s: rows.layout(s, rows.vdisk(s, vdisk)))

    # -- VMs -------------------------------------------------------------------------------

    def vm_create(self, name: str, *, memory_bytes: int, host: str | None = None,
                  runtime: VmRuntime = VmRuntime.PYTHON) -> VmView:
        _check_name(name, "VM")
        _check_count(memory_bytes, f"VM {name!r}: memory size in bytes")
        runtime = VmRuntime(runtime)

        def op(s: Session) -> VmView:
            if s.scalar(select(m.Vm.id).where(m.Vm.name == name)):
                raise ConflictError(f"VM {name!r} already exists")
            host_row = None if host is None else rows.host(s, host)
            now = self._now()
            row = m.Vm(name=name, host_id=None if host_row is None else host_row.id,
                       memory_bytes=memory_bytes, runtime=runtime.value,
                       state=VmState.DEFINED.value, pid=None, created_at=now, updated_at=now)
            s.add(row)
            s.flush()
            self._event(s, "vm_create", host=host, vm=name, detail={
                "memory_bytes": memory_bytes, "runtime": runtime.value})
            return rows.vm_view(s, row)

        return self._write(op)

    def vm_get(self, name: str) -> VmView:
        return self._read(lambda s: rows.vm_view(s, rows.vm(s, name)))

    def vm_list(self, *, host: str | None = None) -> tuple[VmView, ...]:
        def op(s: Session) -> tuple[VmView, ...]:
            q = select(m.Vm).order_by(m.Vm.name)
            if host is not None:
                q = q.where(m.Vm.host_id == rows.host(s, host).id)
            return tuple(rows.vm_view(s, v) for v in s.scalars(q))

        return self._read(op)

    def vm_set_state(self, name: str, state: VmState, *, pid: int | None = None,
                     expect: VmState | None = None) -> VmView:
        """Move a VM to ``state`` (:data:`~.views.VM_TRANSITIONS`); ``pid`` records its
        process; DEFINED and STOPPED forget it. ``expect``: refuse unless the VM is in
        that state now (a compare-and-set between processes)."""
        state = VmState(state)
        if pid is not None:
            _check_count(pid, "pid")

        def op(s: Session) -> VmView:
            row = rows.vm(s, name, lock=True)
            now_state = VmState(row.state)
            if expect is not None and now_state is not VmState(expect):
                raise WrongStateError(
                    f"VM {name!r} is {now_state.value}, not {VmState(expect).value}")
            if state is not now_state and state not in VM_TRANSITIONS[now_state]:
                raise WrongStateError(
                    f"VM {name!r} is {now_state.value}: it cannot become {state.value}")
            row.state = state.value
            if pid is not None:
                row.pid = pid
            elif state in _NO_PROCESS:
                row.pid = None
            row.updated_at = self._now()
            s.flush()
            self._event(s, "vm_state", vm=name, detail={
                "from": now_state.value, "to": state.value, "pid": row.pid})
            return rows.vm_view(s, row)

        return self._write(op)

    def vm_set_host(self, name: str, host: str) -> VmView:
        """Move a VM (and the vport associated with it: the vport follows the VM, claim
        X3) to ``host``."""
        def op(s: Session) -> VmView:
            row = rows.vm(s, name, lock=True)
            self._move_vm(s, row, host)
            return rows.vm_view(s, row)

        return self._write(op)

    def _move_vm(self, s: Session, row: m.Vm, host: str) -> None:
        old = None if row.host_id is None else s.get_one(m.Host, row.host_id).name
        h = rows.host(s, host)
        row.host_id = h.id
        row.updated_at = self._now()
        s.execute(update(m.Vport).where(m.Vport.vm_id == row.id).values(host_id=h.id))
        s.flush()
        self._event(s, "vm_move", vm=row.name, host=host, detail={"from": old, "to": host})

    def vm_delete(self, name: str) -> None:
        """Forget a VM with no process, no vdisk, no vport and no VF."""
        def op(s: Session) -> None:
            row = rows.vm(s, name, lock=True)
            state = VmState(row.state)
            if state not in (VmState.DEFINED, VmState.STOPPED, VmState.ERROR):
                raise WrongStateError(f"VM {name!r} is {state.value}; stop it first")
            if s.scalar(select(func.count()).select_from(m.VdiskAddressRow)
                        .where(m.VdiskAddressRow.vm_id == row.id)):
                raise ConflictError(f"VM {name!r} still has vdisks attached")
            vport = s.scalar(select(m.Vport.wwpn).where(m.Vport.vm_id == row.id))
            if vport is not None:
                raise ConflictError(f"VM {name!r} is still associated with vport {vport}")
            vf = s.scalar(select(m.VfAssignment).where(m.VfAssignment.vm_id == row.id))
            if vf is not None:
                raise ConflictError(f"VM {name!r} still holds VF {vf.vf_index}")
            s.delete(row)
            s.flush()
            self._event(s, "vm_delete", vm=name)

        self._write(op)

    # -- vdisks of a VM: the second mapping (claims A2, A3) ---------------------------------

    def vdisk_attach(self, vm: str, vdisk: str, *, target: int | None = None,
                     lun: int | None = None) -> VdiskAddress:
        """Allocate a vdisk to a VM (claim A3) at a virtual disk address (claim A2, the
        second mapping): the given (target, lun), else the next free one (target 0, or
        the given target, lowest free LUN). A vdisk belongs to one VM:
        :class:`AlreadyAttachedError` otherwise, nothing changed."""
        if target is not None and (isinstance(target, bool) or not 0 <= target <= MAX_TARGET):
            raise InvalidArgumentError(f"target {target!r} is not in 0..{MAX_TARGET}")
        if lun is not None and (isinstance(lun, bool) or not 0 <= lun <= MAX_LUN):
            raise InvalidArgumentError(f"LUN {lun!r} is not in 0..{MAX_LUN}")

        def op(s: Session) -> VdiskAddress:
            vm_row = rows.vm(s, vm, lock=True)
            v = rows.vdisk(s, vdisk, lock=True)
            have = rows.address_row(s, v.id)
            if have is not None:
                owner = s.get_one(m.Vm, have.vm_id).name
                raise AlreadyAttachedError(
                    f"vdisk {v.id} ({v.name!r}) is already attached to VM {owner!r} at "
                    f"target {have.target} LUN {have.lun}"
                )
            used = {
                (t, u): d for t, u, d in s.execute(
                    select(m.VdiskAddressRow.target, m.VdiskAddressRow.lun,
                           m.VdiskAddressRow.vdisk_id)
                    .where(m.VdiskAddressRow.vm_id == vm_row.id))
            }
            if len(used) >= MAX_MAPPED_LUNS:
                raise ConflictError(
                    f"VM {vm!r} has {len(used)} vdisks, the most one VF maps")
            address = _pick_address(used, target, lun)
            if address in used:
                raise ConflictError(
                    f"VM {vm!r}: target {address[0]} LUN {address[1]} is taken by vdisk "
                    f"{used[address]}")
            vport_id = s.scalar(select(m.Vport.id).where(m.Vport.vm_id == vm_row.id))
            # claim A3: the vdisk is allocated to the VM; claim A2 (second mapping): the
            # vdisk -> (vport, target, LUN) row, unique per VM and per vport
            s.add(m.VdiskAddressRow(vdisk_id=v.id, vm_id=vm_row.id, vport_id=vport_id,
                                    target=address[0], lun=address[1],
                                    attached_at=self._now()))
            s.flush()
            self._event(s, "vdisk_attach", claim="A3", vm=vm, vdisk=v.id, detail={
                "target": address[0], "lun": address[1]})
            view = rows.address_view(s, v.id)
            assert view is not None
            return view

        return self._write(op)

    def vdisk_detach(self, vdisk: str) -> VdiskAddress:
        """Take a vdisk away from its VM; returns the address it had."""
        def op(s: Session) -> VdiskAddress:
            v = rows.vdisk(s, vdisk, lock=True)
            view = rows.address_view(s, v.id)
            if view is None:
                raise WrongStateError(f"vdisk {v.id} ({v.name!r}) is not attached to a VM")
            s.execute(delete(m.VdiskAddressRow).where(m.VdiskAddressRow.vdisk_id == v.id))
            self._event(s, "vdisk_detach", vm=view.vm, vdisk=v.id, detail={
                "target": int(view.target), "lun": view.lun})
            return view

        return self._write(op)

    def mapping_build(self, vm: str) -> MappingInfo:
        """The VM's mapping info (claim A2) as stored: per attached vdisk, its first
        mapping (extents -> layout) and its second (virtual disk address), in address
        order, with the VM's vport."""
        return self._read(lambda s: rows.mapping_info(s, rows.vm(s, vm)))

    def vm_mapping_table(self, vm: str) -> dict[str, Any]:
        """The VM's mapping table exactly as the adapter's ``mapping_load`` takes it
        (``vfdirect.vf-mapping`` version 1), to be sent through the PF (claim A4).
        Every vdisk must be fully allocated (:meth:`vdisk_inflate`)."""
        info = self.mapping_build(vm)
        entries = []
        for e in info.entries:
            holes = e.layout.num_chunks - e.layout.allocated_chunks
            if holes:
                raise NotAllocatedError(
                    f"vdisk {e.vdisk.id} ({e.vdisk.name!r}) of VM {vm!r} is thin with {holes} "
                    "unallocated chunk(s); a VF maps only fully allocated vdisks: inflate it"
                )
            entries.append(LuMapping(
                target=e.address.target, lun=LunNumber(e.address.lun), vdisk_id=e.vdisk.id,
                block_size=e.vdisk.block_size, capacity_blocks=e.vdisk.capacity_blocks,
                serial=e.vdisk.serial, wwn=e.vdisk.lu_wwn, layout=e.layout))
        try:
            return MappingTable(tuple(entries)).dump()
        except MappingError as exc:
            raise InventoryCorruptError(f"VM {vm!r}: mapping table: {exc}") from None

    # -- virtual ports (claims A5, A6) ---------------------------------------------------

    def vport_create(self, *, host: str | None = None, vm: str | None = None,
                     wwpn: Wwn | str | None = None, wwnn: Wwn | str | None = None,
                     alternate_wwpn: Wwn | str | None = None,
                     alternate: bool = True) -> VportView:
        """Create a virtual port (claim A5). Names not given are made up (see
        :mod:`.names`): NAA 5, unique in the whole inventory; with ``alternate`` (the
        default) it gets an alternate WWPN for migration (claim X3). A name already used
        anywhere in the inventory (as a WWPN, an alternate, a node name, an LU, an
        array or target port) is refused with :class:`DuplicateWwnError`. With ``vm``,
        the vport is associated with that VM's mapping info at once (claim A6)."""
        given = {
            "wwpn": None if wwpn is None else _wwn(wwpn, "WWPN"),
            "wwnn": None if wwnn is None else _wwn(wwnn, "WWNN"),
            "alternate_wwpn": None if alternate_wwpn is None
            else _wwn(alternate_wwpn, "alternate WWPN"),
        }
        named = [w for w in given.values() if w is not None]
        if len(set(named)) != len(named):
            raise InvalidArgumentError("a vport's WWPN, WWNN and alternate WWPN must differ")

        def op(s: Session) -> VportView:
            now = self._now()
            for w in named:
                rows.check_wwn_free(s, w)
            made = self._new_vport_names(s, avoid=set(named))
            port = given["wwpn"] or made.wwpn
            node = given["wwnn"] or made.wwnn
            alt = given["alternate_wwpn"] or (made.alternate_wwpn if alternate else None)
            rows.register_wwn(s, port, WwnKind.VPORT_WWPN, now)
            rows.register_wwn(s, node, WwnKind.VPORT_WWNN, now)
            if alt is not None:
                rows.register_wwn(s, alt, WwnKind.VPORT_ALTERNATE, now)
            host_row = None if host is None else rows.host(s, host)
            row = m.Vport(wwpn=port.canonical(), wwnn=node.canonical(),
                          alternate_wwpn=None if alt is None else alt.canonical(),
                          vm_id=None, host_id=None if host_row is None else host_row.id,
                          created_at=now)
            s.add(row)
            s.flush()
            # claim A5: the hypervisor creates the virtual port
            self._event(s, "vport_create", claim="A5", host=host, vport=port.canonical(),
                        detail={"wwnn": node.canonical(),
                                "alternate_wwpn": None if alt is None else alt.canonical()})
            if vm is not None:
                self._associate(s, row, rows.vm(s, vm, lock=True))
            return rows.vport_view(s, row)

        return self._write(op)

    def vport_associate(self, wwpn: Wwn | str, vm: str) -> VportView:
        """Associate the vport with the VM's mapping info (claim A6): the VM's virtual
        disk addresses are now under this vport. One vport per VM, one VM per vport."""
        port = _wwn(wwpn, "WWPN")

        def op(s: Session) -> VportView:
            row = rows.vport(s, port, lock=True)
            self._associate(s, row, rows.vm(s, vm, lock=True))
            return rows.vport_view(s, row)

        return self._write(op)

    def _associate(self, s: Session, row: m.Vport, vm_row: m.Vm) -> None:
        if row.vm_id == vm_row.id:
            return
        if row.vm_id is not None:
            owner = s.get_one(m.Vm, row.vm_id).name
            raise ConflictError(f"vport {row.wwpn} is associated with VM {owner!r}")
        other = s.scalar(select(m.Vport.wwpn).where(m.Vport.vm_id == vm_row.id))
        if other is not None:
            raise ConflictError(f"VM {vm_row.name!r} is associated with vport {other}")
        row.vm_id = vm_row.id
        s.flush()
        s.execute(update(m.VdiskAddressRow).where(m.VdiskAddressRow.vm_id == vm_row.id)
                  .values(vport_id=row.id))
        # claim A6: the vport is associated with the VM's mapping info
        self._event(s, "vport_associate", claim="A6", vm=vm_row.name, vport=row.wwpn)

    def vport_dissociate(self, wwpn: Wwn | str) -> VportView:
        port = _wwn(wwpn, "WWPN")

        def op(s: Session) -> VportView:
            row = rows.vport(s, port, lock=True)
            if row.vm_id is None:
                raise WrongStateError(f"vport {row.wwpn} is not associated with a VM")
            vm_name = s.get_one(m.Vm, row.vm_id).name
            s.execute(update(m.VdiskAddressRow).where(m.VdiskAddressRow.vport_id == row.id)
                      .values(vport_id=None))
            row.vm_id = None
            s.flush()
            self._event(s, "vport_dissociate", vm=vm_name, vport=row.wwpn)
            return rows.vport_view(s, row)

        return self._write(op)

    def vport_set_host(self, wwpn: Wwn | str, host: str | None) -> VportView:
        port = _wwn(wwpn, "WWPN")

        def op(s: Session) -> VportView:
            row = rows.vport(s, port, lock=True)
            row.host_id = None if host is None else rows.host(s, host).id
            s.flush()
            self._event(s, "vport_move", host=host, vport=row.wwpn)
            return rows.vport_view(s, row)

        return self._write(op)

    def vport_delete(self, wwpn: Wwn | str) -> None:
        """Delete a vport associated with no VM; its names are free again."""
        port = _wwn(wwpn, "WWPN")

        def op(s: Session) -> None:
            row = rows.vport(s, port, lock=True)
            if row.vm_id is not None:
                owner = s.get_one(m.Vm, row.vm_id).name
                raise ConflictError(f"vport {row.wwpn} is associated with VM {owner!r}")
            names = [n for n in (row.wwpn, row.wwnn, row.alternate_wwpn) if n is not None]
            s.delete(row)
            s.flush()
            s.execute(delete(m.WorldWideName).where(m.WorldWideName.wwn.in_(names)))
            self._event(s, "vport_delete", vport=names[0])

        self._write(op)

    def vport_get(self, wwpn: Wwn | str) -> VportView:
        """A vport by its WWPN or its alternate WWPN."""
        port = _wwn(wwpn, "WWPN")
        return self._read(lambda s: rows.vport_view(s, rows.vport(s, port)))

    def vport_list(self, *, host: str | None = None) -> tuple[VportView, ...]:
        def op(s: Session) -> tuple[VportView, ...]:
            q = select(m.Vport).order_by(m.Vport.wwpn)
            if host is not None:
                q = q.where(m.Vport.host_id == rows.host(s, host).id)
            return tuple(rows.vport_view(s, v) for v in s.scalars(q))

        return self._read(op)

    # -- VF assignments --------------------------------------------------------------------

    def vf_assign(self, host: str, vf: int, vm: str) -> VfAssignmentView:
        """Record that VF ``vf`` of ``host``'s adapter is assigned to ``vm`` (one VF per
        VM and host; a destination host reserves one before a migration)."""
        if isinstance(vf, bool) or not isinstance(vf, int) or not 0 <= vf <= 255:
            raise InvalidArgumentError(f"VF index {vf!r} is not in 0..255")

        def op(s: Session) -> VfAssignmentView:
            h = rows.host(s, host)
            vm_row = rows.vm(s, vm, lock=True)
            have = s.scalar(select(m.VfAssignment).where(
                m.VfAssignment.host_id == h.id, m.VfAssignment.vf_index == vf))
            if have is not None:
                owner = s.get_one(m.Vm, have.vm_id).name
                raise ConflictError(f"VF {vf} of host {host!r} is assigned to VM {owner!r}")
            mine = s.scalar(select(m.VfAssignment.vf_index).where(
                m.VfAssignment.host_id == h.id, m.VfAssignment.vm_id == vm_row.id))
            if mine is not None:
                raise ConflictError(f"VM {vm!r} already holds VF {mine} of host {host!r}")
            row = m.VfAssignment(host_id=h.id, vf_index=vf, vm_id=vm_row.id,
                                 assigned_at=self._now())
            s.add(row)
            s.flush()
            self._event(s, "vf_assign", host=host, vm=vm, detail={"vf": vf})
            return VfAssignmentView(host, VfIndex(vf), vm, row.assigned_at)

        return self._write(op)

    def vf_release(self, host: str, vf: int) -> VfAssignmentView:
        def op(s: Session) -> VfAssignmentView:
            h = rows.host(s, host)
            row = s.scalar(select(m.VfAssignment).where(
                m.VfAssignment.host_id == h.id, m.VfAssignment.vf_index == vf).with_for_update())
            if row is None:
                raise NotFoundError(f"VF {vf} of host {host!r} is not assigned")
            view = VfAssignmentView(host, VfIndex(vf), s.get_one(m.Vm, row.vm_id).name,
                                    row.assigned_at)
            s.delete(row)
            s.flush()
            self._event(s, "vf_release", host=host, vm=view.vm, detail={"vf": vf})
            return view

        return self._write(op)

    def vf_list(self, *, host: str | None = None) -> tuple[VfAssignmentView, ...]:
        def op(s: Session) -> tuple[VfAssignmentView, ...]:
            q = (select(m.VfAssignment, m.Host.name, m.Vm.name)
                 .join(m.Host, m.Host.id == m.VfAssignment.host_id)
                 .join(m.Vm, m.Vm.id == m.VfAssignment.vm_id)
                 .order_by(m.Host.name, m.VfAssignment.vf_index))
            if host is not None:
                q = q.where(m.Host.id == rows.host(s, host).id)
            return tuple(VfAssignmentView(h, VfIndex(a.vf_index), v, a.assigned_at)
                         for a, h, v in s.execute(q))

        return self._read(op)

    # -- event log -------------------------------------------------------------------------

    def event_append(self, kind: str, *, claim: str | None = None, host: str | None = None,
                     vm: str | None = None, vdisk: str | None = None,
                     vport: str | None = None, migration: str | None = None,
                     detail: dict[str, Any] | None = None) -> EventView:
        """Log a claim step or a migration phase (``detail`` must be JSON-able)."""
        if not kind or len(kind) > 64:
            raise InvalidArgumentError(f"event kind {kind!r} must be 1..64 characters")
        return self._write(lambda s: rows.event_view(self._event(
            s, kind, claim=claim, host=host, vm=vm, vdisk=vdisk, vport=vport,
            migration=migration, detail=detail)))

    def event_list(self, *, kind: str | None = None, claim: str | None = None,
                   vm: str | None = None, after_id: int = 0,
                   limit: int = 1000) -> tuple[EventView, ...]:
        """Events in order, after ``after_id`` (to follow the log), at most ``limit``."""
        def op(s: Session) -> tuple[EventView, ...]:
            q = select(m.Event).where(m.Event.id > after_id).order_by(m.Event.id).limit(limit)
            if kind is not None:
                q = q.where(m.Event.kind == kind)
            if claim is not None:
                q = q.where(m.Event.claim == claim)
            if vm is not None:
                q = q.where(m.Event.vm == vm)
            return tuple(rows.event_view(e) for e in s.scalars(q))

        return self._read(op)

    # -- migrations (claim X4) ----------------------------------------------------------------

    def migration_begin(self, ident: str, vm: str, *, source: str,
                        destination: str) -> MigrationView:
        """Record a migration of ``vm`` from ``source`` to ``destination`` (running)."""
        _check_name(ident, "migration id")

        def op(s: Session) -> MigrationView:
            vm_row = rows.vm(s, vm)
            src, dst = rows.host(s, source), rows.host(s, destination)
            if s.get(m.MigrationRecord, ident) is not None:
                raise ConflictError(f"migration {ident!r} exists")
            row = m.MigrationRecord(id=ident, vm_id=vm_row.id, vm_name=vm,
                                    source_host_id=src.id, destination_host_id=dst.id,
                                    started_at=self._now(), finished_at=None, phases={},
                                    outcome=MigrationOutcome.RUNNING.value, detail={})
            s.add(row)
            s.flush()
            self._event(s, "migration_begin", vm=vm, host=source, migration=ident,
                        detail={"to": destination})
            return rows.migration_view(s, row)

        return self._write(op)

    def migration_update(self, ident: str, *, phases: dict[str, Any] | None = None,
                         detail: dict[str, Any] | None = None,
                         outcome: MigrationOutcome | None = None) -> MigrationView:
        """Replace the report (``phases``), merge ``detail``; a final ``outcome`` sets
        the finish time."""
        def op(s: Session) -> MigrationView:
            row = self._migration_row(s, ident)
            if phases is not None:
                row.phases = dict(phases)
            if detail:
                row.detail = {**row.detail, **detail}
            if outcome is not None:
                row.outcome = outcome.value
                if outcome is not MigrationOutcome.RUNNING:
                    row.finished_at = self._now()
                    self._event(s, f"migration_{outcome.value}", vm=row.vm_name,
                                migration=ident, detail={})
            s.flush()
            return rows.migration_view(s, row)

        return self._write(op)

    @staticmethod
    def _migration_row(s: Session, ident: str) -> m.MigrationRecord:
        """The migration's row, locked: its ``detail`` is read, merged and written back
        in one transaction (the decision below must never be lost to a merge)."""
        row = s.scalar(rows.locked(select(m.MigrationRecord)
                                   .where(m.MigrationRecord.id == ident)))
        if row is None:
            raise NotFoundError(f"no migration {ident!r}")
        return row

    def migration_commit(self, ident: str, vm: str, destination: str) -> bool:
        """The commit point of a migration: move ``vm`` (and its vport) to
        ``destination`` unless the destination gave the migration up first
        (:meth:`migration_give_up`). The two decide on the same locked row, so exactly
        one of them wins, and the decision (``detail.decision``) never changes after.
        True: committed."""
        def op(s: Session) -> bool:
            row = self._migration_row(s, ident)
            decision = row.detail.get("decision")
            if decision == "aborted":
                return False
            if decision != "committed":
                row.detail = {**row.detail, "decision": "committed"}
                self._move_vm(s, rows.vm(s, vm, lock=True), destination)
            s.flush()
            return True

        return self._write(op)

    def migration_give_up(self, ident: str) -> bool:
        """A migration's destination lost its source (or restarted) after READY and
        before COMMIT: decide "aborted" unless the source committed first; from then on
        the source's :meth:`migration_commit` fails. True: the source had committed (the
        VM is the destination's)."""
        def op(s: Session) -> bool:
            row = self._migration_row(s, ident)
            decision = row.detail.get("decision")
            if decision == "committed":
                return True
            if decision != "aborted":
                row.detail = {**row.detail, "decision": "aborted"}
                s.flush()
            return False

        return self._write(op)

    def migration_get(self, ident: str) -> MigrationView:
        def op(s: Session) -> MigrationView:
            row = s.get(m.MigrationRecord, ident)
            if row is None:
                raise NotFoundError(f"no migration {ident!r}")
            return rows.migration_view(s, row)

        return self._read(op)

    def migration_list(self, *, vm: str | None = None,
                       limit: int = 100) -> tuple[MigrationView, ...]:
        """Newest first."""
        def op(s: Session) -> tuple[MigrationView, ...]:
            q = select(m.MigrationRecord).order_by(m.MigrationRecord.started_at.desc(),
                                                   m.MigrationRecord.id).limit(limit)
            if vm is not None:
                q = q.where(m.MigrationRecord.vm_name == vm)
            return tuple(rows.migration_view(s, r) for r in s.scalars(q))

        return self._read(op)

    # -- names -----------------------------------------------------------------------------

    def _new_vdisk_names(self, s: Session) -> VdiskNames:
        for _ in range(_NAME_ATTEMPTS):
            names = VdiskNames.from_random(self._rng.getrandbits(32))
            if s.get(m.Vdisk, names.id) is None and not rows.wwn_used(s, names.lu_wwn):
                return names
        raise ConflictError(f"no free vdisk id after {_NAME_ATTEMPTS} random draws")

    def _new_vport_names(self, s: Session, avoid: set[Wwn]) -> VportNames:
        for _ in range(_NAME_ATTEMPTS):
            names = VportNames.from_random(self._rng.getrandbits(32))
            if not any(w in avoid or rows.wwn_used(s, w) for w in names.all()):
                return names
        raise ConflictError(f"no free vport names after {_NAME_ATTEMPTS} random draws")


def _pick_address(used: dict[tuple[int, int], str], target: int | None,
                  lun: int | None) -> tuple[int, int]:
    if lun is not None:
        return (0 if target is None else target, lun)
    targets = range(MAX_TARGET + 1) if target is None else (target,)
    for t in targets:
        for u in range(MAX_LUN + 1):
            if (t, u) not in used:
                return (t, u)
    raise ConflictError(f"no free LUN under target {target}")

