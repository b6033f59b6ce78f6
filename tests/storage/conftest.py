"""Fixtures for the storage shell tests (the helpers live in storage_helpers.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from storage_helpers import BackendFactory, LoopDevices, SyscallSpy


@pytest.fixture
def loop_devices(tmp_path: Path) -> Iterator[LoopDevices]:
    loops = LoopDevices(tmp_path)
    try:
        yield loops
    finally:
        loops.detach_all()


@pytest.fixture
def make_backend(tmp_path: Path, loop_devices: LoopDevices) -> Iterator[BackendFactory]:
    """Backends are closed before their loop devices are detached (fixture order)."""
    factory = BackendFactory(tmp_path, loop_devices)
    try:
        yield factory
    finally:
        factory.close_all()


@pytest.fixture
def syscall_spy(monkeypatch: pytest.MonkeyPatch) -> SyscallSpy:
    spy = SyscallSpy()
    real_pwritev: Callable[..., int] = os.pwritev
    real_fdatasync: Callable[[int], None] = os.fdatasync

    def pwritev(fd: int, bufs: object, offset: int, flags: int = 0) -> int:
        spy.pwritev_flags.append(flags)
        return real_pwritev(fd, bufs, offset, flags)

    def fdatasync(fd: int) -> None:
        spy.fdatasyncs.append(fd)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "pwritev", pwritev)
    monkeypatch.setattr(os, "fdatasync", fdatasync)
    return spy
