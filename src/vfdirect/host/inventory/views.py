"""What the inventory hands out: frozen records, never ORM objects.

Rules of this module:

* every :class:`~vfdirect.host.inventory.Inventory` method returns these values (or
  tuples of them), built inside the operation's transaction; they hold no session, load
  nothing lazily and stay valid after the database changes (they are a snapshot);
* identities use the core's types (:class:`~vfdirect.core.wwn.Wwn`,
  :class:`~vfdirect.core.array.LunKey`, :class:`~vfdirect.core.alloc.VdiskLayout`), so
  what the inventory says plugs straight into the adapter's and the fabric's calls;
* states are :class:`~enum.StrEnum` s stored by value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from vfdirect.core.alloc import SpaceUsage, VdiskLayout
from vfdirect.core.array import LunKey, PhysicalLun
from vfdirect.core.ids import TargetId, VdiskId, VfIndex
from vfdirect.core.wwn import Wwn
from vfdirect.storage.array import BackingKind


class HostState(StrEnum):
    UP = "up"
    DOWN = "down"
    MAINTENANCE = "maintenance"


class VmRuntime(StrEnum):
    """What runs the guest: vfdirect's Python guest runtime, or QEMU with Linux."""

    PYTHON = "python"
    QEMU = "qemu"


class VmState(StrEnum):
    DEFINED = "defined"
    STARTING = "starting"
    RUNNING = "running"
    PAUSED = "paused"
    MIGRATING = "migrating"
    STOPPED = "stopped"
    ERROR = "error"


#: Which state changes :meth:`Inventory.vm_set_state` accepts (setting the state a VM is
#: already in is always accepted). Anything may fall into ERROR; from ERROR a VM is
#: stopped or started again.
VM_TRANSITIONS: Mapping[VmState, frozenset[VmState]] = MappingProxyType({
    VmState.DEFINED: frozenset({VmState.STARTING, VmState.STOPPED, VmState.ERROR}),
    VmState.STARTING: frozenset({VmState.RUNNING, VmState.STOPPED, VmState.ERROR}),
    VmState.RUNNING: frozenset(
        {VmState.PAUSED, VmState.MIGRATING, VmState.STOPPED, VmState.ERROR}
    ),
    VmState.PAUSED: frozenset(
        {VmState.RUNNING, VmState.MIGRATING, VmState.STOPPED, VmState.ERROR}
    ),
    VmState.MIGRATING: frozenset(
        {VmState.RUNNING, VmState.PAUSED, VmState.STOPPED, VmState.ERROR}
    ),
    VmState.STOPPED: frozenset({VmState.STARTING, VmState.DEFINED, VmState.ERROR}),
    VmState.ERROR: frozenset({VmState.STOPPED, VmState.STARTING}),
})


class MigrationOutcome(StrEnum):
    RUNNING = "running"
    COMMITTED = "committed"
    ABORTED = "aborted"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class HostView:
    name: str
    api_address: str | None
    run_dir: str | None
    state: HostState
    heartbeat_at: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LunView:
    """A physical LUN as registered: geometry, backing, and the datastore it is in."""

    lun: PhysicalLun
    backing: BackingKind
    path: str
    datastore: str | None

    @property
    def key(self) -> LunKey:
        return self.lun.key


@dataclass(frozen=True, slots=True)
class ArrayView:
    wwn: Wwn
    directory: str
    target_ports: tuple[Wwn, ...]
    luns: tuple[LunView, ...]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DatastoreView:
    name: str
    block_size: int
    chunk_blocks: int
    luns: tuple[PhysicalLun, ...]
    usage: SpaceUsage
    vdisks: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class VdiskAddress:
    """The second mapping (claim A2): where the VM finds a vdisk, (vport WWPN, virtual
    target id, LUN). ``vport`` is ``None`` until a vport is associated with the VM
    (claim A6); (target, lun) is unique per VM, hence per vport."""

    vdisk_id: VdiskId
    vm: str
    vport: Wwn | None
    target: TargetId
    lun: int


@dataclass(frozen=True, slots=True)
class VdiskView:
    id: VdiskId
    name: str
    datastore: str
    capacity_blocks: int
    block_size: int
    thin: bool
    allocated_blocks: int
    chunk_blocks: int
    #: the logical unit's identity the guest reads in INQUIRY VPD 80h and 83h
    serial: str
    lu_wwn: Wwn
    created_at: datetime
    address: VdiskAddress | None

    @property
    def size_bytes(self) -> int:
        return self.capacity_blocks * self.block_size

    @property
    def fully_allocated(self) -> bool:
        chunks = -(-self.capacity_blocks // self.chunk_blocks)
        return self.allocated_blocks == chunks * self.chunk_blocks

    @property
    def vm(self) -> str | None:
        return None if self.address is None else self.address.vm


@dataclass(frozen=True, slots=True)
class VfAssignmentView:
    host: str
    vf: VfIndex
    vm: str
    assigned_at: datetime


@dataclass(frozen=True, slots=True)
class VmView:
    name: str
    host: str | None
    memory_bytes: int
    runtime: VmRuntime
    state: VmState
    pid: int | None
    #: the VF assigned to the VM on its current host, if any
    vf: VfIndex | None
    #: the WWPN of the vport associated with the VM (claim A6), if any
    vport: Wwn | None
    vdisks: tuple[VdiskId, ...]
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class VportView:
    wwpn: Wwn
    wwnn: Wwn
    #: second port name, logged in at a migration destination (claim X3)
    alternate_wwpn: Wwn | None
    vm: str | None
    host: str | None
    created_at: datetime

    def port_names(self) -> tuple[Wwn, ...]:
        """Every port name the vport may log in with (what masking must cover)."""
        return (self.wwpn,) if self.alternate_wwpn is None else (self.wwpn, self.alternate_wwpn)


@dataclass(frozen=True, slots=True)
class MappingEntry:
    """One vdisk of a VM: its identity, first mapping (layout) and second mapping."""

    vdisk: VdiskView
    layout: VdiskLayout
    address: VdiskAddress


@dataclass(frozen=True, slots=True)
class MappingInfo:
    """A VM's mapping info as the inventory keeps it (claim A2), entries in address
    order: the first mapping, vdisk -> physical regions (:attr:`first`), and the second,
    vdisk -> virtual disk address (:attr:`second`)."""

    vm: str
    vport: VportView | None
    entries: tuple[MappingEntry, ...]

    @property
    def first(self) -> dict[VdiskId, VdiskLayout]:
        return {e.vdisk.id: e.layout for e in self.entries}

    @property
    def second(self) -> dict[VdiskId, VdiskAddress]:
        return {e.vdisk.id: e.address for e in self.entries}

    def physical_luns(self) -> tuple[LunKey, ...]:
        """Every physical LUN the VM's vdisks live on: what the fabric must mask to the
        VM's vport (claim A5)."""
        return tuple(sorted({k for e in self.entries for k in e.layout.luns()}))


@dataclass(frozen=True, slots=True)
class MigrationView:
    """One live migration (claim X4): its hosts, outcome and per-phase report."""

    id: str
    vm: str
    source: str | None
    destination: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    phases: Mapping[str, Any]
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class EventView:
    id: int
    at: datetime
    kind: str
    claim: str | None
    host: str | None
    vm: str | None
    vdisk: str | None
    vport: str | None
    migration: str | None
    detail: Mapping[str, Any]
