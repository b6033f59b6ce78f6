"""Helpers of the storage shell tests (used by conftest.py and the test modules):
backends of every kind, loop devices that are always detached, and a spy on the system
calls that make writes durable."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from vfdirect.storage import BlockDeviceBackend, FileBackend, LunBackend, MemoryBackend

#: Every losetup/subprocess call is bounded.
LOSETUP_TIMEOUT_S = 20

BACKEND_KINDS = ("memory", "file", "loop")


def _losetup_reason() -> str | None:
    """Why loop devices cannot be used here, or None if they can."""
    if shutil.which("losetup") is None:
        return "losetup is not installed"
    if os.geteuid() != 0:
        return "loop devices need root"
    if not Path("/dev/loop-control").exists():
        return "no /dev/loop-control (loop module not loaded)"
    return None


class LoopDevices:
    """Attaches loop devices on files; :meth:`detach_all` always runs in teardown."""

    def __init__(self, tmp: Path) -> None:
        self._tmp = tmp
        self._attached: list[str] = []

    def attach(self, num_bytes: int, block_size: int = 512) -> str:
        reason = _losetup_reason()
        if reason:
            pytest.skip(f"loop backend skipped: {reason}")
        image = self._tmp / f"loop-{len(self._attached)}.img"
        with image.open("wb") as f:
            f.truncate(num_bytes)
        cmd = ["losetup", "--find", "--show", "--sector-size", str(block_size), str(image)]
        try:
            out = subprocess.run(
                cmd, capture_output=True, text=True, check=True, timeout=LOSETUP_TIMEOUT_S
            )
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = getattr(exc, "stderr", None) or str(exc)
            pytest.skip(f"loop backend skipped: losetup failed: {detail.strip()}")
        device = out.stdout.strip()
        self._attached.append(device)
        return device

    def detach_all(self) -> None:
        errors = []
        while self._attached:
            device = self._attached.pop()
            res = subprocess.run(
                ["losetup", "--detach", device],
                capture_output=True, text=True, timeout=LOSETUP_TIMEOUT_S, check=False,
            )
            if res.returncode != 0:
                errors.append(f"{device}: {res.stderr.strip()}")
        assert not errors, f"could not detach loop devices: {errors}"


@dataclass
class BackendUnderTest:
    kind: str
    backend: LunBackend
    #: Path an independent reader can open (None for the memory backend).
    path: Path | None


@dataclass
class BackendFactory:
    tmp: Path
    loops: LoopDevices
    opened: list[LunBackend] = field(default_factory=list)

    def __call__(self, kind: str, block_size: int, num_blocks: int) -> BackendUnderTest:
        backend: LunBackend
        path: Path | None
        if kind == "memory":
            backend, path = MemoryBackend(block_size, num_blocks), None
        elif kind == "file":
            path = self.tmp / f"lun-{len(self.opened)}.img"
            backend = FileBackend.create(path, block_size, num_blocks)
        elif kind == "loop":
            path = Path(self.loops.attach(block_size * num_blocks, block_size))
            backend = BlockDeviceBackend(path)
        else:  # pragma: no cover
            raise AssertionError(kind)
        self.opened.append(backend)
        return BackendUnderTest(kind, backend, path)

    def close_all(self) -> None:
        for backend in self.opened:
            backend.close()


@dataclass
class SyscallSpy:
    """Records pwritev flags and fdatasync calls, delegating to the real calls."""

    pwritev_flags: list[int] = field(default_factory=list)
    fdatasyncs: list[int] = field(default_factory=list)

    @property
    def durable_writes(self) -> int:
        dsync = getattr(os, "RWF_DSYNC", 0)
        return sum(1 for f in self.pwritev_flags if dsync and f & dsync)
