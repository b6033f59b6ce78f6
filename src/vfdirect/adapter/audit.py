"""The adapter's auditor (``vfdirect adapter run --audit``, or ``VFDIRECT_AUDIT=1``).

Rules of this module:

* off (the default), nothing here is on the data path: the VF's guest memory is a plain
  :class:`~vfdirect.core.virtio.RegionMemory` and its LUNs plain backends; the only cost
  is the ``auditor is None`` test where they are built;
* on, every physical LUN backend handed to a vdisk view (a VF's, or the PF IO path's)
  is wrapped in :class:`AuditedLun`, which checks each read, write and flush against an
  :class:`AuditScope`: the extents of the VF's loaded mapping, computed from the
  mapping's raw document (:func:`~vfdirect.core.adapter.audit.extents_of_mapping`), not
  from the translation being audited. The wrapper sits inside the fabric guard, so it
  sees exactly the IO that reaches a LUN;
* on, a VF's guest memory is an :class:`AuditedMemory`: after each access the memory
  carried out (view, views, read, write; the typed accessors go through ``view``), the
  range is checked against the regions of the memory table as the front end sent it,
  not against the memory's own bounds checks. An access the memory refused did not
  happen and is not a violation;
* a violation is counted (:class:`~vfdirect.core.adapter.audit.AuditLedger`), logged
  (``audit_violation``), and the access goes on unchanged: the audit never alters the
  behaviour it watches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vfdirect.adapter.log import log_event
from vfdirect.core.adapter.audit import (
    AuditLedger,
    ExtentSet,
    IntervalSet,
    LunName,
    Violation,
    extents_of_mapping,
    regions_of_table,
)
from vfdirect.core.adapter.mapping import MappingTable
from vfdirect.core.adapter.model import AdapterModel
from vfdirect.core.array import LunKey
from vfdirect.core.block import BlockDevice
from vfdirect.core.virtio import MemoryRegion, RegionMemory
from vfdirect.core.virtio.memory import BytesLike
from vfdirect.core.wwn import Wwn

#: The environment variable that turns the audit on (``1``, ``true``, ``yes``, ``on``),
#: read by ``vfdirect adapter run`` (a host's adapter inherits the host's environment).
AUDIT_ENV = "VFDIRECT_AUDIT"

__all__ = [
    "AUDIT_ENV",
    "AuditScope",
    "AuditedLun",
    "AuditedMemory",
    "Auditor",
    "ScopeResolver",
    "disabled_snapshot",
    "pf_scope_resolver",
    "lun_name",
]


def lun_name(key: LunKey) -> LunName:
    return (key.array.canonical().lower(), int(key.lun))


@dataclass(frozen=True, slots=True)
class AuditScope:
    """What one VF (or the PF acting for a vport) may touch on the physical LUNs."""

    vf: int | None
    extents: ExtentSet


#: The scope of the PF IO path acting with an initiator port name.
ScopeResolver = Callable[[Wwn], AuditScope]


class Auditor:
    """The counters and the checks; thread-safe (VF threads, IO threads, the PF)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._lock = threading.Lock()
        self._ledger = AuditLedger()
        self._log = logger

    # -- scopes and wrappers --------------------------------------------------------------

    @staticmethod
    def scope(vf: int | None, mappings: Iterable[MappingTable | None]) -> AuditScope:
        """The scope of ``vf`` holding ``mappings`` (their raw documents' extents)."""
        triples: list[tuple[LunName, int, int]] = []
        for table in mappings:
            if table is None:
                continue
            extents = extents_of_mapping(table.dump())
            for lun in extents.luns:
                triples.extend((lun, s, e - s) for s, e in extents.blocks(lun).ranges)
        return AuditScope(vf, ExtentSet(triples))

    def wrap_lun(self, scope: AuditScope, key: LunKey, backend: BlockDevice) -> BlockDevice:
        return AuditedLun(backend, lun_name(key), scope, self)

    def memory(self, vf: int, regions: Iterable[MemoryRegion],
               granted: Iterable[tuple[int, int]]) -> RegionMemory:
        """Guest memory of ``vf`` made of ``regions``, audited against ``granted``
        (the ``(gpa, size)`` pairs of the memory table as received)."""
        return AuditedMemory(regions, auditor=self, vf=vf,
                             granted=regions_of_table(granted))

    # -- checks ---------------------------------------------------------------------------

    def check_memory(self, vf: int, granted: IntervalSet, gpa: int, length: int,
                     op: str) -> None:
        ok = granted.covers(gpa, length)
        with self._lock:
            self._ledger.checked(vf, "memory")
            if not ok:
                self._ledger.violated(Violation(vf, "memory", op, gpa, length))
        if not ok:
            self._report(vf=vf, kind="memory", op=op, address=gpa, length=length)

    def check_extent(self, scope: AuditScope, lun: LunName, lba: int, count: int,
                     op: str) -> None:
        ok = scope.extents.has_lun(lun) if op == "flush" else \
            scope.extents.covers(lun, lba, count)
        with self._lock:
            self._ledger.checked(scope.vf, "extent")
            if not ok:
                self._ledger.violated(Violation(scope.vf, "extent", op, lba, count,
                                                f"{lun[0]}/{lun[1]}"))
        if not ok:
            self._report(vf=scope.vf, kind="extent", op=op, lun=f"{lun[0]}/{lun[1]}",
                         lba=lba, blocks=count)

    def _report(self, **fields: Any) -> None:
        if self._log is not None:
            log_event(self._log, "audit_violation", level=logging.ERROR, **fields)

    # -- reading --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return self._ledger.dump()

    def vf_snapshot(self, vf: int) -> dict[str, int]:
        with self._lock:
            return self._ledger.vf_dump(vf)


