"""The adapter's platform: what the pure model asks for, done with real files and memory.

* the fabric is a :class:`~vfdirect.storage.shared_fabric.SharedFabric` (opened at start
  with ``--fabric-dir``, else beside the first array attached); the physical port logs in
  (FLOGI) when it is opened;
* arrays are :class:`~vfdirect.storage.StorageArray` directories, their LUN files opened
  lazily and shared through one :class:`~vfdirect.storage.LunPool`; an array's metadata
  is re-read when a LUN it does not know is asked for (the hypervisor creates LUNs after
  the adapter attached the array);
* IO buffers are shared-memory files mapped ``MAP_SHARED``; the descriptor is not kept
  (the mapping holds the file), so the server closes every received descriptor;
* VF data paths register here (:meth:`HostPlatform.register_datapath`) when they exist.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import stat
from collections.abc import Callable
from pathlib import Path

from vfdirect.adapter.audit import Auditor, AuditScope, ScopeResolver
from vfdirect.core.adapter.methods import MAX_BUFFER_BYTES
from vfdirect.core.adapter.platform import ArrayInfo, VfDataPath
from vfdirect.core.alloc.layout import VdiskLayout
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.block import BlockDevice
from vfdirect.core.ids import VfIndex
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.wwn import Wwn
from vfdirect.storage.array import StorageArray, StorageError, UnknownLunError
from vfdirect.storage.pool import LunPool
from vfdirect.storage.shared_fabric import FabricBusy, SharedFabric
from vfdirect.storage.vdisk import VdiskBlockDevice


def _busy(exc: FabricBusy) -> RpcError:
    return RpcError(ErrorCode.TIMEOUT, str(exc))


class HostPlatform:
    """:class:`~vfdirect.core.adapter.platform.AdapterPlatform` of the adapter daemon."""

    def __init__(
        self,
        run_dir: Path,
        *,
        port_wwpn: Wwn,
        port_wwnn: Wwn,
        fabric_dir: Path | None = None,
        lock_timeout: float = 5.0,
        auditor: Auditor | None = None,
    ) -> None:
        self._run_dir = run_dir
        self._port = (port_wwpn, port_wwnn)
        self._fabric_dir = fabric_dir
        self._lock_timeout = lock_timeout
        self._fabric: SharedFabric | None = None
        self._arrays: dict[Wwn, StorageArray] = {}
        self._pool = LunPool()
        self._buffers: dict[int, mmap.mmap] = {}
        self._datapaths: dict[int, VfDataPath] = {}
        #: the auditor (None: the audit is off) and how it scopes the PF IO path
        self.auditor = auditor
        self.audit_scope_of: ScopeResolver | None = None

    # -- fabric ------------------------------------------------------------------------

    @property
    def fabric(self) -> SharedFabric | None:
        return self._fabric

    def open_fabric(self, directory: Path) -> SharedFabric:
        """Open the shared fabric and log the physical port in (FLOGI)."""
        if self._fabric is not None:
            return self._fabric
        try:
            fabric = SharedFabric(directory, lock_timeout=self._lock_timeout)
        except FabricBusy as exc:
            raise _busy(exc) from None
        try:
            fabric.flogi(*self._port)
        except FabricBusy as exc:
            fabric.close()
            raise _busy(exc) from None
        except BaseException:
            fabric.close()
            raise
        self._fabric = fabric
        return fabric

    # -- arrays ------------------------------------------------------------------------

    def array_attach(self, path: str) -> ArrayInfo:
        directory = Path(path).resolve()
        try:
            array = StorageArray.open(directory)
        except (StorageError, OSError) as exc:
            raise RpcError(ErrorCode.NOT_FOUND, f"array_attach: {exc}") from None
        known = self._arrays.get(array.wwn)
        if known is not None and known.directory != directory:
            raise RpcError(ErrorCode.CONFLICT,
                           f"array {array.wwn} is attached from {known.directory} already")
        if known is not None:
            known.reload()
            array = known
        fabric = self._fabric
        if fabric is None:
            fabric = self.open_fabric(self._fabric_dir or directory.parent / "fabric")
        try:
            fabric.target_ports_add(array.wwn, array.target_ports)
        except FabricBusy as exc:
            raise _busy(exc) from None
        if known is None:
            self._arrays[array.wwn] = array
            self._pool.add_array(array)
        return ArrayInfo(array.wwn, str(directory), array.target_ports, array.lun_list())

    def lun_geometry(self, key: LunKey) -> PhysicalLun | None:
        array = self._arrays.get(key.array)
        if array is None:
            return None
        try:
            return array.lun_get(key.lun)
        except UnknownLunError:
            pass
        try:
            array.reload()
            return array.lun_get(key.lun)
        except (StorageError, OSError):
            return None

    def _lun(self, key: LunKey) -> BlockDevice:
        try:
            return self._pool.get(key)
        except UnknownLunError:
            if self.lun_geometry(key) is None:
                raise
            return self._pool.get(key)

    def block_device(self, initiator: Wwn, layout: VdiskLayout, *,
                     audit: AuditScope | None = None) -> BlockDevice:
        """The vdisk of ``layout`` as ``initiator`` sees it. With the audit on, its LUN
        backends are audited against ``audit`` (a VF's scope) or, for the PF IO path,
        against the scope :attr:`audit_scope_of` gives for ``initiator``."""
        fabric = self._fabric
        if fabric is None:
            raise RpcError(ErrorCode.WRONG_STATE, "no fabric attached")
        luns: Callable[[LunKey], BlockDevice] = self._lun
        auditor = self.auditor
        if auditor is not None:
            if audit is None:
                resolve = self.audit_scope_of
                audit = auditor.scope(None, ()) if resolve is None else resolve(initiator)
            scope = audit
            luns = lambda key: auditor.wrap_lun(scope, key, self._lun(key))  # noqa: E731
        try:
            return VdiskBlockDevice(layout, luns=luns, fabric=fabric, initiator=initiator)
        except (StorageError, OSError) as exc:
            raise RpcError(ErrorCode.IO_ERROR,
                           f"vdisk {layout.vdisk_id}: cannot open its LUNs: {exc}") from None

    # -- VFs ---------------------------------------------------------------------------

    def vf_socket_path(self, vf: VfIndex) -> str:
        return str(self._run_dir / f"vf{int(vf)}.sock")

    def datapath(self, vf: VfIndex) -> VfDataPath | None:
        return self._datapaths.get(int(vf))

    def register_datapath(self, vf: int, datapath: VfDataPath | None) -> None:
        """Hook for the VF data path: register (or, with None, withdraw) VF ``vf``'s."""
        if datapath is None:
            self._datapaths.pop(vf, None)
        else:
            self._datapaths[vf] = datapath

    # -- IO buffers --------------------------------------------------------------------

    def io_buffer_attach(self, buffer_id: int, fd: int) -> int:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise RpcError(ErrorCode.BAD_FDS, f"pf_io_buffer_attach: bad descriptor: {exc}") \
                from None
        if not stat.S_ISREG(st.st_mode):
            raise RpcError(ErrorCode.BAD_FDS,
                           "pf_io_buffer_attach: the descriptor is not a shared-memory file")
        if not 0 < st.st_size <= MAX_BUFFER_BYTES:
            raise RpcError(ErrorCode.BAD_FDS,
                           f"pf_io_buffer_attach: the file is {st.st_size} bytes; a buffer "
                           f"is 1..{MAX_BUFFER_BYTES}")
        try:
            mm = mmap.mmap(fd, st.st_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError) as exc:
            raise RpcError(ErrorCode.BAD_FDS,
                           f"pf_io_buffer_attach: cannot map it read-write: {exc}") from None
        self._buffers[buffer_id] = mm
        return st.st_size

    def io_buffer_detach(self, buffer_id: int) -> None:
        mm = self._buffers.pop(buffer_id)
        with contextlib.suppress(BufferError):  # a view still exists: GC unmaps it
            mm.close()

    def io_buffer(self, buffer_id: int) -> memoryview:
        return memoryview(self._buffers[buffer_id])

    # -- lifecycle ---------------------------------------------------------------------

    def close(self) -> None:
        """Close LUN files and buffers, log every port out."""
        for datapath in list(self._datapaths.values()):
            with contextlib.suppress(Exception):
                datapath.reset()
        self._datapaths.clear()
        self._pool.close()
        for buffer_id in list(self._buffers):
            self.io_buffer_detach(buffer_id)
        if self._fabric is not None:
            self._fabric.close()
            self._fabric = None
