"""Alembic migrations of the inventory's schema (run by :func:`..database.upgrade_to_head`)."""
