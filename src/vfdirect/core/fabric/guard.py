"""The fabric guard: a physical LUN as one initiator port reaches it.

Rules of this module:

* :class:`GuardedLun` asks the fabric on *every* read, write and flush, before touching
  the backend, so masking is enforced by whatever executes the IO, and a revoke or
  logout stops the very next IO (SYSTEM.md: "a VF whose mapping table is wrong still
  cannot reach a LUN not masked to its virtual port");
* the guard adds nothing else: no copies, no retries, no range checks of its own (the
  backend's :class:`~vfdirect.core.block.BlockRangeError` passes through);
* it depends on :class:`Authorizer`, the one method of :class:`~.fabric.Fabric` it
  needs, so that a shell may put a fabric reached over a channel behind it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from vfdirect.core.array import LunKey
from vfdirect.core.block import BlockDevice
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn


class Authorizer(Protocol):
    """Anything that can let an IO pass or raise AccessDenied (a :class:`Fabric`)."""

    def authorize(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> None: ...


class GuardedLun:
    """A :class:`BlockDevice` that is ``backend`` seen through the fabric by one port."""

    __slots__ = ("_array", "_backend", "_fabric", "_initiator", "_lun", "key")

    def __init__(
        self, fabric: Authorizer, initiator: Wwn, key: LunKey, backend: BlockDevice
    ) -> None:
        self._fabric = fabric
        self._initiator = initiator
        self.key = key
        self._array = key.array
        self._lun = key.lun
        self._backend = backend

    @property
    def initiator(self) -> Wwn:
        return self._initiator

    @property
    def block_size(self) -> int:
        return self._backend.block_size

    @property
    def num_blocks(self) -> int:
        return self._backend.num_blocks

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self._fabric.authorize(self._initiator, self._array, self._lun)
        self._backend.read_blocks(lba, bufs)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self._fabric.authorize(self._initiator, self._array, self._lun)
        self._backend.write_blocks(lba, bufs, fua=fua)

    def flush(self) -> None:
        self._fabric.authorize(self._initiator, self._array, self._lun)
        self._backend.flush()

    def __repr__(self) -> str:
        return f"GuardedLun({self.key} as seen by {self._initiator})"
