from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vfdirect.transport.shm import SharedMemory, SharedMemoryError


def test_create_map_share_between_processes(tmp_path: Path) -> None:
    path = tmp_path / "vm.mem"
    with SharedMemory.create(path, 1 << 20) as mem:
        mem.buffer[100:105] = b"hello"
        # Another process maps the same file and sees the bytes, then writes its own.
        code = (
            "import sys; from vfdirect.transport.shm import SharedMemory\n"
            "m = SharedMemory.open(sys.argv[1]); b = m.buffer\n"
            "assert bytes(b[100:105]) == b'hello'; b[200:203] = b'abc'; del b; m.close()\n"
        )
        subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
        assert bytes(mem.buffer[200:203]) == b"abc"
    assert path.exists()
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_map_by_fd_with_offset(tmp_path: Path) -> None:
    path = tmp_path / "vm.mem"
    with SharedMemory.create(path, 3 * 4096) as mem:
        mem.buffer[4096 + 10] = 0x5A
        fd = os.dup(mem.fd)
        with SharedMemory(fd, 4096, offset=4096 + 0) as window:
            assert window.buffer[10] == 0x5A
            window.buffer[11] = 0xA5
        assert mem.buffer[4096 + 11] == 0xA5


def test_close_refuses_while_views_exported(tmp_path: Path) -> None:
    mem = SharedMemory.create(tmp_path / "m", 4096)
    held = mem.buffer[0:16]
    with pytest.raises(BufferError):
        mem.close()
    assert not mem.closed
    mem.buffer[0] = 7  # still mapped and usable after the refused close
    assert held[0] == 7
    held.release()
    mem.close()
    assert mem.closed
    with pytest.raises(SharedMemoryError):
        _ = mem.buffer


def test_errors(tmp_path: Path) -> None:
    SharedMemory.create(tmp_path / "x", 4096).close()
    with pytest.raises(SharedMemoryError, match="already exists"):
        SharedMemory.create(tmp_path / "x", 4096)
    with pytest.raises(SharedMemoryError, match="cannot open"):
        SharedMemory.open(tmp_path / "missing")
    fd = os.open(tmp_path / "x", os.O_RDWR)
    try:
        with pytest.raises(SharedMemoryError, match="fewer than"):
            SharedMemory(fd, 8192, owns_fd=False)
    finally:
        os.close(fd)
    with pytest.raises(SharedMemoryError, match="positive size"):
        SharedMemory(0, 0)
