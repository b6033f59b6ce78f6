"""The VM tests share the in-process device of tests/core/guest and the adapter test
helpers (tests/adapter), and the fixtures below: a SAN, an adapter daemon, VM processes
that are always reaped, and memory files that are always removed."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parents[1]
for sub in ("core/guest", "adapter"):
    path = str(_TESTS / sub)
    if path not in sys.path:
        sys.path.insert(0, path)


from daemon_helpers import Daemon, make_san  # noqa: E402 (after the path set-up above)
from vm_helpers import VmProc, shm_path, unlink  # noqa: E402

from vfdirect.storage import StorageArray  # noqa: E402


@pytest.fixture
def san(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


@pytest.fixture
def adapter(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "host1")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


@pytest.fixture
def vms() -> Iterator[list[VmProc]]:
    started: list[VmProc] = []
    yield started
    for vm in started:
        vm.stop()


@pytest.fixture
def memfile(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = shm_path(request.node.name[:40])
    yield path
    unlink(path)
