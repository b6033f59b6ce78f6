"""What the pure adapter model asks of the world around it, as interfaces.

The model (:mod:`.model`) decides; a *platform* carries out what needs IO: the shared
fabric (logins held by the adapter process, zoning and masking files), storage arrays
and their LUN files, IO buffers in shared memory, and each VF's data path. The daemon
provides the real one (``vfdirect.adapter.platform``); tests provide in-memory ones.

Rules:

* platform methods raise :class:`~vfdirect.core.rpc.RpcError` for failures of their own
  (a missing array directory, a bad memfd, a busy fabric lock: ``TIMEOUT``), and the
  :class:`~vfdirect.core.fabric.FabricError` family for refusals of the fabric; the model
  turns the latter into ``FABRIC_REFUSED``;
* file descriptors handed to the platform stay owned by the caller (the server closes
  every received descriptor after the call): whatever keeps one duplicates it. File
  descriptors a platform returns (``VfDataPath.save``) are owned by the caller.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vfdirect.core.adapter.vf import VfRecord
from vfdirect.core.alloc.layout import VdiskLayout
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.block import BlockDevice
from vfdirect.core.fabric.logins import Login
from vfdirect.core.ids import LunNumber, VfIndex
from vfdirect.core.wwn import Wwn


@dataclass(frozen=True, slots=True)
class ArrayInfo:
    """A storage array the adapter attached."""

    wwn: Wwn
    path: str
    target_ports: tuple[Wwn, ...]
    luns: tuple[PhysicalLun, ...]


class FabricPort(Protocol):
    """The fabric as one adapter reaches it (the shared, cross-process fabric in the
    daemon; a pure :class:`~vfdirect.core.fabric.Fabric` in tests)."""

    @property
    def directory(self) -> str:
        """Where the fabric lives (for display)."""

    def physical_login(self) -> Login:
        """The adapter's physical port login (FLOGI done when the fabric was opened)."""

    def fdisc(self, wwpn: Wwn, wwnn: Wwn) -> Login:
        """NPIV login of ``wwpn`` under the physical port; ``DuplicatePortName`` if the
        name is logged in anywhere in the fabric."""

    def logo(self, wwpn: Wwn) -> None:
        """Log out a port this adapter logged in."""

    def zone_create(self, name: str, members: Sequence[Wwn]) -> frozenset[Wwn]: ...

    def zone_member_add(self, name: str, members: Sequence[Wwn]) -> frozenset[Wwn]: ...

    def mask_grant(self, initiator: Wwn, array: Wwn, luns: Sequence[int]) -> tuple[int, ...]:
        """Grant; returns the LUNs that were not masked to ``initiator`` before."""

    def mask_revoke(self, initiator: Wwn, array: Wwn, luns: Sequence[int]) -> tuple[int, ...]:
        """Revoke; returns the LUNs that were masked before."""

    def target_ports_add(self, array: Wwn, ports: Sequence[Wwn]) -> None: ...

    def show(self) -> dict[str, Any]:
        """``{"config": ..., "logins": [...], "generation": n}``."""

    def authorize(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> None:
        """The per-IO check (:class:`~vfdirect.core.fabric.guard.Authorizer`)."""


@dataclass(frozen=True, slots=True)
class DrainResult:
    drained: bool
    #: descriptor heads of the requests still in flight
    outstanding: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class SavedQueueState:
    """What ``vf_state_save`` hands to the PF: the versioned queue-state record (plain
    data: virtqueue addresses, sizes, last_avail_idx, used_idx, heads in flight) and the
    descriptors it lists (kick/call eventfds, guest memory)."""

    record: Mapping[str, Any]
    fds: tuple[int, ...] = ()


class VfDataPath(Protocol):
    """The hooks a VF's data path (vhost-user-scsi device, built next) offers the PF.

    The model calls them only in the states the VF table allows, under the admin lock;
    the data path reports its own events (front end attached/gone, fault) with
    ``AdapterModel.vf_event`` and reads its configuration from the immutable
    :class:`~.vf.VfRecord` snapshots given to :meth:`configure`.
    """

    def configure(self, vf: VfRecord, initiator: Wwn | None) -> None:
        """A new snapshot of the VF (state, VM, vport, mapping) and the port name its IO
        goes out with (the bound vport's login, None when unbound or logged out); called
        after every change, under the admin lock. Build the SCSI targets with
        :func:`~.scsi_view.build_targets` and ``AdapterPlatform.block_device``."""

    def outstanding(self) -> int:
        """Requests fetched and not yet completed."""

    def quiesce(self) -> int:
        """Stop fetching new requests (claim B1); returns the outstanding count."""

    def drain(self, timeout_ms: int) -> DrainResult:
        """Wait at most ``timeout_ms`` until nothing is outstanding (claim B2)."""

    def save(self) -> SavedQueueState:
        """Hand over the queue state and revoke the DMA window (claims B3, B4)."""

    def restore(self, record: Mapping[str, Any], fds: Sequence[int]) -> None:
        """Take a saved queue state (``fds`` are borrowed: duplicate what is kept)."""

    def resume(self) -> None:
        """Fetch again from the restored positions."""

    def reset(self) -> None:
        """Stop everything and forget the front end (function-level reset, unassign)."""

    def stats(self) -> Mapping[str, Any]:
        """The data path's counters (plain data: IOs, bytes, errors by sense key,
        latency histogram, ...), for ``adapter_get_stats``."""


class AdapterPlatform(Protocol):
    """Everything with IO that the model needs."""

    @property
    def fabric(self) -> FabricPort | None:
        """The fabric, once one is attached."""

    def array_attach(self, path: str) -> ArrayInfo:
        """Open the array in ``path`` (and the fabric beside it if none is attached yet)."""

    def lun_geometry(self, key: LunKey) -> PhysicalLun | None:
        """A physical LUN of an attached array."""

    def vf_socket_path(self, vf: VfIndex) -> str:
        """Where the VF's vhost-user socket is."""

    def datapath(self, vf: VfIndex) -> VfDataPath | None:
        """The VF's data path, if one is running."""

    def io_buffer_attach(self, buffer_id: int, fd: int) -> int:
        """Map the shared-memory file ``fd`` as buffer ``buffer_id``; returns its size."""

    def io_buffer_detach(self, buffer_id: int) -> None: ...

    def io_buffer(self, buffer_id: int) -> memoryview:
        """The bytes of an attached buffer."""

    def block_device(self, initiator: Wwn, layout: VdiskLayout) -> BlockDevice:
        """The vdisk of ``layout`` as ``initiator`` reaches it: every IO through the
        fabric guard (claim A10's translation, for the PF path: claim B6)."""
