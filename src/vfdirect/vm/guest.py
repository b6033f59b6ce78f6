"""The VM's guest memory: the memory file, its layout, and the guest runtime state in it
(shell).

* cold boot (:func:`boot_guest` with ``restart=False``): create the memory file (or reuse
  one of the same size, e.g. made by the hypervisor with the firmware table already in
  page 0), write ``fwtable`` into page 0 when the memory is new (or page 0 is blank),
  then lay out a fresh guest: request table, virtqueues with their event buffers posted,
  journal, and the guest header (page 1) last;
* restart (``restart=True``): map the existing memory file, read the layout from the
  guest header, and ATTACH to the driver state and the journal found there: the new
  process carries on where the killed one stopped (SYSTEM.md 6);
* guest-physical address 0 is offset 0 of the file; the region's vhost-user user address
  is the address of our own mapping (what QEMU sends too).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path

from vfdirect.core.guest.fwtable import (
    FWTABLE_MAX_BYTES,
    FirmwareTable,
    FirmwareTableError,
    FwTableFault,
    decode_fwtable,
)
from vfdirect.core.guest.journal import Journal, JournalError, vm_id_number
from vfdirect.core.guest.layout import BOOT_COUNT_OFFSET as _BOOT_COUNT
from vfdirect.core.guest.layout import (
    FWTABLE_ADDR,
    HEADER_ADDR,
    GuestLayout,
    GuestLayoutError,
    LayoutParams,
)
from vfdirect.core.guest.virtscsi import VirtioScsiDriver
from vfdirect.core.virtio.errors import DriverStateError
from vfdirect.core.virtio.memory import RegionMemory
from vfdirect.transport.shm import SharedMemory, SharedMemoryError

__all__ = ["BootError", "Guest", "boot_guest", "memory_barrier"]


class BootError(Exception):
    """The guest cannot boot or resume on this memory file (the message says why)."""


_fence = threading.Lock()


def memory_barrier() -> None:
    """A full barrier between a store and a later load of shared memory: Python has no
    fence, a lock round trip is a locked instruction on x86 (see core/virtio/ring.py)."""
    _fence.acquire()
    _fence.release()


def _user_address(buffer: memoryview) -> int:
    handle = ctypes.c_char.from_buffer(buffer)
    try:
        return ctypes.addressof(handle)
    finally:
        del handle


@dataclass
class Guest:
    """One VM's memory and the runtime state that lives in it."""

    shm: SharedMemory
    memory: RegionMemory
    user_addr: int
    layout: GuestLayout
    driver: VirtioScsiDriver
    journal: Journal
    fwtable: FirmwareTable | None
    fwtable_error: FirmwareTableError | None
    boot_count: int
    created: bool
    #: page 0 was written from ``fwtable`` (the memory was new or page 0 blank)
    fwtable_written: bool = False

    @property
    def size(self) -> int:
        return self.shm.size

    def read_fwtable(self) -> FirmwareTable | None:
        """Re-read page 0 (the hypervisor may write it while the VM is paused)."""
        try:
            self.fwtable = decode_fwtable(self.memory.read(FWTABLE_ADDR, FWTABLE_MAX_BYTES))
            self.fwtable_error = None
        except FirmwareTableError as exc:
            self.fwtable, self.fwtable_error = None, exc
        return self.fwtable

    def close(self) -> None:
        """Drop every view of the mapping, then unmap (the file stays)."""
        self.memory = RegionMemory([])
        with contextlib.suppress(BufferError):
            self.shm.close()


def boot_guest(path: Path, *, memory_size: int | None = None,
               params: LayoutParams | None = None, fwtable: bytes | None = None,
               restart: bool = False) -> Guest:
    """Map ``path`` and boot (cold) or resume (``restart``) the guest runtime on it."""
    created = False
    try:
        if restart:
            shm = SharedMemory.open(path)
        else:
            created = not path.exists()
            if memory_size is not None:
                size = memory_size
            elif not created:
                size = path.stat().st_size  # reuse the file as the hypervisor made it
            else:
                size = params.memory_size if params is not None else \
                    LayoutParams().memory_size
            shm = SharedMemory.create(path, size, exist_ok=True)
    except SharedMemoryError as exc:
        raise BootError(str(exc)) from None
    try:
        return _boot(shm, params, fwtable, restart=restart, created=created)
    except BaseException:
        with contextlib.suppress(BufferError):
            shm.close()
        raise


def _boot(shm: SharedMemory, params: LayoutParams | None, fwtable: bytes | None, *,
          restart: bool, created: bool) -> Guest:
    user_addr = _user_address(shm.buffer)
    memory = RegionMemory.from_table([(0, user_addr, shm.buffer)])
    fwtable_written = False
    if restart:
        try:
            layout = GuestLayout.decode_header(memory.read(HEADER_ADDR, 0x40), shm.size)
            driver = VirtioScsiDriver.attach(memory, layout, barrier=memory_barrier)
            journal = Journal.open(memory, layout.journal_addr, layout.params.journal_size)
        except (GuestLayoutError, DriverStateError, JournalError) as exc:
            raise BootError(f"cannot resume on {shm.path}: {exc}") from None
    else:
        wanted = params if params is not None else LayoutParams(memory_size=shm.size)
        if wanted.memory_size != shm.size:
            wanted = LayoutParams(**{**_fields(wanted), "memory_size": shm.size})
        try:
            layout = GuestLayout.plan(wanted)
        except GuestLayoutError as exc:
            raise BootError(str(exc)) from None
        if fwtable is not None:
            blank = not any(memory.read(FWTABLE_ADDR, FWTABLE_MAX_BYTES))
            if created or blank:
                if len(fwtable) > FWTABLE_MAX_BYTES:
                    raise BootError(f"firmware table of {len(fwtable)} bytes exceeds a page")
                memory.write(FWTABLE_ADDR, bytes(fwtable).ljust(FWTABLE_MAX_BYTES, b"\0"))
                fwtable_written = True
        memory.store_u32(HEADER_ADDR, 0)  # no header while the guest is being laid out
        driver = VirtioScsiDriver.create(memory, layout, barrier=memory_barrier)
        run_id = vm_id_number(f"{shm.path}:{user_addr}")
        journal = Journal.format(memory, layout.journal_addr, layout.params.journal_size,
                                 run_id)
        header = layout.encode_header(0)
        memory.write(HEADER_ADDR + 4, header[4:])
        memory.store_u32(HEADER_ADDR, int.from_bytes(header[:4], "little"))
    boot_count = (memory.load_u32(HEADER_ADDR + _BOOT_COUNT) + 1) & 0xFFFFFFFF
    memory.store_u32(HEADER_ADDR + _BOOT_COUNT, boot_count)
    guest = Guest(shm, memory, user_addr, layout, driver, journal, None, None, boot_count,
                  created, fwtable_written)
    guest.read_fwtable()
    if guest.fwtable_error is not None and guest.fwtable_error.reason is FwTableFault.EMPTY:
        guest.fwtable_error = None  # no table is not an error: the VM relies on options
    return guest


def _fields(params: LayoutParams) -> dict[str, int]:
    return {name: getattr(params, name) for name in LayoutParams.__dataclass_fields__}
