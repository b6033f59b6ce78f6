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
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vfdirect.core.block import BlockError
from vfdirect.storage._posixio import translate_oserror

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
class FaultSpec:
    """What a control file asks for."""

    delay_ms: float = 0.0
    fail: FailMode | None = None
    error: ErrorKind = ErrorKind.MEDIUM

    def dump(self) -> dict[str, Any]:
        return {
            "delay_ms": self.delay_ms,
            "fail": None if self.fail is None else self.fail.value,
            "error": self.error.value,
        }

    @classmethod
    def load(cls, data: object, where: str = "fault spec") -> FaultSpec:
        if not isinstance(data, dict):
            raise FaultControlError(f"{where}: not a JSON object")
        unknown = set(data) - {"delay_ms", "fail", "error"}
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
        return cls(float(delay), fail, error)


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
) -> FaultSpec:
    """Atomically (re)write the control file of ``lun_path``; returns the spec written."""
    spec = FaultSpec.load({"delay_ms": delay_ms, "fail": fail, "error": error}, "set_lun_faults")
    final = control_path(lun_path)
    tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(spec.dump()) + "\n")
    os.replace(tmp, final)
    return spec


def clear_lun_faults(lun_path: str | os.PathLike[str]) -> None:
    """Remove the control file of ``lun_path`` (no fault from the next IO on)."""
    with contextlib.suppress(FileNotFoundError):
        control_path(lun_path).unlink()


class FaultInjector:
    """The hook a LUN backend calls before each IO. Thread-safe (IO threads share it)."""

    __slots__ = ("_key", "_lock", "_path", "_spec")

    def __init__(self, lun_path: str | os.PathLike[str]) -> None:
        self._path = control_path(lun_path)
        self._lock = threading.Lock()
        self._key: tuple[int, int, int, int] | None = None
        self._spec: FaultSpec | FaultControlError = _NO_FAULT

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

    def before_io(self, what: str, *, write: bool) -> None:
        """Sleep and/or raise as the control file says, for one IO described by ``what``."""
        spec = self.current()
        if spec.delay_ms:
            time.sleep(spec.delay_ms / 1000.0)
        fail = spec.fail
        if fail is None:
            return
        if fail is FailMode.ALL or (fail is FailMode.WRITE) == write:
            if spec.error is ErrorKind.HARDWARE:
                raise BlockError(f"{what}: injected fault: device not responding")
            err = OSError(errno.EIO, f"{os.strerror(errno.EIO)} (injected)")
            raise translate_oserror(err, f"{what}: injected fault", write=write)


def injector_for(lun_path: str | os.PathLike[str]) -> FaultInjector | None:
    """A :class:`FaultInjector` for a LUN file if fault injection is on, else None."""
    return FaultInjector(lun_path) if faults_enabled() else None
