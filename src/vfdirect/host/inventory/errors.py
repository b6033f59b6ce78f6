"""Errors of the inventory.

Every refusal is an :class:`InventoryError` whose message names the object (``VM
'vm1'``, ``vdisk 'vd-0a1b2c3d'``, ``vport naa.5…``); its class says what kind of refusal
it is, and :attr:`InventoryError.code` is the stable JSON-RPC code the host's API answers
with (:class:`~vfdirect.core.rpc.ErrorCode`). A refused operation changed nothing: each
one runs in a single transaction that is rolled back when it raises.
"""

from __future__ import annotations

from typing import ClassVar

from vfdirect.core.rpc import ErrorCode


class InventoryError(Exception):
    """An inventory operation was refused; nothing changed."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR


class NotFoundError(InventoryError, LookupError):
    """No such object (host, array, LUN, datastore, vdisk, VM, vport, VF assignment)."""

    code = ErrorCode.NOT_FOUND


class ConflictError(InventoryError):
    """The operation clashes with what exists: a name or WWN taken, a vdisk attached to
    another VM, an address in use, an object still in use."""

    code = ErrorCode.CONFLICT


class DuplicateWwnError(ConflictError):
    """A World Wide Name is already used in the inventory (port names, alternates, node
    names, LU names, arrays and their target ports all share one namespace)."""


class AlreadyAttachedError(ConflictError):
    """The vdisk is already attached to a VM (claim A3: a vdisk belongs to one VM)."""


class InvalidArgumentError(InventoryError, ValueError):
    """An argument is malformed or out of range (a size, a LUN number, a name)."""

    code = ErrorCode.INVALID_PARAMS


class OutOfSpaceError(InventoryError):
    """The datastore lacks clean free space for the request; ``dirty_blocks`` counts
    freed space that is still waiting for zeroing (scrubbing it would help)."""

    code = ErrorCode.RESOURCE_EXHAUSTED

    def __init__(
        self, message: str, *, needed_blocks: int, free_blocks: int, dirty_blocks: int
    ) -> None:
        super().__init__(message)
        self.needed_blocks = needed_blocks
        self.free_blocks = free_blocks
        self.dirty_blocks = dirty_blocks


class WrongStateError(InventoryError):
    """The object is in a state that does not allow the operation; the message names
    both the state it is in and the one asked for or required."""

    code = ErrorCode.WRONG_STATE


class NotAllocatedError(WrongStateError):
    """A thin vdisk still has unallocated chunks where a fully allocated one is needed
    (a VF's mapping table maps only inflated vdisks: :meth:`Inventory.vdisk_inflate`)."""


class InventoryBusyError(InventoryError):
    """The database stayed locked by other writers past the busy timeout."""

    code = ErrorCode.TIMEOUT


class InventoryCorruptError(InventoryError):
    """Rows disagree with each other (two extents over one block, say): the database was
    changed behind the inventory's back. Nothing is written on top of it."""