def pf_scope_resolver(auditor: Auditor, model: AdapterModel) -> ScopeResolver:
    """The scope of the PF IO path (``pf_io_submit``) acting with a port name: the
    mappings of the VFs whose bound vport is logged in with that name."""
    def resolve(initiator: Wwn) -> AuditScope:
        state = model.state
        vfs = [i for i in range(len(state.vfs)) if state.initiator_of(i) == initiator]
        return auditor.scope(vfs[0] if len(vfs) == 1 else None,
                             [state.vfs[i].mapping for i in vfs])
    return resolve


def disabled_snapshot() -> dict[str, Any]:
    """What ``adapter_get_stats`` reports as ``audit`` when the audit is off."""
    return {"enabled": False}


class AuditedLun:
    """A physical LUN backend whose every IO is checked against a scope."""

    __slots__ = ("_auditor", "_backend", "_bs", "_lun", "_scope")

    def __init__(self, backend: BlockDevice, lun: LunName, scope: AuditScope,
                 auditor: Auditor) -> None:
        self._backend = backend
        self._lun = lun
        self._scope = scope
        self._auditor = auditor
        self._bs = backend.block_size

    @property
    def block_size(self) -> int:
        return self._backend.block_size

    @property
    def num_blocks(self) -> int:
        return self._backend.num_blocks

    def _blocks(self, bufs: Sequence[memoryview]) -> int:
        return sum(b.nbytes for b in bufs) // self._bs

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self._auditor.check_extent(self._scope, self._lun, lba, self._blocks(bufs), "read")
        self._backend.read_blocks(lba, bufs)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self._auditor.check_extent(self._scope, self._lun, lba, self._blocks(bufs), "write")
        self._backend.write_blocks(lba, bufs, fua=fua)

    def flush(self) -> None:
        self._auditor.check_extent(self._scope, self._lun, 0, 0, "flush")
        self._backend.flush()

    def __repr__(self) -> str:
        return f"AuditedLun({self._lun[0]}/{self._lun[1]}, vf={self._scope.vf})"


class AuditedMemory(RegionMemory):
    """A VF's guest memory whose every access is checked after it was carried out."""

    __slots__ = ("_auditor", "_granted", "_vf")

    def __init__(self, regions: Iterable[MemoryRegion], *, auditor: Auditor, vf: int,
                 granted: IntervalSet) -> None:
        super().__init__(regions)
        self._auditor = auditor
        self._vf = vf
        self._granted = granted

    def view(self, gpa: int, length: int) -> memoryview:
        out = super().view(gpa, length)
        self._auditor.check_memory(self._vf, self._granted, gpa, length, "view")
        return out

    def views(self, gpa: int, length: int) -> tuple[memoryview, ...]:
        out = super().views(gpa, length)
        self._auditor.check_memory(self._vf, self._granted, gpa, length, "views")
        return out

    def read(self, gpa: int, length: int) -> bytes:
        out = super().read(gpa, length)
        self._auditor.check_memory(self._vf, self._granted, gpa, length, "read")
        return out

    def write(self, gpa: int, data: BytesLike) -> None:
        super().write(gpa, data)
        self._auditor.check_memory(self._vf, self._granted, gpa, memoryview(data).nbytes,
                                   "write")

