"""Schema revisions, oldest first (``r0001_…``); Alembic orders them by their links."""
