"""The inventory's tables (SQLAlchemy 2 typed ORM); the schema itself is made by the
Alembic migrations in ``migrations/versions``, which must stay equal to these models
(``tests/host/inventory`` compares them).

Rules of this module:

* these classes never leave :mod:`vfdirect.host.inventory`: the repository turns rows
  into the frozen records of :mod:`.views` inside the transaction;
* what must always hold is a constraint, so two processes cannot break it between them:
  unique names, one datastore per LUN, one VM per vdisk (the address row's primary key),
  one address per (VM, target, LUN) and per (vport, target, LUN), one vport per VM, and
  every World Wide Name once in :class:`WorldWideName`;
* the second mapping row carries its vport, and a composite foreign key ties that vport
  to the row's VM: an address can only name the vport of the VM it belongs to;
* times are timezone-aware UTC in Python (:class:`UtcDateTime`), whatever the backend;
* constraint names follow :data:`NAMING_CONVENTION`, so migrations name them the same on
  SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Longest name of a host, datastore, vdisk or VM.
NAME_LEN = 64
#: Canonical WWN text: ``naa.`` and 16 or 32 hex digits.
WWN_LEN = 36
PATH_LEN = 4096


class UtcDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; ``timestamptz`` on PostgreSQL, naive UTC text on
    SQLite (which has no time zones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the inventory stores aware UTC times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON documents: ``jsonb`` on PostgreSQL, JSON text on SQLite.
JsonDoc: TypeEngine[Any] = JSON().with_variant(JSONB(), "postgresql")
#: A 64-bit surrogate key that SQLite still auto-increments (only ``INTEGER PRIMARY KEY``
#: is a rowid alias there).
BigId: TypeEngine[int] = BigInteger().with_variant(Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UtcDateTime()}  # noqa: RUF012  (SQLAlchemy's API)


class Host(Base):
    """A hypervisor: one ``vfdirect host`` process (with its adapter)."""

    __tablename__ = "hosts"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    api_address: Mapped[str | None] = mapped_column(String(256))
    run_dir: Mapped[str | None] = mapped_column(String(PATH_LEN))
    state: Mapped[str] = mapped_column(String(16))
    heartbeat_at: Mapped[datetime | None]
    created_at: Mapped[datetime]


class WorldWideName(Base):
    """Every WWN the inventory knows, once: arrays, their target ports, vport port and
    node names (alternates too) and LU names. Uniqueness across all of them is this
    table's primary key (claim A5: a vport's names are unique in the fabric)."""

    __tablename__ = "world_wide_names"

    wwn: Mapped[str] = mapped_column(String(WWN_LEN), primary_key=True)
    kind: Mapped[str] = mapped_column(String(24))
    created_at: Mapped[datetime]


class StorageArray(Base):
    __tablename__ = "storage_arrays"

    id: Mapped[int] = mapped_column(primary_key=True)
    wwn: Mapped[str] = mapped_column(
        String(WWN_LEN), ForeignKey("world_wide_names.wwn"), unique=True
    )
    directory: Mapped[str] = mapped_column(String(PATH_LEN))
    target_ports: Mapped[list[str]] = mapped_column(JsonDoc)
    created_at: Mapped[datetime]


class PhysicalLunRow(Base):
    __tablename__ = "physical_luns"
    __table_args__ = (
        UniqueConstraint("array_id", "lun_number"),
        CheckConstraint("lun_number >= 0 AND lun_number <= 16383", name="lun_number"),
        CheckConstraint("block_size IN (512, 4096)", name="block_size"),
        CheckConstraint("num_blocks > 0", name="num_blocks"),
        CheckConstraint("backing IN ('file', 'blockdev')", name="backing"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    array_id: Mapped[int] = mapped_column(ForeignKey("storage_arrays.id", ondelete="CASCADE"))
    lun_number: Mapped[int]
    block_size: Mapped[int]
    num_blocks: Mapped[int] = mapped_column(BigInteger)
    backing: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(PATH_LEN))


class DatastoreRow(Base):
    __tablename__ = "datastores"
    __table_args__ = (
        CheckConstraint("block_size IN (512, 4096)", name="block_size"),
        CheckConstraint("chunk_blocks > 0", name="chunk_blocks"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    block_size: Mapped[int]
    chunk_blocks: Mapped[int]
    created_at: Mapped[datetime]


class DatastoreLun(Base):
    """A member LUN of a datastore; ``position`` is the allocator's LUN order. A LUN
    belongs to at most one datastore (the primary key)."""

    __tablename__ = "datastore_luns"
    __table_args__ = (UniqueConstraint("datastore_id", "position"),)

    lun_id: Mapped[int] = mapped_column(ForeignKey("physical_luns.id"), primary_key=True)
    datastore_id: Mapped[int] = mapped_column(
        ForeignKey("datastores.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int]


class DirtyRange(Base):
    """Freed space still holding its last owner's data: zeroed by the host, then
    returned to free space (zero-on-reuse)."""

    __tablename__ = "dirty_ranges"
    __table_args__ = (
        CheckConstraint("start >= 0 AND count > 0", name="range"),
        Index(None, "datastore_id", "lun_id", "start"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    datastore_id: Mapped[int] = mapped_column(ForeignKey("datastores.id", ondelete="CASCADE"))
    lun_id: Mapped[int] = mapped_column(ForeignKey("physical_luns.id"))
    start: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(BigInteger)


class Vdisk(Base):
    __tablename__ = "vdisks"
    __table_args__ = (
        CheckConstraint("capacity_blocks > 0", name="capacity"),
        CheckConstraint("block_size IN (512, 4096)", name="block_size"),
    )

    id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    datastore_id: Mapped[int] = mapped_column(ForeignKey("datastores.id"), index=True)
    capacity_blocks: Mapped[int] = mapped_column(BigInteger)
    block_size: Mapped[int]
    thin: Mapped[bool] = mapped_column(Boolean)
    serial: Mapped[str] = mapped_column(String(64), unique=True)
    lu_wwn: Mapped[str] = mapped_column(
        String(WWN_LEN), ForeignKey("world_wide_names.wwn"), unique=True
    )
    created_at: Mapped[datetime]


class ExtentRow(Base):
    """The first mapping (claim A2): virtual blocks ``[vlba, vlba + count)`` of a vdisk
    live at ``[start, start + count)`` of a physical LUN; ``idx`` orders a vdisk's
    extents (its canonical layout's placements)."""

    __tablename__ = "extents"
    __table_args__ = (
        CheckConstraint("vlba >= 0 AND start >= 0 AND count > 0", name="range"),
        Index(None, "lun_id", "start"),
    )

    vdisk_id: Mapped[str] = mapped_column(
        ForeignKey("vdisks.id", ondelete="CASCADE"), primary_key=True
    )
    idx: Mapped[int] = mapped_column(primary_key=True)
    vlba: Mapped[int] = mapped_column(BigInteger)
    lun_id: Mapped[int] = mapped_column(ForeignKey("physical_luns.id"))
    start: Mapped[int] = mapped_column(BigInteger)
    count: Mapped[int] = mapped_column(BigInteger)


class Vm(Base):
    __tablename__ = "vms"
    __table_args__ = (
        CheckConstraint("memory_bytes > 0", name="memory"),
        CheckConstraint("runtime IN ('python', 'qemu')", name="runtime"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_LEN), unique=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"), index=True)
    memory_bytes: Mapped[int] = mapped_column(BigInteger)
    runtime: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    pid: Mapped[int | None]
    created_at: Mapped[datetime]
    updated_at: Mapped[datetime]


class VfAssignment(Base):
    """A VF of a host's adapter assigned to a VM (at most one per VM and host)."""

    __tablename__ = "vf_assignments"
    __table_args__ = (
        UniqueConstraint("host_id", "vf_index"),
        UniqueConstraint("host_id", "vm_id"),
        CheckConstraint("vf_index >= 0 AND vf_index <= 255", name="vf_index"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    host_id: Mapped[int] = mapped_column(ForeignKey("hosts.id"))
    vf_index: Mapped[int]
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id", ondelete="CASCADE"), index=True)
    assigned_at: Mapped[datetime]


class Vport(Base):
    """A virtual port (claim A5); ``vm_id`` associates it with a VM's mapping info
    (claim A6), at most one vport per VM."""

    __tablename__ = "vports"
    __table_args__ = (UniqueConstraint("vm_id", "id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    wwpn: Mapped[str] = mapped_column(
        String(WWN_LEN), ForeignKey("world_wide_names.wwn"), unique=True
    )
    wwnn: Mapped[str] = mapped_column(
        String(WWN_LEN), ForeignKey("world_wide_names.wwn"), unique=True
    )
    alternate_wwpn: Mapped[str | None] = mapped_column(
        String(WWN_LEN), ForeignKey("world_wide_names.wwn"), unique=True
    )
    vm_id: Mapped[int | None] = mapped_column(ForeignKey("vms.id"), unique=True)
    host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"), index=True)
    created_at: Mapped[datetime]


class VdiskAddressRow(Base):
    """The second mapping (claims A2, A3): the vdisk is attached to ``vm_id`` at
    (``target``, ``lun``), under the VM's vport once one is associated."""

    __tablename__ = "vdisk_addresses"
    __table_args__ = (
        UniqueConstraint("vm_id", "target", "lun"),
        UniqueConstraint("vport_id", "target", "lun"),
        ForeignKeyConstraint(["vm_id", "vport_id"], ["vports.vm_id", "vports.id"]),
        CheckConstraint("target >= 0 AND target <= 255", name="target"),
        CheckConstraint("lun >= 0 AND lun <= 16383", name="lun"),
    )

    vdisk_id: Mapped[str] = mapped_column(
        ForeignKey("vdisks.id", ondelete="CASCADE"), primary_key=True
    )
    vm_id: Mapped[int] = mapped_column(ForeignKey("vms.id"))
    vport_id: Mapped[int | None]
    target: Mapped[int]
    lun: Mapped[int]
    attached_at: Mapped[datetime]


class MigrationRecord(Base):
    """One live migration of a VM, with its per-phase timings (claim X4)."""

    __tablename__ = "migrations"

    id: Mapped[str] = mapped_column(String(NAME_LEN), primary_key=True)
    vm_id: Mapped[int | None] = mapped_column(
        ForeignKey("vms.id", ondelete="SET NULL"), index=True
    )
    vm_name: Mapped[str] = mapped_column(String(NAME_LEN))
    source_host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"))
    destination_host_id: Mapped[int | None] = mapped_column(ForeignKey("hosts.id"))
    started_at: Mapped[datetime]
    finished_at: Mapped[datetime | None]
    phases: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
    outcome: Mapped[str] = mapped_column(String(16))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc)


class Event(Base):
    """The event log: claim steps and migration phases, by time. Objects are named by
    text, not by key, so the log outlives what it talks about."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[datetime] = mapped_column(index=True)
    kind: Mapped[str] = mapped_column(String(64), index=True)
    claim: Mapped[str | None] = mapped_column(String(8))
    host: Mapped[str | None] = mapped_column(String(NAME_LEN))
    vm: Mapped[str | None] = mapped_column(String(NAME_LEN), index=True)
    vdisk: Mapped[str | None] = mapped_column(String(NAME_LEN))
    vport: Mapped[str | None] = mapped_column(String(WWN_LEN))
    migration: Mapped[str | None] = mapped_column(String(NAME_LEN))
    detail: Mapped[dict[str, Any]] = mapped_column(JsonDoc)
