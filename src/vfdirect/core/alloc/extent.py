"""Extents: contiguous runs of blocks on one physical LUN.

An :class:`Extent` is the unit of SYSTEM.md's "physical region": (LUN, start LBA, block
count), in the LUN's own blocks. It is a value: frozen, ordered, hashable, and it dumps to
plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vfdirect.core.alloc.errors import LayoutError
from vfdirect.core.array import LunKey, dump_field
from vfdirect.core.ids import PhysicalLba


@dataclass(frozen=True, order=True, slots=True)
class Extent:
    """``count`` blocks of LUN ``lun`` starting at ``start``."""

    lun: LunKey
    start: PhysicalLba
    count: int

    def __post_init__(self) -> None:
        if self.start < 0 or self.count < 1:
            raise LayoutError(f"extent of {self.count} blocks at {self.start} on {self.lun}")

    @property
    def end(self) -> PhysicalLba:
        """First block after the extent."""
        return PhysicalLba(self.start + self.count)

    def overlaps(self, other: Extent) -> bool:
        return self.lun == other.lun and self.start < other.end and other.start < self.end

    def __str__(self) -> str:
        return f"{self.lun}[{self.start}+{self.count}]"

    def dump(self) -> dict[str, Any]:
        return {**self.lun.dump(), "start": int(self.start), "count": self.count}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> Extent:
        try:
            key = LunKey.load(data)
        except ValueError as exc:
            raise LayoutError(f"extent: {exc}") from exc
        return cls(
            key,
            PhysicalLba(dump_field(data, "start", int, LayoutError)),
            dump_field(data, "count", int, LayoutError),
        )
