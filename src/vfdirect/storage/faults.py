"""Fault injection on physical LUN files, for tests: a slow or failing disk on demand.

Off unless the process that opens a LUN has ``VFDIRECT_STORAGE_FAULTS=1`` in its
environment when it opens it (daemons inherit it from whoever starts them, e.g. the
host agent or a test). Off, it costs nothing: the backend holds no injector and skips
the hook with one attribute test.

On, every IO of a file LUN (read, write, flush, zero) first consults a control file
beside the LUN file, ``<lun file>.fault`` (e.g. ``lun-00000.img.fault``)::

    {"delay_ms": 300, "fail": "read", "error": "medium"}

* ``delay_ms`` (number >= 0, default 0): every IO sleeps this long before touching the
  file, as a slow disk would (data lands at the end of the delay);
* ``fail`` (``"read"``, ``"write"``, ``"all"`` or ``null``, default ``null``): IOs of that
  direction fail after the delay; flush and zeroing count as writes;
* ``error`` (``"medium"``, default, or ``"hardware"``): ``medium`` raises what a disk
  returning EIO produces (:class:`~vfdirect.core.block.MediumError`, so the SCSI layer
  answers CHECK CONDITION, MEDIUM ERROR, UNRECOVERED READ ERROR / WRITE ERROR);
  ``hardware`` raises a bare :class:`~vfdirect.core.block.BlockError` (HARDWARE ERROR,
  LOGICAL UNIT COMMUNICATION FAILURE), as a disk that stopped answering.

* ``volatile_cache`` (object or ``null``, default ``null``): the LUN gets a volatile
  write cache that a power cut loses, as a disk's DRAM cache would (a killed process
  does not lose the OS page cache, so without it a power-cut test could never fail)::

      {"volatile_cache": {"writeback": 0.3, "seed": 7}}

  A plain write goes into a cache in the adapter process (reads see it; a later write
  of a block replaces it) and reaches the file only when a flush comes (SYNCHRONIZE
  CACHE: everything cached is written, then ``fdatasync``), when a FUA write covers it
  (FUA writes go straight through, durably, and replace what was cached), or early:
  after each plain write each cached block is written back with probability
  ``writeback`` (0..1), in an order drawn from ``seed``, as an OS flushing dirty pages
  would. SIGKILL of the adapter then loses exactly what a power cut may lose. Two
  more keys break the durability path on purpose, to prove a power-cut suite can
  fail: ``"ignore_fua": true`` caches FUA writes like plain ones, ``"flush_noop":
  true`` makes a flush do nothing. The cache is made at the first IO that finds the
  key; a control file without it writes the cache back at the next IO.

No control file, or an empty one, means no fault. The file is not opened per IO: each
IO ``stat`` s it and re-reads it only when its identity (inode, size, mtime) changed.
Write it with :func:`set_lun_faults` / :func:`clear_lun_faults`, which replace it
atomically (a reader never sees half a file); a malformed file makes each IO fail with
:class:`FaultControlError`, which names the file (the SCSI layer reports it as an
internal target failure), so a typo is not silently ignored.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vfdirect.core.block import BlockError
from vfdirect.storage._posixio import Writer, byte_view, translate_oserror

#: The environment variable that enables fault injection (value ``1``).
FAULTS_ENV = "VFDIRECT_STORAGE_FAULTS"
#: Suffix of the control file beside a LUN file.
CONTROL_SUFFIX = ".fault"


class FaultControlError(ValueError):
    """A fault control file is malformed."""


class FailMode(StrEnum):
    READ = "read"
    WRITE = "write"
    ALL = "all"


class ErrorKind(StrEnum):
    MEDIUM = "medium"
    HARDWARE = "hardware"


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """A volatile write cache (see the module's documentation)."""

    writeback: float = 0.0
    seed: int = 0
    ignore_fua: bool = False
    flush_noop: bool = False

    def dump(self) -> dict[str, Any]:
        return {"writeback": self.writeback, "seed": self.seed,
                "ignore_fua": self.ignore_fua, "flush_noop": self.flush_noop}

    @classmethod
    def load(cls, data: object, where: str = "volatile_cache") -> CacheSpec:
        if not isinstance(data, dict):
            raise FaultControlError(f"{where}: volatile_cache must be a JSON object")
        unknown = set(data) - {"writeback", "seed", "ignore_fua", "flush_noop"}
        if unknown:
            raise FaultControlError(f"{where}: volatile_cache: unknown keys {sorted(unknown)}")
        wb = data.get("writeback", 0.0)
        if (isinstance(wb, bool) or not isinstance(wb, int | float) or not math.isfinite(wb)
                or not 0 <= wb <= 1):
            raise FaultControlError(
                f"{where}: volatile_cache.writeback must be a number in [0, 1], not {wb!r}")
        seed = data.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise FaultControlError(
                f"{where}: volatile_cache.seed must be an integer, not {seed!r}")
        flags = {}
        for key in ("ignore_fua", "flush_noop"):
            value = data.get(key, False)
            if not isinstance(value, bool):
                raise FaultControlError(
                    f"{where}: volatile_cache.{key} must be true or false, not {value!r}")
            flags[key] = value
        return cls(float(wb), seed, **flags)


@dataclass(frozen=True, slots=True)
class FaultSpec:
    """What a control file asks for."""

    delay_ms: float = 0.0
    fail: FailMode | None = None
    error: ErrorKind = ErrorKind.MEDIUM
    volatile_cache: CacheSpec | None = None

    def dump(self) -> dict[str, Any]:
        return {
            "delay_ms": self.delay_ms,
            "fail": None if self.fail is None else self.fail.value,
            "error": self.error.value,
            "volatile_cache": None if self.volatile_cache is None
            else self.volatile_cache.dump(),
        }

    @classmethod
    def load(cls, data: object, where: str = "fault spec") -> FaultSpec:
        if not isinstance(data, dict):
            raise FaultControlError(f"{where}: not a JSON object")
        unknown = set(data) - {"delay_ms", "fail", "error", "volatile_cache"}
        if unknown:
            raise FaultControlError(f"{where}: unknown keys {sorted(unknown)}")
        delay = data.get("delay_ms", 0)
        if (
            isinstance(delay, bool)
            or not isinstance(delay, int | float)
            or not math.isfinite(delay)
            or delay < 0
        ):
            raise FaultControlError(f"{where}: delay_ms must be a number >= 0, not {delay!r}")
        fail_raw = data.get("fail")
        try:
            fail = None if fail_raw is None else FailMode(fail_raw)
        except ValueError:
            raise FaultControlError(
                f"{where}: fail must be one of read, write, all or null, not {fail_raw!r}"
            ) from None
        error_raw = data.get("error", ErrorKind.MEDIUM.value)
        try:
            error = ErrorKind(error_raw)
        except ValueError:
            raise FaultControlError(
                f"{where}: error must be medium or hardware, not {error_raw!r}"
            ) from None
        cache_raw = data.get("volatile_cache")
        cache = None if cache_raw is None else CacheSpec.load(cache_raw, where)
        return cls(float(delay), fail, error, cache)


_NO_FAULT = FaultSpec()


def control_path(lun_path: str | os.PathLike[str]) -> Path:
    """The control file of a LUN file."""
    p = Path(lun_path)
    return p.with_name(p.name + CONTROL_SUFFIX)


def faults_enabled() -> bool:
    return os.environ.get(FAULTS_ENV) == "1"


def set_lun_faults(
    lun_path: str | os.PathLike[str],
    *,
    delay_ms: float = 0.0,
    fail: str | None = None,
    error: str = "medium",
    volatile_cache: dict[str, Any] | None = None,
) -> FaultSpec:
    """Atomically (re)write the control file of ``lun_path``; returns the spec written."""
    spec = FaultSpec.load({"delay_ms": delay_ms, "fail": fail, "error": error,
                           "volatile_cache": volatile_cache}, "set_lun_faults")
    final = control_path(lun_path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(spec.dump()) + "\n")
    os.replace(tmp, final)
    return spec


def clear_lun_faults(lun_path: str | os.PathLike[str]) -> None:
    """Remove the control file of ``lun_path`` (no fault from the next IO on)."""
    with contextlib.suppress(FileNotFoundError):
        control_path(lun_path).unlink()


class VolatileCache:
    """A LUN's volatile write cache (``volatile_cache`` of a control file), in front of
    its file. Thread-safe: one lock orders every IO of the LUN through it."""

    __slots__ = ("_blocks", "_bs", "_lock", "_rng", "counters", "spec")

    def __init__(self, spec: CacheSpec, block_size: int) -> None:
        self.spec = spec
        self._bs = block_size
        self._blocks: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._rng = random.Random(spec.seed)  # noqa: S311 (fault injection, not crypto)
        #: blocks cached, written through (FUA), written back early, flushes done
        self.counters = {"cached": 0, "written_through": 0, "written_back": 0,
                         "flushes": 0}

    @property
    def dirty(self) -> int:
        """Blocks in the cache that the file does not have yet."""
        with self._lock:
            return len(self._blocks)

    def write(self, writer: Writer, lba: int, bufs: Sequence[memoryview], *,
              fua: bool) -> None:
        bs = self._bs
        data = b"".join(byte_view(b) for b in bufs)
        count = len(data) // bs
        with self._lock:
            if fua and not self.spec.ignore_fua:
                writer.write(bufs, lba * bs, len(data), fua=True)
                for i in range(count):
                    self._blocks.pop(lba + i, None)
                self.counters["written_through"] += count
                return
            for i in range(count):
                self._blocks[lba + i] = data[i * bs:(i + 1) * bs]
            self.counters["cached"] += count
            if self.spec.writeback > 0:
                chosen = [b for b in self._blocks if self._rng.random() < self.spec.writeback]
                self._rng.shuffle(chosen)
                for block in chosen:
                    writer.write([memoryview(self._blocks.pop(block))], block * bs, bs,
                                 fua=False)
                self.counters["written_back"] += len(chosen)

    def read(self, lba: int, bufs: Sequence[memoryview], fill: Callable[[], None]) -> None:
        """``fill`` reads the file into ``bufs``; the cached blocks then replace theirs."""
        bs = self._bs
        with self._lock:
            fill()
            if not self._blocks:
                return
            total = sum(b.nbytes for b in bufs)
            for i in range(total // bs):
                cached = self._blocks.get(lba + i)
                if cached is not None:
                    _scatter(bufs, i * bs, cached)

    def flush(self, writer: Writer) -> None:
        """SYNCHRONIZE CACHE: everything cached to the file, then ``fdatasync``."""
        with self._lock:
            if self.spec.flush_noop:
                return
            self._write_all(writer)
            writer.sync()
            self.counters["flushes"] += 1

    def discard(self, lba: int, count: int) -> None:
        """Forget cached blocks of ``[lba, lba + count)`` (the range is being zeroed)."""
        with self._lock:
            for block in [b for b in self._blocks if lba <= b < lba + count]:
                del self._blocks[block]

    def write_back(self, writer: Writer) -> None:
        """Everything cached to the file (a clean shutdown, or the cache turned off)."""
        with self._lock:
            self._write_all(writer)

    def _write_all(self, writer: Writer) -> None:
        bs = self._bs
        for block in sorted(self._blocks):
            writer.write([memoryview(self._blocks[block])], block * bs, bs, fua=False)
        self._blocks.clear()


def _scatter(bufs: Sequence[memoryview], offset: int, data: bytes) -> None:
    """Copy ``data`` into the concatenation of ``bufs`` at byte ``offset``."""
    pos = 0
    src = 0
    for buf in bufs:
        view = byte_view(buf)
        end = pos + view.nbytes
        if end > offset + src and src < len(data):
            start = offset + src - pos
            n = min(view.nbytes - start, len(data) - src)
            view[start:start + n] = data[src:src + n]
            src += n
        pos = end
        if src >= len(data):
            return


class FaultInjector:
    """The hook a LUN backend calls before each IO. Thread-safe (IO threads share it)."""

    __slots__ = ("_cache", "_key", "_lock", "_path", "_spec")

    def __init__(self, lun_path: str | os.PathLike[str]) -> None:
        self._path = control_path(lun_path)
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._spec: FaultSpec | FaultControlError = _NO_FAULT
        self._cache: VolatileCache | None = None

    @property
    def path(self) -> Path:
        return self._path

    def current(self) -> FaultSpec:
        """The spec in force now (re-read if the control file changed)."""
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            key = None
        else:
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        with self._lock:
            if key != self._key:
                self._spec = _NO_FAULT if key is None else self._read()
                self._key = key
            spec = self._spec
        if isinstance(spec, FaultControlError):
            raise spec
        return spec

    def _read(self) -> FaultSpec | FaultControlError:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            return _NO_FAULT
        if not text.strip():
            return _NO_FAULT
        try:
            return FaultSpec.load(json.loads(text), str(self._path))
        except json.JSONDecodeError as exc:
            return FaultControlError(f"{self._path}: {exc}")
        except FaultControlError as exc:
            return exc

    def cache(self, spec: FaultSpec, block_size: int, writer: Writer) -> VolatileCache | None:
        """The volatile cache ``spec`` asks for (made on first use; one whose spec
        changed, or that is no longer asked for, is written back first), or None."""
        with self._lock:
            cache = self._cache
            if cache is not None and cache.spec == spec.volatile_cache:
                return cache
            if cache is not None:
                cache.write_back(writer)
            self._cache = cache = (None if spec.volatile_cache is None
                                   else VolatileCache(spec.volatile_cache, block_size))
            return cache

    @property
    def active_cache(self) -> VolatileCache | None:
        return self._cache

    def drop_cache(self) -> None:
        """A power cut in-process (tests): forget the cache without writing it back."""
        with self._lock:
            self._cache = None

    def close(self, writer: Writer) -> None:
        """A clean shutdown writes the cache back, as a disk does before it powers off."""
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None:
            cache.write_back(writer)

    def before_io(self, what: str, *, write: bool) -> FaultSpec:
        """Sleep and/or raise as the control file says, for one IO described by ``what``;
        returns the spec in force."""
        spec = self.current()
        if spec.delay_ms:
            time.sleep(spec.delay_ms / 1000.0)
        fail = spec.fail
        if fail is None:
            return spec
        if fail is FailMode.ALL or (fail is FailMode.WRITE) == write:
            if spec.error is ErrorKind.HARDWARE:
                raise BlockError(f"{what}: injected fault: device not responding")
            err = OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected)")
            raise translate_oserror(err, f"{what}: injected fault", write=write)
        return spec


def injector_for(lun_path: str | os.PathLike[str]) -> FaultInjector | None:
    """A :class:`FaultInjector` for a LUN file if fault injection is on, else None."""
    return FaultInjector(lun_path) if faults_enabled() else None
