"""A logical unit: emulation of one SBC-3 direct-access block device over a BlockDevice.

Rules of this module:

* :meth:`LogicalUnit.execute` never raises: every outcome is a
  :class:`~vfdirect.core.scsi.task.ScsiResult` (see :func:`~vfdirect.core.scsi.task.run_guarded`);
* ranges are checked here, before the device is called, so a device never sees an IO
  outside its capacity;
* READ data goes from the device straight into the caller's data-in buffers, WRITE data
  straight from the data-out buffers (slices, no copy);
* the medium is always ready: there is no START STOP UNIT, no removable medium, and no
  pending sense (sense is returned with the completion, "autosense"). REPORT LUNS is a
  target command (:mod:`vfdirect.core.scsi.target`); sent to a bare logical unit it is
  INVALID COMMAND OPERATION CODE.

SBC-3 choices, cited where implemented:

* range: LBA + TRANSFER LENGTH must not exceed the capacity (SBC-3 READ(10)/WRITE(10):
  "If the logical block address plus the transfer length exceeds the capacity of the
  medium ... LOGICAL BLOCK ADDRESS OUT OF RANGE"). With a transfer length of zero ("no
  logical blocks shall be read. This condition shall not be considered an error") the
  same sum is checked, so an LBA up to the capacity itself passes and anything beyond
  fails; LIO and QEMU apply the same rule. Python integers do not wrap, so a range that
  wraps 2^64 is out of range;
* a transfer length above the Block Limits MAXIMUM TRANSFER LENGTH is INVALID FIELD IN
  CDB pointing at the TRANSFER LENGTH field (SBC-3 Block Limits VPD page);
* READ with FUA: SBC-3 says a more recent cached version of a block is written to the
  medium before it is read, so the device is flushed first. WRITE with FUA reaches the
  device as ``write_blocks(..., fua=True)``. DPO, FUA_NV, SYNC_NV and GROUP NUMBER are
  accepted and have no effect;
* SYNCHRONIZE CACHE flushes the whole device (a superset of the range asked for) after
  the same range check; IMMED is accepted and the command simply completes when the
  flush has (SBC-3 allows returning status after completion).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from vfdirect.core.block import BlockDevice
from vfdirect.core.scsi.cdb import (
    Command,
    Inquiry,
    ModeSense6,
    ModeSense10,
    Read10,
    Read16,
    ReadCapacity10,
    ReadCapacity16,
    ReadCommand,
    RequestSense,
    SynchronizeCache10,
    SynchronizeCache16,
    TestUnitReady,
    Write10,
    Write16,
    WriteCommand,
    decode_cdb,
)
from vfdirect.core.scsi.identity import LuIdentity
from vfdirect.core.scsi.inquiry import LU_PERIPHERAL, lu_vpd_page, standard_inquiry_data
from vfdirect.core.scsi.modes import mode_sense_data
from vfdirect.core.scsi.sense import (
    INVALID_COMMAND_OPERATION_CODE,
    LBA_OUT_OF_RANGE,
    NO_SENSE,
    CheckCondition,
    encode_fixed_sense,
)
from vfdirect.core.scsi.task import ErrorReporter, ScsiResult, Task, run_guarded

#: Parameter data of REQUEST SENSE when nothing is pending: NO SENSE, fixed format
#: (SPC-4 6.39: "return parameter data containing sense data with the sense key set to
#: NO SENSE and the additional sense code set to NO ADDITIONAL SENSE INFORMATION").
NO_SENSE_DATA = encode_fixed_sense(NO_SENSE)

#: Largest logical block length the wire formats carry (MODE SENSE short descriptor:
#: 3 bytes).
MAX_BLOCK_SIZE = (1 << 24) - 1

_READ_CAPACITY_10_LEN = 8
_READ_CAPACITY_16_LEN = 32


def request_sense_reply(cmd: RequestSense, task: Task, sense_data: bytes) -> None:
    """Answer REQUEST SENSE with ``sense_data`` (fixed format).

    SPC-4 6.39 table 313: DESC=1 on a device server without descriptor-format sense
    data → no parameter data, CHECK CONDITION, ILLEGAL REQUEST, INVALID FIELD IN CDB.
    """
    if cmd.desc:
        raise CheckCondition.invalid_cdb_field(
            1, 0, reason="descriptor format sense data is not supported"
        )
    task.send(sense_data, cmd.allocation_length)


class LogicalUnit:
    """One emulated direct-access logical unit (peripheral device type 00h)."""

    def __init__(
        self,
        device: BlockDevice,
        identity: LuIdentity,
        *,
        on_internal_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        block_size = device.block_size
        if isinstance(block_size, bool) or not 0 < block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block size {block_size!r} is not 1..{MAX_BLOCK_SIZE}")
        if not isinstance(identity, LuIdentity):
            raise TypeError(f"identity must be an LuIdentity, not {identity!r}")
        self._device = device
        self._identity = identity
        self._errors = ErrorReporter(on_internal_error)
        # Identity is immutable, so INQUIRY data is built once.
        self._standard_inquiry = standard_inquiry_data(
            LU_PERIPHERAL, identity.vendor, identity.product, identity.revision
        )

    @property
    def device(self) -> BlockDevice:
        return self._device

    @property
    def identity(self) -> LuIdentity:
        return self._identity

    @property
    def errors(self) -> ErrorReporter:
        """Where this LU reports unexpected exceptions (shared with its target)."""
        return self._errors

    @property
    def internal_errors(self) -> int:
        """How many commands ended in HARDWARE ERROR because of an unexpected exception."""
        return self._errors.count

    def execute(
        self,
        cdb: bytes | bytearray | memoryview,
        data_out: Sequence[memoryview] = (),
        data_in: Sequence[memoryview] = (),
    ) -> ScsiResult:
        """Decode and execute one CDB; never raises."""

        def body(task: Task) -> None:
            self.execute_command(decode_cdb(cdb), task)

        return run_guarded(body, data_out, data_in, self._errors)

    def execute_command(self, cmd: Command, task: Task) -> None:
        """Execute a decoded command. Raises :class:`CheckCondition`, ``BlockError`` or
        :class:`~vfdirect.core.scsi.task.Overrun`; callers run it under
        :func:`~vfdirect.core.scsi.task.run_guarded`."""
        match cmd:
            case TestUnitReady():
                return  # always ready (SPC-4 6.47: GOOD when the LU can accept media commands)
            case Inquiry():
                self._inquiry(cmd, task)
            case RequestSense():
                request_sense_reply(cmd, task, NO_SENSE_DATA)
            case ModeSense6() | ModeSense10():
                data = mode_sense_data(
                    cmd, num_blocks=self._device.num_blocks, block_size=self._device.block_size
                )
                task.send(data, cmd.allocation_length)
            case ReadCapacity10():
                self._read_capacity10(task)
            case ReadCapacity16():
                self._read_capacity16(cmd, task)
            case Read10() | Read16():
                self._read(cmd, task)
            case Write10() | Write16():
                self._write(cmd, task)
            case SynchronizeCache10() | SynchronizeCache16():
                self._check_range(cmd.lba, cmd.num_blocks)
                self._device.flush()
            case _:
                raise CheckCondition(
                    INVALID_COMMAND_OPERATION_CODE,
                    reason=f"{type(cmd).__name__} is not a logical unit command",
                )

    # -- commands -----------------------------------------------------------------------

    def _inquiry(self, cmd: Inquiry, task: Task) -> None:
        if not cmd.evpd:
            task.send(self._standard_inquiry, cmd.allocation_length)
            return
        page = lu_vpd_page(self._identity, cmd.page_code)
        if page is None:
            # SPC-4 6.6.1: a VPD page not implemented is an invalid field (PAGE CODE).
            raise CheckCondition.invalid_cdb_field(
                2, reason=f"VPD page {cmd.page_code:#04x} is not supported"
            )
        task.send(page, cmd.allocation_length)

    def _last_lba(self) -> int:
        return max(self._device.num_blocks - 1, 0)

    def _read_capacity10(self, task: Task) -> None:
        # SBC-3 READ CAPACITY(10): a last LBA that does not fit in 4 bytes is reported as
        # FFFFFFFFh, telling the initiator to use READ CAPACITY(16). With PMI set the
        # answer is the same: there is no point after which transfers slow down.
        returned = min(self._last_lba(), 0xFFFF_FFFF)
        data = returned.to_bytes(4, "big") + self._device.block_size.to_bytes(4, "big")
        task.send(data, _READ_CAPACITY_10_LEN)

    def _read_capacity16(self, cmd: ReadCapacity16, task: Task) -> None:
        data = bytearray(_READ_CAPACITY_16_LEN)
        data[0:8] = self._last_lba().to_bytes(8, "big")  # RETURNED LOGICAL BLOCK ADDRESS
        data[8:12] = self._device.block_size.to_bytes(4, "big")  # LOGICAL BLOCK LENGTH
        # byte 12: P_TYPE 0, PROT_EN 0 (no protection information)
        # byte 13: P_I_EXPONENT 0, LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT
        data[13] = self._identity.physical_block_exponent & 0x0F
        # bytes 14-15: LBPME 0, LBPRZ 0 (no thin provisioning), LOWEST ALIGNED LBA 0
        task.send(bytes(data), cmd.allocation_length)

    def _check_range(self, lba: int, count: int) -> None:
        capacity = self._device.num_blocks
        if lba + count > capacity:
            raise CheckCondition(
                LBA_OUT_OF_RANGE,
                reason=f"LBA {lba} + {count} blocks exceeds the capacity of {capacity} blocks",
            )

    def _check_transfer(self, cmd: ReadCommand | WriteCommand) -> int:
        limit = self._identity.limits.max_transfer_blocks
        if limit and cmd.transfer_length > limit:
            # SBC-3 Block Limits VPD page: the TRANSFER LENGTH is constrained by MAXIMUM
            # TRANSFER LENGTH; exceeding it is an invalid field of the CDB.
            field_byte = 7 if cmd.LENGTH == 10 else 10
            raise CheckCondition.invalid_cdb_field(
                field_byte,
                reason=f"transfer length {cmd.transfer_length} exceeds the maximum {limit}",
            )
        self._check_range(cmd.lba, cmd.transfer_length)
        return cmd.transfer_length * self._device.block_size

    def _read(self, cmd: ReadCommand, task: Task) -> None:
        nbytes = self._check_transfer(cmd)
        views = task.in_views(nbytes)
        if nbytes == 0:
            return  # SBC-3: no blocks read, not an error
        if cmd.fua:
            self._device.flush()
        self._device.read_blocks(cmd.lba, views)
        task.data_in_len = nbytes

    def _write(self, cmd: WriteCommand, task: Task) -> None:
        nbytes = self._check_transfer(cmd)
        views = task.out_views(nbytes)
        if nbytes == 0:
            return  # SBC-3: no blocks written, not an error
        self._device.write_blocks(cmd.lba, views, fua=cmd.fua)
        task.data_out_len = nbytes
