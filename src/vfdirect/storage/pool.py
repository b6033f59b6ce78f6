"""Open physical LUN backends, by :class:`~vfdirect.core.array.LunKey`, shared by users.

The IO engine opens each physical LUN once and lets every virtual disk on it share the
descriptor; :class:`LunPool` owns those backends and closes them all at the end. It is
also where freed extents get zeroed (:meth:`LunPool.zero`, :func:`scrub`).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import Self

from vfdirect.core.alloc.datastore import Datastore
from vfdirect.core.alloc.extent import Extent
from vfdirect.core.array import LunKey
from vfdirect.core.ids import VdiskId
from vfdirect.core.wwn import Wwn
from vfdirect.storage.array import StorageArray, StorageError, UnknownLunError
from vfdirect.storage.backend import LunBackend


class LunPool:
    """Backends of the LUNs of some arrays (and any backend handed in), opened lazily."""

    def __init__(self, arrays: Iterable[StorageArray] = ()) -> None:
        self._arrays: dict[Wwn, StorageArray] = {}
        self._open: dict[LunKey, LunBackend] = {}
        for array in arrays:
            self.add_array(array)

    def add_array(self, array: StorageArray) -> None:
        if array.wwn in self._arrays and self._arrays[array.wwn] is not array:
            raise StorageError(f"the pool already has an array named {array.wwn}")
        self._arrays[array.wwn] = array

    def add_backend(self, key: LunKey, backend: LunBackend) -> None:
        """Hand an already open backend (a memory LUN, say) to the pool, which now owns it."""
        if key in self._open:
            raise StorageError(f"the pool already has {key} open")
        self._open[key] = backend

    def get(self, key: LunKey) -> LunBackend:
        backend = self._open.get(key)
        if backend is None:
            array = self._arrays.get(key.array)
            if array is None:
                raise UnknownLunError(f"no array {key.array} in the pool for {key}")
            backend = self._open[key] = array.lun_open(key.lun)
        return backend

    __call__ = get

    def zero(self, extent: Extent) -> None:
        """Zero ``extent`` durably."""
        self.get(extent.lun).zero_blocks(extent.start, extent.count)

    def close(self) -> None:
        backends, self._open = list(self._open.values()), {}
        for backend in backends:
            backend.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def scrub(datastore: Datastore, pool: LunPool) -> int:
    """Zero every extent the datastore holds dirty and mark it clean; returns the number
    of blocks zeroed. Safe to repeat after a crash: what was not marked is redone."""
    blocks = 0
    for extent in datastore.pending_zero():
        pool.zero(extent)
        datastore.mark_zeroed(extent)
        blocks += extent.count
    return blocks


def vdisk_delete(datastore: Datastore, pool: LunPool, vdisk_id: VdiskId) -> int:
    """Delete a vdisk and zero its space at once, so it is free again on return; returns
    the number of blocks zeroed. If zeroing fails, the space stays dirty (never reused)
    and :func:`scrub` finishes the job later."""
    blocks = 0
    for extent in datastore.vdisk_delete(vdisk_id):
        pool.zero(extent)
        datastore.mark_zeroed(extent)
        blocks += extent.count
    return blocks
