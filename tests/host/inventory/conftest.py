"""Fixtures of the inventory tests: every test that takes ``db_url`` (or ``inventory``)
runs once on an SQLite file and once on PostgreSQL.

PostgreSQL: ``VFDIRECT_TEST_PG_URL`` names a server (``scripts/postgres-test-server.sh
start`` prints one); each test gets a schema of its own, dropped afterwards, so tests
never see each other's rows. Without the variable the PostgreSQL variants are skipped,
saying why.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from inventory_helpers import pg_schema_url

from vfdirect.host.inventory import Inventory

PG_URL_VAR = "VFDIRECT_TEST_PG_URL"


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A database of the inventory's own, empty: an SQLite file, or a fresh schema on
    the PostgreSQL test server."""
    if request.param == "sqlite":
        yield str(tmp_path / "inventory.db")
        return
    server = os.environ.get(PG_URL_VAR)
    if not server:
        pytest.skip(f"{PG_URL_VAR} is not set (start a server with "
                    "scripts/postgres-test-server.sh start)")
    with pg_schema_url(server) as url:
        yield url


@pytest.fixture
def inventory(db_url: str) -> Iterator[Inventory]:
    inv = Inventory.open(db_url)
    try:
        yield inv
    finally:
        inv.close()
