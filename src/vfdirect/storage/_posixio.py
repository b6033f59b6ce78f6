"""Vectored positional IO on a file descriptor, straight into the caller's buffers.

Rules of this module:

* data moves with ``os.preadv``/``os.pwritev`` between the descriptor and the caller's
  ``memoryview`` s: no intermediate buffer, no copy. A short transfer (signal, end of a
  device) is resumed from where it stopped; the common, complete case costs one system
  call and allocates nothing;
* more buffers than IOV_MAX are sent in groups;
* FUA is a per-write ``RWF_DSYNC`` (Linux ``pwritev2``), which makes that write durable
  as O_DSYNC would; where the kernel or Python lacks it, the write is followed by
  ``fdatasync``;
* errors of the medium become :class:`~vfdirect.core.block.MediumError` (EIO and its
  kin), running out of space in the backing file system becomes
  :class:`~vfdirect.core.alloc.SpaceAllocationFailed`; any other ``OSError`` is a bug
  (a closed descriptor, a bad buffer) and propagates;
* zeroing prefers releasing space (``fallocate`` PUNCH_HOLE, ``BLKZEROOUT``) and falls
  back to writing zeros.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Sequence

from vfdirect.core.alloc.errors import SpaceAllocationFailed
from vfdirect.core.block import MediumError

try:
    IOV_MAX = max(16, os.sysconf("SC_IOV_MAX"))
except (ValueError, OSError):  # pragma: no cover (every Linux has it)
    IOV_MAX = 1024

#: ``RWF_DSYNC`` (Linux 4.7+, Python 3.7+), or 0 where it does not exist.
RWF_DSYNC: int = getattr(os, "RWF_DSYNC", 0)

_MEDIUM_ERRNOS = frozenset(
    {errno.EIO, errno.ENXIO, errno.ENODEV, errno.EREMOTEIO, errno.ENOLINK, errno.ENOMEDIUM}
)
_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
_FLAG_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS})

# linux/fs.h: ioctl numbers of the block layer (_IO(0x12, n), _IOR(0x12, 114, u64)).
BLKSSZGET = 0x1268
BLKGETSIZE64 = 0x80081272
BLKZEROOUT = 0x127F
# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_ZEROS = bytes(1 << 20)


def translate_oserror(exc: OSError, what: str, *, write: bool) -> Exception:
    """The block-layer exception for an ``OSError``, or the error itself (a bug)."""
    if exc.errno in _MEDIUM_ERRNOS:
        return MediumError(f"{what}: {os.strerror(exc.errno or 0)}", write=write)
    if exc.errno in _SPACE_ERRNOS:
        return SpaceAllocationFailed(f"{what}: {os.strerror(exc.errno or 0)}")
    return exc


def byte_view(buf: memoryview) -> memoryview:
    """``buf`` as a flat view of unsigned bytes (a no-op for the usual ``B`` views)."""
    if buf.format == "B" and buf.ndim == 1:
        return buf
    return buf.cast("B")


def total_bytes(bufs: Sequence[memoryview]) -> int:
    if len(bufs) == 1:
        return bufs[0].nbytes
    return sum(b.nbytes for b in bufs)


def _advance(bufs: Sequence[memoryview], done: int) -> list[memoryview]:
    """The part of ``bufs`` after its first ``done`` bytes."""
    rest: list[memoryview] = []
    for b in bufs:
        view = byte_view(b)
        if done >= view.nbytes:
            done -= view.nbytes
            continue
        rest.append(view[done:] if done else view)
        done = 0
    return rest


def preadv_full(fd: int, bufs: Sequence[memoryview], offset: int, total: int) -> None:
    """Fill ``bufs`` (``total`` bytes) from ``offset``; end of file is a MediumError."""
    if total == 0:
        return
    if len(bufs) <= IOV_MAX:
        try:
            got = os.preadv(fd, bufs, offset)
        except OSError as exc:
            raise translate_oserror(exc, f"read at byte {offset}", write=False) from exc
        if got == total:
            return
    else:
        got = 0
    pending = _advance(bufs, got)
    while pending:
        try:
            n = os.preadv(fd, pending[:IOV_MAX], offset + got)
        except OSError as exc:
            raise translate_oserror(exc, f"read at byte {offset + got}", write=False) from exc
        if n == 0:
            raise MediumError(
                f"read at byte {offset + got}: unexpected end of the backing store",
                write=False,
            )
        got += n
        pending = _advance(pending, n)


class Writer:
    """``pwritev`` with FUA, remembering whether the kernel takes ``RWF_DSYNC``."""

    __slots__ = ("_dsync", "fd")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._dsync = RWF_DSYNC

    @property
    def uses_rwf_dsync(self) -> bool:
        return bool(self._dsync)

    def write(self, bufs: Sequence[memoryview], offset: int, total: int, *, fua: bool) -> None:
        if total == 0:
            if fua:
                self.sync()
            return
        done = 0
        if len(bufs) <= IOV_MAX:
            done = self._pwritev(bufs, offset, fua)
            if done == total:
                if fua and not self._dsync:
                    self.sync()
                return
        pending = _advance(bufs, done)
        while pending:
            n = self._pwritev(pending[:IOV_MAX], offset + done, fua)
            if n == 0:
                raise MediumError(f"write at byte {offset + done}: no progress", write=True)
            done += n
            pending = _advance(pending, n)
        # Without RWF_DSYNC (now or since an earlier piece), one fdatasync covers it all.
        if fua and not self._dsync:
            self.sync()

    def _pwritev(self, bufs: Sequence[memoryview], offset: int, fua: bool) -> int:
        try:
            if fua and self._dsync:
                try:
                    return os.pwritev(self.fd, bufs, offset, self._dsync)
                except OSError as exc:
                    if exc.errno not in _FLAG_UNSUPPORTED:
                        raise
                    # The kernel refuses RWF_DSYNC: write plainly, fdatasync after.
                    self._dsync = 0
            return os.pwritev(self.fd, bufs, offset)
        except OSError as exc:
            raise translate_oserror(exc, f"write at byte {offset}", write=True) from exc

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise translate_oserror(exc, "fdatasync", write=True) from exc

    def write_zeros(self, offset: int, length: int) -> None:
        """Zero ``[offset, offset + length)`` by writing zero pages."""
        zeros = memoryview(_ZEROS)
        while length:
            n = min(length, len(_ZEROS))
            self.write([zeros[:n]], offset, n, fua=False)
            offset += n
            length -= n


def _load_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        func = libc.fallocate64 if hasattr(libc, "fallocate64") else libc.fallocate
    except (OSError, AttributeError):  # pragma: no cover (glibc has it)
        return None
    func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    func.restype = ctypes.c_int
    return func


_fallocate = _load_fallocate()


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Deallocate ``[offset, offset + length)`` of a file, which then reads as zeros,
    keeping the size; False where the file system cannot (the caller writes zeros)."""
    if _fallocate is None or length == 0:
        return length == 0
    rc = _fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in _FLAG_UNSUPPORTED:
        return False
    exc = OSError(err, os.strerror(err))
    raise translate_oserror(exc, f"punch hole at byte {offset}", write=True) from exc


def blk_zeroout(fd: int, offset: int, length: int) -> bool:
    """BLKZEROOUT on a block device; False where the device refuses it."""
    if length == 0:
        return True
    try:
        fcntl.ioctl(fd, BLKZEROOUT, struct.pack("=QQ", offset, length))
    except OSError as exc:
        if exc.errno in _FLAG_UNSUPPORTED:
            return False
        raise translate_oserror(exc, f"BLKZEROOUT at byte {offset}", write=True) from exc
    return True


def blockdev_geometry(fd: int) -> tuple[int, int]:
    """(logical block size, size in bytes) of an open block device."""
    ss = struct.unpack("=i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    size = struct.unpack("=Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    return int(ss), int(size)
