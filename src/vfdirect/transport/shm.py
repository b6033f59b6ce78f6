"""Guest memory as a shared memory file.

A VM's memory is a file (``/dev/shm`` by default) mapped ``MAP_SHARED`` by the VM process
and, through a file descriptor passed with SCM_RIGHTS in vhost-user's SET_MEM_TABLE, by the
VF that serves it: the VF's DMA window. Because the memory is a file, a VM process can be
killed and a new one started on the same memory, and live migration can copy it.

Mappings hand out ``memoryview`` objects; :meth:`SharedMemory.close` refuses (with
:class:`BufferError`) while views are still exported, so no one can touch unmapped memory.
"""

from __future__ import annotations

import mmap
import os
import stat
from pathlib import Path
from typing import Self

PAGE_SIZE = mmap.PAGESIZE
DEFAULT_DIR = Path("/dev/shm")


class SharedMemoryError(Exception):
    """A memory file cannot be created, opened or mapped as asked."""


class SharedMemory:
    """A mapping of ``size`` bytes of a memory file, starting at ``offset`` in the file."""

    def __init__(self, fd: int, size: int, *, offset: int = 0, path: Path | None = None,
                 owns_fd: bool = True, writable: bool = True) -> None:
        if size <= 0:
            raise SharedMemoryError(f"a memory mapping needs a positive size, not {size}")
        if offset < 0:
            raise SharedMemoryError(f"negative offset {offset}")
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise SharedMemoryError(f"fd {fd} is not open: {exc.strerror}") from exc
        if not stat.S_ISREG(st.st_mode):
            raise SharedMemoryError(f"fd {fd} is not a regular (memory) file")
        if st.st_size < offset + size:
            raise SharedMemoryError(
                f"memory file holds {st.st_size} bytes, fewer than offset {offset} + size {size}")
        # mmap offsets must be page aligned: map from the page boundary below and slice.
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        self._skip = offset - base
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        try:
            self._map = mmap.mmap(fd, size + self._skip, flags=mmap.MAP_SHARED, prot=prot,
                                  offset=base)
        except (OSError, ValueError) as exc:
            raise SharedMemoryError(f"cannot map {size} bytes of fd {fd}: {exc}") from exc
        self._fd = fd
        self._owns_fd = owns_fd
        self._size = size
        self._offset = offset
        self._path = path
        self._view: memoryview | None = memoryview(self._map)[self._skip:self._skip + size]

    # -- construction --------------------------------------------------------------------

    @classmethod
    def create(cls, path: str | os.PathLike[str], size: int, *, exist_ok: bool = False) -> Self:
        """Create (or, with ``exist_ok``, reuse) a memory file of ``size`` bytes, mode 0600."""
        p = Path(path)
        flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if exist_ok else os.O_EXCL)
        try:
            fd = os.open(p, flags, 0o600)
        except FileExistsError as exc:
            raise SharedMemoryError(f"memory file {p} already exists") from exc
        except OSError as exc:
            raise SharedMemoryError(f"cannot create memory file {p}: {exc.strerror}") from exc
        try:
            if os.fstat(fd).st_size not in (0, size):
                raise SharedMemoryError(f"memory file {p} exists with another size")
            os.ftruncate(fd, size)
            return cls(fd, size, path=p)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> Self:
        """Map an existing memory file whole (a restarted VM process, a migration)."""
        p = Path(path)
        try:
            fd = os.open(p, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise SharedMemoryError(f"cannot open memory file {p}: {exc.strerror}") from exc
        try:
            return cls(fd, os.fstat(fd).st_size, path=p)
        except BaseException:
            os.close(fd)
            raise

    # -- use -----------------------------------------------------------------------------

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def size(self) -> int:
        return self._size

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def path(self) -> Path | None:
        return self._path

    @property
    def buffer(self) -> memoryview:
        """The whole mapping, writable; valid until :meth:`close`."""
        if self._view is None:
            raise SharedMemoryError("memory mapping is closed")
        return self._view

    @property
    def closed(self) -> bool:
        return self._view is None

    def close(self) -> None:
        """Unmap (and close the fd if owned). Raises :class:`BufferError` while views of
        the buffer are still held elsewhere."""
        if self._view is None:
            return
        self._view.release()
        try:
            self._map.close()
        except BufferError:
            # Views are still held: stay fully open, so the caller can drop them and retry.
            self._view = memoryview(self._map)[self._skip:self._skip + self._size]
            raise
        self._view = None
        if self._owns_fd:
            os.close(self._fd)

    def unlink(self) -> None:
        """Remove the memory file's name (the memory lives on while mapped)."""
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self._path) if self._path else f"fd {self._fd}"
        return f"SharedMemory({where}, size={self._size}, offset={self._offset})"
