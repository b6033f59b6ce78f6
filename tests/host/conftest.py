"""Fixtures of the host daemon tests (the inventory's own tests keep theirs in
``inventory/``)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from host_helpers import Host, make_san

from vfdirect.storage import StorageArray


@pytest.fixture
def san(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


@pytest.fixture
def hosts() -> Iterator[list[Host]]:
    """Hosts a test starts; all stopped and reaped afterwards."""
    started: list[Host] = []
    yield started
    for h in started:
        h.cleanup()


@pytest.fixture
def host(tmp_path: Path, san: StorageArray, hosts: list[Host]) -> Host:
    h = Host(tmp_path / "run", arrays=(san.directory,))
    hosts.append(h)
    return h.start()
