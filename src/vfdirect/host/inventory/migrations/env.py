"""Alembic's entry point for the inventory's migrations.

Run programmatically, it migrates the connection the caller put in
``config.attributes["connection"]``, inside the caller's transaction (which holds the
migration lock). Run by the ``alembic`` command (to write a new revision, say:
``alembic -x url=sqlite:////tmp/inv.db -c /dev/null revision --autogenerate``, with
``script_location`` pointing here), it connects to ``-x url=...`` itself.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from vfdirect.host.inventory.database import DatabaseOptions, database_url, make_engine
from vfdirect.host.inventory.models import Base


def _migrate(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite alters tables by copying them ("batch" mode); harmless elsewhere.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def _run() -> None:
    if context.is_offline_mode():
        raise RuntimeError("the inventory's migrations run online only")
    connection = context.config.attributes.get("connection")
    if isinstance(connection, Connection):
        _migrate(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        raise RuntimeError("give the database: alembic -x url=... (SQLite path or URL)")
    engine = make_engine(database_url(url), DatabaseOptions())
    try:
        with engine.connect() as conn:
            _migrate(conn)
            conn.commit()
    finally:
        engine.dispose()


_run()
