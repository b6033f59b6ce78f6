"""Connecting to the inventory's database, and bringing its schema to the current head.

Rules of this module:

* **SQLite** (the default, one file per machine or per host): every connection turns on
  foreign keys and a busy timeout, and the file is in WAL mode, so readers never block
  the writer and several host processes share the file safely. The driver's own
  transaction handling is switched off and this module issues ``BEGIN`` itself:
  ``BEGIN IMMEDIATE`` for a write transaction (the write lock is taken first, so two
  writers never both read, then collide on upgrading their locks), plain ``BEGIN`` for a
  read, which then sees one consistent snapshot;
* **PostgreSQL** (when a ``postgresql+psycopg://`` URL is given): READ COMMITTED, and the
  repository locks the rows an allocation depends on with ``SELECT ... FOR UPDATE``;
* the schema is made only by the Alembic migrations shipped in ``migrations/``; opening
  upgrades to head inside one transaction that first takes the write lock (SQLite) or a
  transaction-scoped advisory lock (PostgreSQL), so processes opening one database
  together migrate it once.
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.pool import ConnectionPoolEntry

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
#: Execution option that makes a transaction a write transaction (``BEGIN IMMEDIATE``).
WRITE_OPTION = "vfdirect_write"
#: Key of the PostgreSQL advisory lock held while migrating ("vfdinv" in ASCII).
MIGRATION_LOCK_KEY = 0x7666_6469_6E76
DEFAULT_BUSY_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class DatabaseOptions:
    busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S
    echo: bool = False


def database_url(target: str | os.PathLike[str]) -> URL:
    """A SQLAlchemy URL from a URL or a plain file path (an SQLite file). Only SQLite and
    PostgreSQL through psycopg 3 are supported."""
    text_target = os.fspath(target)
    if "://" not in text_target:
        return URL.create("sqlite+pysqlite", database=str(Path(text_target).resolve()))
    url = make_url(text_target)
    if url.get_backend_name() == "postgresql":
        if url.get_driver_name() not in ("psycopg", ""):
            raise ValueError(f"{url.drivername}: the inventory uses psycopg 3 (postgresql+psycopg)")
        return url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            raise ValueError("the inventory needs an SQLite file, not an in-memory database")
        return url.set(drivername="sqlite+pysqlite")
    raise ValueError(f"{url.drivername}: the inventory runs on SQLite or PostgreSQL")


def make_engine(url: URL, options: DatabaseOptions) -> Engine:
    if url.get_backend_name() == "sqlite":
        assert url.database is not None
        Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=options.echo,
            connect_args={"timeout": options.busy_timeout_s, "check_same_thread": False},
        )
        _sqlite_setup(engine, options)
        return engine
    return create_engine(url, echo=options.echo, pool_pre_ping=True)


def _journal_mode_wal(cursor: Any, timeout_s: float) -> Any:
    """``PRAGMA journal_mode = WAL``, retried while another process holds the lock:
    SQLite may answer this pragma SQLITE_BUSY at once, without its busy handler (seen
    when several processes open a new database together)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return cursor.execute("PRAGMA journal_mode = WAL").fetchone()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() >= deadline:
                raise
            time.sleep(0.01)


def _sqlite_setup(engine: Engine, options: DatabaseOptions) -> None:
    busy_ms = max(1, round(options.busy_timeout_s * 1000))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # The driver must not open transactions on its own: _on_begin does, with the
        # right mode (pysqlite's legacy behaviour would defer BEGIN past the first read).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout = {busy_ms}")
            cursor.execute("PRAGMA foreign_keys = ON")
            mode = _journal_mode_wal(cursor, options.busy_timeout_s)
            if mode is None or str(mode[0]).lower() != "wal":
                raise RuntimeError(f"SQLite refused WAL mode (journal_mode is {mode!r})")
            cursor.execute("PRAGMA synchronous = FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        write = bool(conn.get_execution_options().get(WRITE_OPTION))
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")


def alembic_config(connection: Connection | None = None) -> Config:
    """The Alembic configuration of the shipped migrations (no ``alembic.ini`` needed);
    ``connection`` is what ``env.py`` migrates."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its migrations
        raise RuntimeError(f"no migrations in {MIGRATIONS_DIR}")
    return head


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Apply every missing migration, atomically, once across concurrent openers."""
    writer = engine.execution_options(**{WRITE_OPTION: True})
    with writer.connect() as conn, conn.begin():
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
        current = MigrationContext.configure(conn).get_current_revision()
        if current != head_revision():
            command.upgrade(alembic_config(conn), "head")
