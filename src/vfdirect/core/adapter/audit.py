"""The adapter auditor's pure parts: interval sets and the violation ledger (issue 8).

The auditor (``vfdirect adapter run --audit``) checks every physical IO a VF (or the PF IO
path) issues against the physical extents of the VF's loaded mapping, and every access
of a VF to guest memory against the regions the front end granted (SET_MEM_TABLE). It
must be independent of the code it audits, so nothing here uses the layouts' translation
or the guest memory's bounds checks:

* :class:`IntervalSet` is a set of half-open integer ranges, merged and sorted; it
  answers whether a range lies entirely inside it (across adjacent members, never across
  a gap);
* :class:`ExtentSet` is one :class:`IntervalSet` of blocks per physical LUN, computed by
  :func:`extents_of_mapping` straight from a mapping table's dump (the raw document the
  hypervisor sent: ``luns[].layout.placements[]`` with ``array``, ``lun``, ``start``,
  ``count``), and :func:`regions_of_table` builds the guest-memory set from the raw
  ``(gpa, size)`` pairs of a memory table;
* :class:`AuditLedger` counts checks and violations and keeps the first
  :data:`MAX_KEPT` violations; it is not thread-safe (the shell serializes it).

A violation is recorded, never corrected: the shell still carries out the IO.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "MAX_KEPT",
    "AuditError",
    "AuditLedger",
    "ExtentSet",
    "IntervalSet",
    "LunName",
    "Violation",
    "ViolationKind",
    "extents_of_mapping",
    "regions_of_table",
]

#: How many violations the ledger keeps (the counters count them all).
MAX_KEPT = 16

#: A physical LUN as the auditor names it: (array WWN, canonical text; LUN number).
LunName = tuple[str, int]

ViolationKind = Literal["memory", "extent"]


class AuditError(ValueError):
    """A document the auditor derives its sets from is malformed."""


class IntervalSet:
    """A set of half-open ranges ``[start, end)`` of non-negative integers."""

    __slots__ = ("_ends", "_starts")

    def __init__(self, ranges: Iterable[tuple[int, int]] = ()) -> None:
        """``ranges`` are ``(start, length)`` pairs; empty ones are ignored."""
        spans: list[tuple[int, int]] = []
        for start, length in ranges:
            if not isinstance(start, int) or not isinstance(length, int) \
                    or isinstance(start, bool) or isinstance(length, bool):
                raise AuditError(f"range ({start!r}, {length!r}) is not two integers")
            if start < 0 or length < 0:
                raise AuditError(f"range ({start}, {length}) is negative")
            if length:
                spans.append((start, start + length))
        spans.sort()
        starts: list[int] = []
        ends: list[int] = []
        for start, end in spans:
            if ends and start <= ends[-1]:  # overlapping or adjacent: merge
                ends[-1] = max(ends[-1], end)
            else:
                starts.append(start)
                ends.append(end)
        self._starts = starts
        self._ends = ends

    def covers(self, start: int, length: int) -> bool:
        """Whether ``[start, start+length)`` lies inside the set. An empty range is
        covered when ``start`` lies inside a member or at its end."""
        if start < 0 or length < 0:
            return False
        i = bisect_right(self._starts, start) - 1
        if i < 0:
            return False
        return start + length <= self._ends[i]

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """The merged members as ``(start, end)`` pairs, sorted."""
        return tuple(zip(self._starts, self._ends, strict=True))

    def total(self) -> int:
        return sum(e - s for s, e in zip(self._starts, self._ends, strict=True))

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __repr__(self) -> str:
        return f"IntervalSet({list(self.ranges)})"


class ExtentSet:
    """Blocks of physical LUNs: one :class:`IntervalSet` per LUN."""

    __slots__ = ("_by_lun",)

    def __init__(self, extents: Iterable[tuple[LunName, int, int]] = ()) -> None:
        """``extents`` are ``(lun, start block, block count)`` triples."""
        grouped: dict[LunName, list[tuple[int, int]]] = {}
        for lun, start, count in extents:
            grouped.setdefault(lun, []).append((start, count))
        self._by_lun = {lun: IntervalSet(r) for lun, r in grouped.items()}

    def covers(self, lun: LunName, start: int, count: int) -> bool:
        """Whether blocks ``[start, start+count)`` of ``lun`` are all in the set."""
        blocks = self._by_lun.get(lun)
        return blocks is not None and blocks.covers(start, count)

    def has_lun(self, lun: LunName) -> bool:
        return lun in self._by_lun

    @property
    def luns(self) -> tuple[LunName, ...]:
        return tuple(sorted(self._by_lun))

    def blocks(self, lun: LunName) -> IntervalSet:
        return self._by_lun.get(lun, IntervalSet())

    def total(self) -> int:
        return sum(s.total() for s in self._by_lun.values())

    def __repr__(self) -> str:
        return f"ExtentSet({ {f'{a}/{n}': s.ranges for (a, n), s in self._by_lun.items()} })"


def _field(data: Mapping[str, Any], name: str, kind: type, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise AuditError(f"{where}: not an object")
    if name not in data:
        raise AuditError(f"{where}: no {name!r}")
    value = data[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AuditError(f"{where}: {name!r} is not a {kind.__name__}")
    return value


def extents_of_mapping(document: Mapping[str, Any] | None) -> ExtentSet:
    """The physical extents a mapping table's dump places its vdisks in (None: none).

    Reads only ``luns[].layout.placements[].{array, lun, start, count}``: the first
    mapping as the hypervisor sent it, not as the VF translated it."""
    if document is None:
        return ExtentSet()
    triples: list[tuple[LunName, int, int]] = []
    for i, entry in enumerate(_field(document, "luns", list, "mapping")):
        layout = _field(entry, "layout", Mapping, f"mapping entry {i}")
        for j, placement in enumerate(_field(layout, "placements", list,
                                             f"mapping entry {i} layout")):
            where = f"mapping entry {i} placement {j}"
            array = _field(placement, "array", str, where)
            lun = _field(placement, "lun", int, where)
            start = _field(placement, "start", int, where)
            count = _field(placement, "count", int, where)
            triples.append(((array.lower(), lun), start, count))
    return ExtentSet(triples)


def regions_of_table(regions: Iterable[tuple[int, int]]) -> IntervalSet:
    """Guest-physical memory granted by a memory table, from its ``(gpa, size)``."""
    return IntervalSet(regions)


@dataclass(frozen=True, slots=True)
class Violation:
    """One access outside what was granted."""

    vf: int | None  # None: the PF IO path acting for a vport bound to no known VF
    kind: ViolationKind
    #: what was accessed: "read", "write", "view", "flush", ...
    op: str
    #: memory: guest-physical address; extent: LBA on ``lun``
    address: int
    length: int
    lun: str | None = None

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {"vf": self.vf, "kind": self.kind, "op": self.op,
                               "address": self.address, "length": self.length}
        if self.lun is not None:
            out["lun"] = self.lun
        return out


@dataclass(slots=True)
class _Counts:
    checks: int = 0
    memory_checks: int = 0
    extent_checks: int = 0
    memory_violations: int = 0
    extent_violations: int = 0

    def dump(self) -> dict[str, int]:
        return {"checks": self.checks, "memory_checks": self.memory_checks,
                "extent_checks": self.extent_checks,
                "memory_violations": self.memory_violations,
                "extent_violations": self.extent_violations}


@dataclass(slots=True)
class AuditLedger:
    """Counters of checks and violations, in total and per VF."""

    total: _Counts = field(default_factory=_Counts)
    per_vf: dict[int, _Counts] = field(default_factory=dict)
    kept: list[Violation] = field(default_factory=list)

    def _counts(self, vf: int | None) -> _Counts | None:
        if vf is None:
            return None
        counts = self.per_vf.get(vf)
        if counts is None:
            counts = self.per_vf[vf] = _Counts()
        return counts

    def checked(self, vf: int | None, kind: ViolationKind, n: int = 1) -> None:
        for counts in (self.total, self._counts(vf)):
            if counts is not None:
                counts.checks += n
                if kind == "memory":
                    counts.memory_checks += n
                else:
                    counts.extent_checks += n

    def violated(self, violation: Violation) -> None:
        for counts in (self.total, self._counts(violation.vf)):
            if counts is not None:
                if violation.kind == "memory":
                    counts.memory_violations += 1
                else:
                    counts.extent_violations += 1
        if len(self.kept) < MAX_KEPT:
            self.kept.append(violation)

    def vf_dump(self, vf: int) -> dict[str, int]:
        counts = self.per_vf.get(vf)
        return (counts or _Counts()).dump()

    def dump(self) -> dict[str, Any]:
        return {"enabled": True, **self.total.dump(),
                "violations": [v.dump() for v in self.kept],
                "per_vf": {str(vf): c.dump() for vf, c in sorted(self.per_vf.items())}}
