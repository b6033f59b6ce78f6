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
  is the address of our own mapping (what QEMU sends too);
* dirty log (``dirty_log``, live migration): a file of ``PageMarks.size_for(memory
  size)`` bytes, one byte per 4 KiB page of guest memory, mapped shared (created zeroed
  if missing, used as found otherwise: the hypervisor clears it). Every store of the
  guest runtime into guest memory marks its pages before and after
  (:mod:`vfdirect.core.guest.marking`): the runtime writes through
  :attr:`Guest.marked`, never through :attr:`Guest.memory` (the raw memory, for reads
  and for the device's memory table).
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
    STALL_CLOCK_OFFSET,
    GuestLayout,
    GuestLayoutError,
    LayoutParams,
)
from vfdirect.core.guest.marking import MarkedMemory, byte_map_marker
from vfdirect.core.guest.virtscsi import VirtioScsiDriver
from vfdirect.core.migration.dirty import PageMarks
from vfdirect.core.virtio.errors import DriverStateError
from vfdirect.core.virtio.memory import GuestMemory, RegionMemory
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
    #: what the runtime writes through: ``memory``, marking the dirty log if there is one
    marked: GuestMemory | None = None
    #: the dirty log (``--dirty-log``) and its mapping
    marks: PageMarks | None = None
    dirty_shm: SharedMemory | None = None
    #: the marker's view of the dirty map (released at close)
    dirty_view: memoryview | None = None

    @property
    def size(self) -> int:
        return self.shm.size

    @property
    def writer(self) -> GuestMemory:
        """The memory the guest runtime stores through (marks the dirty log)."""
        return self.marked if self.marked is not None else self.memory

    def last_completion_ns(self) -> int:
        """The stall clock: wall-clock ns of the last IO completion any incarnation of
        this VM saw (0: none yet). Kept in the guest header page (see layout)."""
        return self.memory.load_u64(HEADER_ADDR + STALL_CLOCK_OFFSET)

    def set_last_completion_ns(self, value: int) -> None:
        self.writer.store_u64(HEADER_ADDR + STALL_CLOCK_OFFSET, value)

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
        self.marked = None
        with contextlib.suppress(BufferError):
            self.shm.close()
        if self.marks is not None:
            self.marks.release()
            self.marks = None
        if self.dirty_view is not None:
            self.dirty_view.release()
            self.dirty_view = None
        if self.dirty_shm is not None:
            with contextlib.suppress(BufferError):
                self.dirty_shm.close()
            self.dirty_shm = None


def boot_guest(path: Path, *, memory_size: int | None = None,
               params: LayoutParams | None = None, fwtable: bytes | None = None,
               restart: bool = False, dirty_log: Path | None = None) -> Guest:
    """Map ``path`` and boot (cold) or resume (``restart``) the guest runtime on it;
    with ``dirty_log``, mark every page the runtime writes there (see the module)."""
    created = False
    try:
        if restart:
            shm = SharedMemory.open(path)
            if memory_size is not None and memory_size != shm.size:
                size = shm.size
                with contextlib.suppress(BufferError):
                    shm.close()
                raise BootError(f"cannot resume on {path}: it has {size} bytes, "
                                f"--memory-size says {memory_size}")
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
    marks: PageMarks | None = None
    dirty_shm: SharedMemory | None = None
    dirty_view: memoryview | None = None
    try:
        if dirty_log is not None:
            try:
                dirty_shm = SharedMemory.create(dirty_log, PageMarks.size_for(shm.size),
                                                exist_ok=True)
            except SharedMemoryError as exc:
                raise BootError(f"dirty log: {exc}") from None
            marks = PageMarks(dirty_shm.buffer, shm.size)
            dirty_view = dirty_shm.buffer[:marks.pages]
        return _boot(shm, params, fwtable, restart=restart, created=created, marks=marks,
                     dirty_shm=dirty_shm, dirty_view=dirty_view)
    except BaseException:
        if marks is not None:
            marks.release()
        if dirty_view is not None:
            dirty_view.release()
        for mapping in (dirty_shm, shm):
            if mapping is not None:
                with contextlib.suppress(BufferError):
                    mapping.close()
        raise


def _boot(shm: SharedMemory, params: LayoutParams | None, fwtable: bytes | None, *,
          restart: bool, created: bool, marks: PageMarks | None,
          dirty_shm: SharedMemory | None, dirty_view: memoryview | None) -> Guest:
    user_addr = _user_address(shm.buffer)
    raw = RegionMemory.from_table([(0, user_addr, shm.buffer)])
    # Every store below goes through ``memory``: marked in the dirty log if there is one.
    memory: GuestMemory = raw
    if dirty_view is not None:
        memory = MarkedMemory(raw, byte_map_marker(dirty_view, shm.size))
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
        memory.store_u64(HEADER_ADDR + STALL_CLOCK_OFFSET, 0)  # no completion yet
        driver = VirtioScsiDriver.create(memory, layout, barrier=memory_barrier)
        run_id = vm_id_number(f"{shm.path}:{user_addr}")
        journal = Journal.format(memory, layout.journal_addr, layout.params.journal_size,
                                 run_id)
        header = layout.encode_header(0)
        memory.write(HEADER_ADDR + 4, header[4:])
        memory.store_u32(HEADER_ADDR, int.from_bytes(header[:4], "little"))
    boot_count = (memory.load_u32(HEADER_ADDR + _BOOT_COUNT) + 1) & 0xFFFFFFFF
    memory.store_u32(HEADER_ADDR + _BOOT_COUNT, boot_count)
    guest = Guest(shm, raw, user_addr, layout, driver, journal, None, None, boot_count,
                  created, fwtable_written, marked=memory if marks is not None else None,
                  marks=marks, dirty_shm=dirty_shm, dirty_view=dirty_view)
    guest.read_fwtable()
    if guest.fwtable_error is not None and guest.fwtable_error.reason is FwTableFault.EMPTY:
        guest.fwtable_error = None  # no table is not an error: the VM relies on options
    return guest


def _fields(params: LayoutParams) -> dict[str, int]:
    return {name: getattr(params, name) for name in LayoutParams.__dataclass_fields__}
