"""Small file-descriptor helpers of the VF data path: eventfds, the VF socket, guest
memory mappings.

* an eventfd that comes from a front end is checked to BE an eventfd (its
  ``/proc/self/fd`` link is ``anon_inode:[eventfd]``) before the VF thread waits on it or
  writes to it: a pipe or a regular file in its place could block the thread or keep the
  selector spinning. Kick eventfds are switched to non-blocking (a shared file
  description: the front end only writes to it, and an eventfd write never blocks short
  of 2^64 - 2 pending kicks); call eventfds are left as they are (the front end may read
  them blocking), which is safe because their writes cannot block either;
* a VF socket is a Unix stream socket (vhost-user) at the path the PF announced, mode
  0600, in the host's run directory (itself 0700); the one that binds it unlinks it, and
  only if the inode is still its own.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import socket
from collections.abc import Iterable
from pathlib import Path

from vfdirect.adapter.log import log_event
from vfdirect.transport.shm import SharedMemory

_ONE = (1).to_bytes(8, "little")
EVENTFD_LINK = "anon_inode:[eventfd]"
LISTEN_BACKLOG = 4


class BadEventFd(ValueError):
    """A descriptor that should be an eventfd is not one."""


def check_eventfd(fd: int, what: str) -> None:
    try:
        link = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise BadEventFd(f"{what}: descriptor {fd} is not open ({exc.strerror})") from None
    if link != EVENTFD_LINK:
        raise BadEventFd(f"{what}: descriptor is {link}, not an eventfd")


def signal_eventfd(fd: int | None) -> bool:
    """Add 1 to an eventfd (a used buffer notification, an error report)."""
    if fd is None:
        return False
    try:
        os.write(fd, _ONE)
    except OSError:
        return False
    return True


def clear_eventfd(fd: int) -> None:
    """Consume a kick (non-blocking; nothing pending is fine)."""
    with contextlib.suppress(OSError):
        os.read(fd, 8)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def bind_stream(path: Path) -> tuple[socket.socket, int]:
    """A listening, non-blocking Unix stream socket at ``path`` (mode 0600) and its
    inode."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # a stale socket of a previous adapter (we hold the run directory)
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(LISTEN_BACKLOG)
        inode = os.stat(path).st_ino
    except BaseException:
        sock.close()
        raise
    return sock, inode


def unlink_if_ours(path: Path, inode: int) -> None:
    with contextlib.suppress(OSError):
        if os.stat(path).st_ino == inode:
            path.unlink()


def unmap_all(maps: Iterable[SharedMemory], logger: logging.Logger, vf: int) -> None:
    """Unmap guest memory. Every view of it must be gone already (callers tear down
    outside ``except`` blocks, whose tracebacks would keep views alive); if one survives
    anyway, the mapping goes with the last view (a garbage collection is run to break a
    cycle), and the deferral is logged."""
    deferred = 0
    for shm in maps:
        try:
            shm.close()
        except BufferError:
            deferred += shm.size
    if deferred:
        gc.collect()
        log_event(logger, "vf_unmap_deferred", level=logging.WARNING, vf=vf, bytes=deferred)
