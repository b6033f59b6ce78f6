"""The schema: made by the shipped Alembic migrations, equal to the ORM models, upgraded
once however many processes open a new database together, and left alone on re-open."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from inventory_helpers import WAIT_S
from sqlalchemy import create_engine, inspect

from vfdirect.host.inventory import InvalidArgumentError, Inventory, head_revision
from vfdirect.host.inventory.database import MIGRATIONS_DIR, alembic_config
from vfdirect.host.inventory.models import Base

TABLES = {
    "hosts", "world_wide_names", "storage_arrays", "physical_luns", "datastores",
    "datastore_luns", "dirty_ranges", "vdisks", "extents", "vms", "vf_assignments", "vports",
    "vdisk_addresses", "migrations", "events",
}


def test_migrations_ship_inside_the_package() -> None:
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert sorted(p.name for p in (MIGRATIONS_DIR / "versions").glob("r*.py"))
    assert head_revision() == "r0001"


def test_open_upgrades_an_empty_database_to_head(db_url: str) -> None:
    with Inventory.open(db_url) as inv:
        assert inv.schema_revision() == head_revision()
        engine = create_engine(db_url if "://" in db_url else f"sqlite:///{db_url}")
        try:
            names = set(inspect(engine).get_table_names())
        finally:
            engine.dispose()
        assert names == TABLES | {"alembic_version"}


def test_schema_equals_the_models(db_url: str) -> None:
    """The migrations and models.py describe one schema (autogenerate finds nothing)."""
    Inventory.open(db_url).close()
    engine = create_engine(db_url if "://" in db_url else f"sqlite:///{db_url}")
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(ctx, Base.metadata) == []
    finally:
        engine.dispose()


def test_reopen_is_idempotent_and_keeps_rows(db_url: str) -> None:
    with Inventory.open(db_url) as inv:
        inv.host_register("h1")
        first = inv.event_list()
    for _ in range(2):
        with Inventory.open(db_url) as inv:
            assert inv.schema_revision() == head_revision()
            assert [h.name for h in inv.host_list()] == ["h1"]
            assert inv.event_list() == first


def test_downgrade_and_upgrade_again(db_url: str) -> None:
    """The migration's downgrade undoes it; opening migrates the empty database again."""
    Inventory.open(db_url).close()
    engine = create_engine(db_url if "://" in db_url else f"sqlite:///{db_url}")
    try:
        with engine.begin() as conn:
            command.downgrade(alembic_config(conn), "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    finally:
        engine.dispose()
    with Inventory.open(db_url) as inv:
        assert inv.schema_revision() == head_revision()
        assert inv.host_list() == ()


OPENER = """
import sys
from vfdirect.host.inventory import Inventory
with Inventory.open(sys.argv[1]) as inv:
    inv.host_register(sys.argv[2])
"""


def test_concurrent_first_opens_migrate_once(db_url: str) -> None:
    """Several processes open a new database together: one migrates, the others wait
    and find the schema there; everyone's rows land."""
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, db_url, f"h{i}"],
                              stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=WAIT_S)
        assert p.returncode == 0, err
    with Inventory.open(db_url) as inv:
        assert sorted(h.name for h in inv.host_list()) == ["h0", "h1", "h2"]


def test_sqlite_file_is_wal_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "inv.db"
    with Inventory.open(path) as inv:
        assert inv.backend == "sqlite"
        engine = inv._engine  # the connections the inventory itself uses
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000


def test_sqlite_write_transactions_take_the_write_lock_at_begin(tmp_path: Path) -> None:
    """A write transaction starts with BEGIN IMMEDIATE: from its first statement on, no
    other process can write (so two writers never read, then collide on upgrading);
    a read transaction (plain BEGIN) takes no lock and sees a snapshot."""
    path = tmp_path / "inv.db"
    with Inventory.open(path) as inv:
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            with inv._writer.connect() as conn, conn.begin():
                conn.exec_driver_sql("SELECT 1")
                with pytest.raises(sqlite3.OperationalError, match="locked"):
                    other.execute("BEGIN IMMEDIATE")
            with inv._engine.connect() as conn, conn.begin():
                conn.exec_driver_sql("SELECT count(*) FROM hosts")
                other.execute("BEGIN IMMEDIATE")
                other.execute("ROLLBACK")
        finally:
            other.close()


@pytest.mark.parametrize("target", [
    "sqlite://", "sqlite:///:memory:", "mysql://u@h/db", "postgresql+psycopg2://u@h/db",
])
def test_unsupported_databases_are_refused(target: str) -> None:
    with pytest.raises(InvalidArgumentError, match="inventory database"):
        Inventory.open(target)
