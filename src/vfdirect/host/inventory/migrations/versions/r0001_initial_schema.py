"""The inventory's first schema: hosts, storage, datastores, vdisks and both mappings,
VMs, VF assignments, vports, migration records and the event log.

Revision ID: r0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "r0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

# Frozen copies of the column types (a migration must not change when models.py does).
NAME = sa.String(length=64)
WWN = sa.String(length=36)
PATH = sa.String(length=4096)


def _time(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _json(name: str) -> sa.Column[object]:
    return sa.Column(
        name, sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False
    )


def _big_id() -> sa.Column[object]:
    return sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False)


def _fk(table: str, cols: list[str], ref: str, ref_cols: list[str],
        ondelete: str | None = None) -> sa.ForeignKeyConstraint:
    name = f"fk_{table}_{'_'.join(cols)}_{ref}"
    return sa.ForeignKeyConstraint(
        cols, [f"{ref}.{c}" for c in ref_cols], name=op.f(name), ondelete=ondelete
    )


def _index(table: str, *cols: str) -> None:
    op.create_index(op.f(f"ix_{table}_{'_'.join(cols)}"), table, list(cols), unique=False)


def upgrade() -> None:
    op.create_table(
        "hosts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("api_address", sa.String(length=256), nullable=True),
        sa.Column("run_dir", PATH, nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        _time("heartbeat_at", nullable=True),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_hosts")),
        sa.UniqueConstraint("name", name=op.f("uq_hosts_name")),
    )
    op.create_table(
        "world_wide_names",
        sa.Column("wwn", WWN, nullable=False),
        sa.Column("kind", sa.String(length=24), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("wwn", name=op.f("pk_world_wide_names")),
    )
    op.create_table(
        "storage_arrays",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wwn", WWN, nullable=False),
        sa.Column("directory", PATH, nullable=False),
        _json("target_ports"),
        _time("created_at"),
        _fk("storage_arrays", ["wwn"], "world_wide_names", ["wwn"]),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_storage_arrays")),
        sa.UniqueConstraint("wwn", name=op.f("uq_storage_arrays_wwn")),
    )
    op.create_table(
        "physical_luns",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("array_id", sa.Integer(), nullable=False),
        sa.Column("lun_number", sa.Integer(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("num_blocks", sa.BigInteger(), nullable=False),
        sa.Column("backing", sa.String(length=16), nullable=False),
        sa.Column("path", PATH, nullable=False),
        sa.CheckConstraint("backing IN ('file', 'blockdev')",
                           name=op.f("ck_physical_luns_backing")),
        sa.CheckConstraint("block_size IN (512, 4096)", name=op.f("ck_physical_luns_block_size")),
        sa.CheckConstraint("lun_number >= 0 AND lun_number <= 16383",
                           name=op.f("ck_physical_luns_lun_number")),
        sa.CheckConstraint("num_blocks > 0", name=op.f("ck_physical_luns_num_blocks")),
        _fk("physical_luns", ["array_id"], "storage_arrays", ["id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_physical_luns")),
        sa.UniqueConstraint("array_id", "lun_number",
                            name=op.f("uq_physical_luns_array_id_lun_number")),
    )
    op.create_table(
        "datastores",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("chunk_blocks", sa.Integer(), nullable=False),
        _time("created_at"),
        sa.CheckConstraint("block_size IN (512, 4096)", name=op.f("ck_datastores_block_size")),
        sa.CheckConstraint("chunk_blocks > 0", name=op.f("ck_datastores_chunk_blocks")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datastores")),
        sa.UniqueConstraint("name", name=op.f("uq_datastores_name")),
    )
    op.create_table(
        "datastore_luns",
        sa.Column("lun_id", sa.Integer(), nullable=False),
        sa.Column("datastore_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        _fk("datastore_luns", ["datastore_id"], "datastores", ["id"], ondelete="CASCADE"),
        _fk("datastore_luns", ["lun_id"], "physical_luns", ["id"]),
        sa.PrimaryKeyConstraint("lun_id", name=op.f("pk_datastore_luns")),
        sa.UniqueConstraint("datastore_id", "position",
                            name=op.f("uq_datastore_luns_datastore_id_position")),
    )
    _index("datastore_luns", "datastore_id")
    op.create_table(
        "dirty_ranges",
        _big_id(),
        sa.Column("datastore_id", sa.Integer(), nullable=False),
        sa.Column("lun_id", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("start >= 0 AND count > 0", name=op.f("ck_dirty_ranges_range")),
        _fk("dirty_ranges", ["datastore_id"], "datastores", ["id"], ondelete="CASCADE"),
        _fk("dirty_ranges", ["lun_id"], "physical_luns", ["id"]),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dirty_ranges")),
    )
    _index("dirty_ranges", "datastore_id", "lun_id", "start")
    op.create_table(
        "vdisks",
        sa.Column("id", NAME, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("datastore_id", sa.Integer(), nullable=False),
        sa.Column("capacity_blocks", sa.BigInteger(), nullable=False),
        sa.Column("block_size", sa.Integer(), nullable=False),
        sa.Column("thin", sa.Boolean(), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("lu_wwn", WWN, nullable=False),
        _time("created_at"),
        sa.CheckConstraint("block_size IN (512, 4096)", name=op.f("ck_vdisks_block_size")),
        sa.CheckConstraint("capacity_blocks > 0", name=op.f("ck_vdisks_capacity")),
        _fk("vdisks", ["datastore_id"], "datastores", ["id"]),
        _fk("vdisks", ["lu_wwn"], "world_wide_names", ["wwn"]),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vdisks")),
        sa.UniqueConstraint("lu_wwn", name=op.f("uq_vdisks_lu_wwn")),
        sa.UniqueConstraint("name", name=op.f("uq_vdisks_name")),
        sa.UniqueConstraint("serial", name=op.f("uq_vdisks_serial")),
    )
    _index("vdisks", "datastore_id")
    op.create_table(
        "extents",
        sa.Column("vdisk_id", NAME, nullable=False),
        sa.Column("idx", sa.Integer(), nullable=False),
        sa.Column("vlba", sa.BigInteger(), nullable=False),
        sa.Column("lun_id", sa.Integer(), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("vlba >= 0 AND start >= 0 AND count > 0",
                           name=op.f("ck_extents_range")),
        _fk("extents", ["lun_id"], "physical_luns", ["id"]),
        _fk("extents", ["vdisk_id"], "vdisks", ["id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("vdisk_id", "idx", name=op.f("pk_extents")),
    )
    _index("extents", "lun_id", "start")
    op.create_table(
        "vms",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=True),
        sa.Column("memory_bytes", sa.BigInteger(), nullable=False),
        sa.Column("runtime", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.CheckConstraint("memory_bytes > 0", name=op.f("ck_vms_memory")),
        sa.CheckConstraint("runtime IN ('python', 'qemu')", name=op.f("ck_vms_runtime")),
        _fk("vms", ["host_id"], "hosts", ["id"]),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vms")),
        sa.UniqueConstraint("name", name=op.f("uq_vms_name")),
    )
    _index("vms", "host_id")
    op.create_table(
        "vf_assignments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_id", sa.Integer(), nullable=False),
        sa.Column("vf_index", sa.Integer(), nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        _time("assigned_at"),
        sa.CheckConstraint("vf_index >= 0 AND vf_index <= 255",
                           name=op.f("ck_vf_assignments_vf_index")),
        _fk("vf_assignments", ["host_id"], "hosts", ["id"]),
        _fk("vf_assignments", ["vm_id"], "vms", ["id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vf_assignments")),
        sa.UniqueConstraint("host_id", "vf_index", name=op.f("uq_vf_assignments_host_id_vf_index")),
        sa.UniqueConstraint("host_id", "vm_id", name=op.f("uq_vf_assignments_host_id_vm_id")),
    )
    _index("vf_assignments", "vm_id")
    op.create_table(
        "vports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("wwpn", WWN, nullable=False),
        sa.Column("wwnn", WWN, nullable=False),
        sa.Column("alternate_wwpn", WWN, nullable=True),
        sa.Column("vm_id", sa.Integer(), nullable=True),
        sa.Column("host_id", sa.Integer(), nullable=True),
        _time("created_at"),
        _fk("vports", ["alternate_wwpn"], "world_wide_names", ["wwn"]),
        _fk("vports", ["host_id"], "hosts", ["id"]),
        _fk("vports", ["vm_id"], "vms", ["id"]),
        _fk("vports", ["wwnn"], "world_wide_names", ["wwn"]),
        _fk("vports", ["wwpn"], "world_wide_names", ["wwn"]),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_vports")),
        sa.UniqueConstraint("alternate_wwpn", name=op.f("uq_vports_alternate_wwpn")),
        sa.UniqueConstraint("vm_id", "id", name=op.f("uq_vports_vm_id_id")),
        sa.UniqueConstraint("vm_id", name=op.f("uq_vports_vm_id")),
        sa.UniqueConstraint("wwnn", name=op.f("uq_vports_wwnn")),
        sa.UniqueConstraint("wwpn", name=op.f("uq_vports_wwpn")),
    )
    _index("vports", "host_id")
    op.create_table(
        "vdisk_addresses",
        sa.Column("vdisk_id", NAME, nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=False),
        sa.Column("vport_id", sa.Integer(), nullable=True),
        sa.Column("target", sa.Integer(), nullable=False),
        sa.Column("lun", sa.Integer(), nullable=False),
        _time("attached_at"),
        sa.CheckConstraint("lun >= 0 AND lun <= 16383", name=op.f("ck_vdisk_addresses_lun")),
        sa.CheckConstraint("target >= 0 AND target <= 255",
                           name=op.f("ck_vdisk_addresses_target")),
        _fk("vdisk_addresses", ["vdisk_id"], "vdisks", ["id"], ondelete="CASCADE"),
        _fk("vdisk_addresses", ["vm_id", "vport_id"], "vports", ["vm_id", "id"]),
        _fk("vdisk_addresses", ["vm_id"], "vms", ["id"]),
        sa.PrimaryKeyConstraint("vdisk_id", name=op.f("pk_vdisk_addresses")),
        sa.UniqueConstraint("vm_id", "target", "lun",
                            name=op.f("uq_vdisk_addresses_vm_id_target_lun")),
        sa.UniqueConstraint("vport_id", "target", "lun",
                            name=op.f("uq_vdisk_addresses_vport_id_target_lun")),
    )
    op.create_table(
        "migrations",
        sa.Column("id", NAME, nullable=False),
        sa.Column("vm_id", sa.Integer(), nullable=True),
        sa.Column("vm_name", NAME, nullable=False),
        sa.Column("source_host_id", sa.Integer(), nullable=True),
        sa.Column("destination_host_id", sa.Integer(), nullable=True),
        _time("started_at"),
        _time("finished_at", nullable=True),
        _json("phases"),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        _json("detail"),
        _fk("migrations", ["destination_host_id"], "hosts", ["id"]),
        _fk("migrations", ["source_host_id"], "hosts", ["id"]),
        _fk("migrations", ["vm_id"], "vms", ["id"], ondelete="SET NULL"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_migrations")),
    )
    _index("migrations", "vm_id")
    op.create_table(
        "events",
        _big_id(),
        _time("at"),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("claim", sa.String(length=8), nullable=True),
        sa.Column("host", NAME, nullable=True),
        sa.Column("vm", NAME, nullable=True),
        sa.Column("vdisk", NAME, nullable=True),
        sa.Column("vport", WWN, nullable=True),
        sa.Column("migration", NAME, nullable=True),
        _json("detail"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    _index("events", "at")
    _index("events", "kind")
    _index("events", "vm")


def downgrade() -> None:
    for table in (
        "events", "migrations", "vdisk_addresses", "vports", "vf_assignments", "vms",
        "extents", "vdisks", "dirty_ranges", "datastore_luns", "datastores",
        "physical_luns", "storage_arrays", "world_wide_names", "hosts",
    ):
        op.drop_table(table)
