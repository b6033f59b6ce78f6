"""The hypervisor's inventory (claim A9): a database of everything ``vfdirect host``
creates, that survives its restart.

* :mod:`.inventory`: :class:`Inventory`, the repository (one transaction per method);
* :mod:`.views`: the frozen records it returns, and the VM and host states;
* :mod:`.errors`: :class:`InventoryError` and its kinds;
* :mod:`.models`: the tables (SQLAlchemy 2 typed ORM), made by the Alembic migrations
  in ``migrations/``; :mod:`.database`: SQLite and PostgreSQL connections and upgrades;
* :mod:`.names`: how vport, LU and vdisk names are made up.
"""

from vfdirect.host.inventory.database import head_revision
from vfdirect.host.inventory.errors import (
    AlreadyAttachedError,
    ConflictError,
    DuplicateWwnError,
    InvalidArgumentError,
    InventoryBusyError,
    InventoryCorruptError,
    InventoryError,
    NotAllocatedError,
    NotFoundError,
    OutOfSpaceError,
    WrongStateError,
)
from vfdirect.host.inventory.inventory import Clock, Inventory
from vfdirect.host.inventory.views import (
    VM_TRANSITIONS,
    ArrayView,
    DatastoreView,
    EventView,
    HostState,
    HostView,
    LunView,
    MappingEntry,
    MappingInfo,
    MigrationOutcome,
    MigrationView,
    VdiskAddress,
    VdiskView,
    VfAssignmentView,
    VmRuntime,
    VmState,
    VmView,
    VportView,
)
from vfdirect.storage.array import BackingKind

__all__ = [
    "VM_TRANSITIONS",
    "AlreadyAttachedError",
    "ArrayView",
    "BackingKind",
    "Clock",
    "ConflictError",
    "DatastoreView",
    "DuplicateWwnError",
    "EventView",
    "HostState",
    "HostView",
    "InvalidArgumentError",
    "Inventory",
    "InventoryBusyError",
    "InventoryCorruptError",
    "InventoryError",
    "LunView",
    "MappingEntry",
    "MappingInfo",
    "MigrationOutcome",
    "MigrationView",
    "NotAllocatedError",
    "NotFoundError",
    "OutOfSpaceError",
    "VdiskAddress",
    "VdiskView",
    "VfAssignmentView",
    "VmRuntime",
    "VmState",
    "VmView",
    "VportView",
    "WrongStateError",
    "head_revision",
]
