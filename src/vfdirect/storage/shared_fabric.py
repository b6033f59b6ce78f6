"""The fabric shared by every adapter on a machine: a directory beside the storage arrays.

Several hosts (adapters) on one machine share the array files as a SAN is shared; the
fabric between them must be shared too: one zoning and masking configuration, and one
login server, so that a WWPN is never logged in twice anywhere (claim X3 relies on it:
the alternate WWPN logs in at the destination before switch-over, and a second login of
a name in use fails at once with DuplicatePortName).

Layout of the fabric directory and its rules:

* ``fabric.json``: the configuration (target ports, zones, masking), the pure
  :meth:`~vfdirect.core.fabric.Fabric.dump`. Changed only under an exclusive
  ``flock`` of ``fabric.lock``: read, apply the change with the pure core (which refuses
  malformed changes), write to a temporary file, fsync, rename, fsync the directory. A
  crash leaves the old or the new file, never half of one;
* ``generation``: an 8-byte little-endian counter that every adapter maps. A writer makes
  it odd before it renames the new configuration and even after (a sequence lock). The
  per-IO check (:meth:`SharedFabric.authorize`) reads it, one memory load, and reloads
  the configuration only when it differs from the cached value or is odd, so a hot grant
  or revoke takes effect on the next IO of every adapter. A writer that died between the
  two bumps leaves an odd value: readers then reload on every IO (slow, never stale)
  until the next writer repairs it;
* ``logins/<wwpn>.login``: one file per logged-in port name, held with an exclusive
  ``flock`` by the adapter process that logged it in, and holding its login record
  (JSON). The login lives as long as the lock: when the process dies the kernel drops
  the lock and the login is gone; the file is swept by the next login. Login files are
  created, swept and unlinked only under the exclusive ``fabric.lock``. N_Port IDs are
  assigned by the pure :class:`~vfdirect.core.fabric.LoginTable` rebuilt from the live
  records, so they are unique in the fabric;
* every wait for ``fabric.lock`` is bounded (:class:`FabricBusy`).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from vfdirect.core.array import LunKey
from vfdirect.core.fabric import (
    DuplicatePortName,
    Fabric,
    FabricConfigError,
    Login,
    NotLoggedInError,
)
from vfdirect.core.fabric.logins import LOGINS_FORMAT, LOGINS_VERSION
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn

CONFIG_NAME = "fabric.json"
LOCK_NAME = "fabric.lock"
GENERATION_NAME = "generation"
LOGINS_DIR = "logins"
_GEN = struct.Struct("<Q")

T = TypeVar("T")


class FabricBusy(TimeoutError):
    """The fabric lock was not obtained in time (another adapter holds it)."""


@dataclass(frozen=True, slots=True)
class LoginRecord:
    """A live login, as its lock file records it."""

    login: Login
    pid: int

    def dump(self) -> dict[str, Any]:
        return {**self.login.dump(), "pid": self.pid}


def _login_file_name(wwpn: Wwn) -> str:
    return wwpn.raw.hex() + ".login"


def _fsync_dir(path: Path) -> None:
    dfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb", closefd=True) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


class SharedFabric:
    """One adapter's handle on the shared fabric in ``directory`` (created if missing).

    Thread safety: :meth:`authorize` may be called from any thread (the VF data path);
    the other methods are for the one control-plane thread.
    """

    def __init__(self, directory: str | os.PathLike[str], *, lock_timeout: float = 5.0,
                 domain_id: int = 0x01) -> None:
        self._dir = Path(directory)
        self._timeout = lock_timeout
        self._dir.mkdir(parents=True, exist_ok=True)
        (self._dir / LOGINS_DIR).mkdir(exist_ok=True)
        self._lock_fd = os.open(self._dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                0o600)
        self._thread_lock = threading.Lock()
        self._reload_lock = threading.Lock()
        self._held: dict[Wwn, tuple[int, Login]] = {}
        #: the logins of ``_held``, replaced (never mutated) for lock-free readers
        self._held_logins: tuple[Login, ...] = ()
        self._physical: Login | None = None
        self._gen_fd = -1
        self._gen: mmap.mmap | None = None
        try:
            with self._locked():
                gen_path = self._dir / GENERATION_NAME
                self._gen_fd = os.open(gen_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                if os.fstat(self._gen_fd).st_size < _GEN.size:
                    os.ftruncate(self._gen_fd, _GEN.size)
                self._gen = mmap.mmap(self._gen_fd, _GEN.size, mmap.MAP_SHARED,
                                      mmap.PROT_READ | mmap.PROT_WRITE)
                if not (self._dir / CONFIG_NAME).exists():
                    self._write_config(Fabric(domain_id))
        except BaseException:
            self.close()
            raise
        #: (generation, configuration + this adapter's logins), swapped in one assignment
        self._cache: tuple[int, Fabric] = (-1, Fabric(domain_id))
        self._reload()

    # -- identity ----------------------------------------------------------------------

    @property
    def directory(self) -> str:
        return str(self._dir)

    @property
    def generation(self) -> int:
        assert self._gen is not None
        return int(_GEN.unpack_from(self._gen, 0)[0])

    def physical_login(self) -> Login:
        if self._physical is None:
            raise NotLoggedInError("the adapter's physical port has not done FLOGI")
        return self._physical

    # -- the per-IO check --------------------------------------------------------------

    def authorize(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> None:
        """Let one IO pass, or raise NotLoggedIn / NotZoned / NotMasked. Costs one read
        of the mapped counter unless the configuration changed."""
        assert self._gen is not None
        gen = int(_GEN.unpack_from(self._gen, 0)[0])
        cached_gen, fabric = self._cache
        if gen != cached_gen or gen & 1:
            fabric = self._reload()
        fabric.authorize(initiator, array, lun)

    def _reload(self) -> Fabric:
        with self._reload_lock:
            gen = self.generation
            config = self._read_config()
            fabric = Fabric.load(config, logins=self._local_logins())
            # an odd generation is never cached: a writer is (or died) mid-change
            self._cache = (gen if not gen & 1 else -1, fabric)
            return fabric

    def _local_logins(self) -> dict[str, Any]:
        logins = sorted(self._held_logins, key=lambda lg: (lg.is_npiv, lg.nport_id))
        domain = logins[0].domain_id if logins else self._read_config().get("domain_id", 1)
        return {"format": LOGINS_FORMAT, "version": LOGINS_VERSION, "domain_id": domain,
                "logins": [lg.dump() for lg in logins]}

    # -- logins ------------------------------------------------------------------------

    def flogi(self, wwpn: Wwn, wwnn: Wwn) -> Login:
        """Log in the adapter's physical port."""
        if self._physical is not None:
            raise FabricConfigError(f"this adapter's physical port {self._physical.wwpn} "
                                    "is logged in already")
        login = self._login(lambda f: f.flogi(wwpn, wwnn))
        self._physical = login
        return login

    def fdisc(self, wwpn: Wwn, wwnn: Wwn) -> Login:
        """NPIV login of ``wwpn`` under this adapter's physical port."""
        parent = self.physical_login().wwpn
        return self._login(lambda f: f.fdisc(parent, wwpn, wwnn))

    def _login(self, do: Callable[[Fabric], Login]) -> Login:
        with self._locked():
            live = self._sweep()
            table = {"format": LOGINS_FORMAT, "version": LOGINS_VERSION,
                     "domain_id": self._read_config()["domain_id"],
                     "logins": [r.login.dump() for r in
                                sorted(live, key=lambda r: (r.login.is_npiv,
                                                            r.login.nport_id))]}
            fabric = Fabric.load(self._read_config(), logins=table)
            try:
                login = do(fabric)
            except DuplicatePortName as exc:
                pid = self._holder_pid(live, exc)
                raise DuplicatePortName(f"{exc}" + (f" (held by adapter pid {pid})"
                                                    if pid else "")) from None
            path = self._dir / LOGINS_DIR / _login_file_name(login.wwpn)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise DuplicatePortName(f"port name {login.wwpn} is already logged in "
                                        "(its login file is held)") from None
            record = json.dumps(LoginRecord(login, os.getpid()).dump()).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            self._held[login.wwpn] = (fd, login)
            self._held_logins = tuple(lg for _, lg in self._held.values())
        self._reload()
        return login

    @staticmethod
    def _holder_pid(live: Sequence[LoginRecord], exc: Exception) -> int | None:
        text = str(exc)
        for r in live:
            if r.login.wwpn.canonical() in text:
                return r.pid
        return None

    def logo(self, wwpn: Wwn) -> None:
        """Log out a port this adapter logged in (a physical port takes its NPIV ports
        with it, FC-LS implicit logout)."""
        held = self._held.get(wwpn)
        if held is None:
            raise NotLoggedInError(f"LOGO {wwpn}: the port is not logged in by this adapter")
        _, login = held
        ended = [w for w, (_, lg) in self._held.items() if lg.parent == wwpn] + [wwpn]
        with self._locked():
            for w in ended:
                self._release(w)
        if login.parent is None:
            self._physical = None
        self._reload()

    def _release(self, wwpn: Wwn) -> None:
        fd, _ = self._held.pop(wwpn)
        self._held_logins = tuple(lg for _, lg in self._held.values())
        with contextlib.suppress(FileNotFoundError):
            (self._dir / LOGINS_DIR / _login_file_name(wwpn)).unlink()
        os.close(fd)

    def logins(self) -> list[LoginRecord]:
        """Every live login in the fabric (sweeping the stale ones)."""
        with self._locked():
            return sorted(self._sweep(), key=lambda r: r.login.nport_id)

    def _sweep(self) -> list[LoginRecord]:
        """Live login records; files of dead holders are removed. Under the lock."""
        live: list[LoginRecord] = []
        ours = {_login_file_name(w) for w in self._held}
        for entry in sorted((self._dir / LOGINS_DIR).iterdir()):
            if not entry.name.endswith(".login"):
                continue
            if entry.name in ours:
                live.append(LoginRecord(self._held_by_name(entry.name), os.getpid()))
                continue
            try:
                fd = os.open(entry, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    record = self._read_record(fd)
                    if record is not None:
                        live.append(record)
                    continue
                entry.unlink()  # its holder is gone: the login ended with it
            finally:
                os.close(fd)
        return live

    def _held_by_name(self, name: str) -> Login:
        return next(lg for w, (_, lg) in self._held.items() if _login_file_name(w) == name)

    @staticmethod
    def _read_record(fd: int) -> LoginRecord | None:
        try:
            data = json.loads(os.pread(fd, 4096, 0))
            parent = data.get("parent")
            login = Login(Wwn.parse(data["wwpn"]), Wwn.parse(data["wwnn"]),
                          data["nport_id"], None if parent is None else Wwn.parse(parent))
            return LoginRecord(login, int(data["pid"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a record being written; its holder is alive and owns the name

    # -- configuration -----------------------------------------------------------------

    def zone_create(self, name: str, members: Sequence[Wwn]) -> frozenset[Wwn]:
        def do(f: Fabric) -> frozenset[Wwn]:
            f.zone_create(name, members)
            return f.zoning.members(name)
        return self._modify(do)

    def zone_member_add(self, name: str, members: Sequence[Wwn]) -> frozenset[Wwn]:
        def do(f: Fabric) -> frozenset[Wwn]:
            f.zone_member_add(name, members)
            return f.zoning.members(name)
        return self._modify(do)

    def mask_grant(self, initiator: Wwn, array: Wwn, luns: Sequence[int]) -> tuple[int, ...]:
        def do(f: Fabric) -> tuple[int, ...]:
            return tuple(n for n in luns
                         if f.mask_grant(initiator, _key(array, n)))
        return self._modify(do)

    def mask_revoke(self, initiator: Wwn, array: Wwn, luns: Sequence[int]) -> tuple[int, ...]:
        def do(f: Fabric) -> tuple[int, ...]:
            return tuple(n for n in luns
                         if f.mask_revoke(initiator, _key(array, n)))
        return self._modify(do)

    def target_ports_add(self, array: Wwn, ports: Sequence[Wwn]) -> None:
        def do(f: Fabric) -> None:
            for port in ports:
                f.target_port_add(port, array)
        self._modify(do)

    def show(self) -> dict[str, Any]:
        with self._locked():
            live = sorted(self._sweep(), key=lambda r: r.login.nport_id)
            return {"config": self._read_config(), "logins": [r.dump() for r in live],
                    "generation": self.generation, "directory": str(self._dir)}

    def _modify(self, change: Callable[[Fabric], T]) -> T:
        """Apply ``change`` to the configuration, atomically, under the lock."""
        with self._locked():
            gen = self.generation
            fabric = Fabric.load(self._read_config())
            before = fabric.dump()
            result = change(fabric)  # refuses (FabricConfigError) before anything is written
            after = fabric.dump()
            if after != before or gen & 1:
                base = gen + (gen & 1)  # an odd counter: a writer died mid-change
                self._set_generation(base + 1)
                self._write_config(fabric)
                self._set_generation(base + 2)
        self._reload()
        return result

    def _set_generation(self, value: int) -> None:
        assert self._gen is not None
        _GEN.pack_into(self._gen, 0, value)

    def _read_config(self) -> dict[str, Any]:
        path = self._dir / CONFIG_NAME
        try:
            data = json.loads(path.read_bytes())
        except FileNotFoundError as exc:
            raise FabricConfigError(f"{self._dir} holds no fabric configuration") from exc
        except ValueError as exc:
            raise FabricConfigError(f"{path}: {exc}") from exc
        if not isinstance(data, dict):
            raise FabricConfigError(f"{path}: not a JSON object")
        return data

    def _write_config(self, fabric: Fabric) -> None:
        data = json.dumps(fabric.dump(), indent=1, sort_keys=True).encode() + b"\n"
        _write_atomic(self._dir / CONFIG_NAME, data)

    # -- locking -----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The exclusive fabric lock (across processes, and across this process's
        threads), waited for at most ``lock_timeout`` seconds."""
        if not self._thread_lock.acquire(timeout=self._timeout):
            raise FabricBusy(f"fabric {self._dir} is busy in this process")
        try:
            deadline = time.monotonic() + self._timeout
            delay = 0.001
            while True:
                try:
                    fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                        raise
                if time.monotonic() >= deadline:
                    raise FabricBusy(f"fabric {self._dir}: lock not obtained in "
                                     f"{self._timeout:g} s")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        finally:
            self._thread_lock.release()

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Log out every port this adapter holds and release the fabric files."""
        if self._held:
            with contextlib.suppress(FabricBusy, OSError), self._locked():
                for w in list(self._held):
                    self._release(w)
            for fd, _ in self._held.values():  # lock not obtained: the kernel cleans up
                os.close(fd)
            self._held.clear()
            self._held_logins = ()
        self._physical = None
        if self._gen is not None:
            self._gen.close()
            self._gen = None
        for attr in ("_gen_fd", "_lock_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> SharedFabric:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _key(array: Wwn, lun: int) -> LunKey:
    return LunKey(array, LunNumber(lun))
