"""One command in execution: its data buffers, its result, and the single place where an
exception becomes a completion.

Rules of this module:

* :func:`run_guarded` is the only code that catches :class:`CheckCondition`, the
  :class:`~vfdirect.core.block.BlockError` family and unexpected exceptions and turns
  them into a :class:`ScsiResult`; nothing above it ever sees an exception;
* data moves between the caller's buffers and the block device without an intermediate
  copy: a READ hands slices of the data-in buffers to the device, a WRITE slices of the
  data-out buffers;
* buffers smaller than the CDB asks for are an *overrun*: nothing is transferred or
  executed, and the result says so (virtio-scsi answers VIRTIO_SCSI_S_OVERRUN: "the
  content of the CDB (such as the allocation length, parameter length or transfer size)
  requires more data than is available in the datain and dataout buffers"). Buffers
  larger than the transfer leave a *residual*.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vfdirect.core.block import AccessDenied, BlockError, BlockRangeError, MediumError
from vfdirect.core.scsi.opcodes import Status
from vfdirect.core.scsi.sense import (
    ACCESS_DENIED_NO_ACCESS_RIGHTS,
    INTERNAL_TARGET_FAILURE,
    INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT,
    LOGICAL_UNIT_COMMUNICATION_FAILURE,
    UNRECOVERED_READ_ERROR,
    WRITE_ERROR,
    CheckCondition,
    Sense,
    SenseData,
    decode_sense,
    encode_fixed_sense,
)


@dataclass(frozen=True, slots=True)
class ScsiResult:
    """The completion of one command.

    ``residual`` counts buffer bytes (data-in plus data-out) that were not transferred,
    as virtio-scsi reports it. ``overrun`` means the buffers were smaller than the CDB
    requires: the command was not executed (status CHECK CONDITION, sense INVALID FIELD
    IN COMMAND INFORMATION UNIT, for a transport that has no overrun response).
    """

    status: Status
    #: Fixed-format sense data (SPC-4 4.5.3) with CHECK CONDITION, else empty.
    sense: bytes = b""
    #: Bytes written into the data-in buffers, from their start.
    data_in_len: int = 0
    #: Bytes consumed from the data-out buffers, from their start.
    data_out_len: int = 0
    residual: int = 0
    overrun: bool = False

    @property
    def good(self) -> bool:
        return self.status == Status.GOOD

    def sense_data(self) -> SenseData | None:
        """The decoded sense, ``None`` without sense."""
        return decode_sense(self.sense) if self.sense else None


class Overrun(Exception):
    """Raised by :class:`Task` when the buffers cannot hold what the CDB requires."""

    def __init__(self, direction: str, required: int, available: int) -> None:
        super().__init__(f"{direction} needs {required} bytes, buffers hold {available}")
        self.required = required
        self.available = available


def _byte_view(buf: memoryview) -> memoryview:
    view = memoryview(buf)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _capacity(bufs: Sequence[memoryview]) -> int:
    """Total bytes of ``bufs``; never raises (a broken buffer counts as empty here and
    fails inside the guard, when the task is built)."""
    total = 0
    with contextlib.suppress(Exception):
        for buf in bufs:
            with contextlib.suppress(Exception):
                total += memoryview(buf).nbytes
    return total


def _slices(views: Sequence[memoryview], nbytes: int) -> list[memoryview]:
    out: list[memoryview] = []
    remaining = nbytes
    for view in views:
        if remaining <= 0:
            break
        n = min(len(view), remaining)
        if n:
            out.append(view[:n])
        remaining -= n
    return out


class Task:
    """The data side of one command: buffers in, byte counts out."""

    def __init__(self, data_out: Sequence[memoryview], data_in: Sequence[memoryview]) -> None:
        self._out = [_byte_view(b) for b in data_out]
        self._in = [_byte_view(b) for b in data_in]
        self.out_capacity = sum(len(v) for v in self._out)
        self.in_capacity = sum(len(v) for v in self._in)
        self.data_in_len = 0
        self.data_out_len = 0

    def require_in(self, nbytes: int) -> None:
        if nbytes > self.in_capacity:
            raise Overrun("data-in", nbytes, self.in_capacity)

    def require_out(self, nbytes: int) -> None:
        if nbytes > self.out_capacity:
            raise Overrun("data-out", nbytes, self.out_capacity)

    def send(self, data: bytes, allocation_length: int) -> None:
        """Return parameter data: at most ``allocation_length`` bytes of ``data``
        (SPC-4 4.2.5.6: truncation to the allocation length is not an error)."""
        self.require_in(allocation_length)
        n = min(len(data), allocation_length)
        pos = 0
        for view in self._in:
            if pos >= n:
                break
            k = min(len(view), n - pos)
            view[:k] = data[pos : pos + k]
            pos += k
        self.data_in_len = n

    def in_views(self, nbytes: int) -> list[memoryview]:
        """Slices of the data-in buffers covering exactly ``nbytes`` (for a READ)."""
        self.require_in(nbytes)
        return _slices(self._in, nbytes)

    def out_views(self, nbytes: int) -> list[memoryview]:
        """Slices of the data-out buffers covering exactly ``nbytes`` (for a WRITE)."""
        self.require_out(nbytes)
        return _slices(self._out, nbytes)


class ErrorReporter:
    """Counts exceptions that reveal a bug (anything the core did not expect) and hands
    them to an optional callback, e.g. a logger. A failing callback is ignored: it must
    not turn a completion into a crash."""

    def __init__(self, callback: Callable[[BaseException], None] | None = None) -> None:
        self.count = 0
        self._callback = callback

    def report(self, exc: BaseException) -> None:
        self.count += 1
        if self._callback is not None:
            with contextlib.suppress(Exception):
                self._callback(exc)


def block_error_sense(exc: BlockError) -> tuple[Sense, bool]:
    """The sense for a block device failure, and whether it reveals a bug."""
    if isinstance(exc, MediumError):
        # SBC-3: an unrecovered medium error is MEDIUM ERROR with the ASC of the failed
        # operation (WRITE ERROR also covers a failed cache flush).
        return (WRITE_ERROR if exc.write else UNRECOVERED_READ_ERROR), False
    if isinstance(exc, AccessDenied):
        # The fabric refused the IO (not zoned, not masked, not logged in): the
        # condition persists, so ILLEGAL REQUEST (no retry) with ACCESS DENIED - NO
        # ACCESS RIGHTS, as SPC-4 8.3.3 reports refused access.
        return ACCESS_DENIED_NO_ACCESS_RIGHTS, False
    if isinstance(exc, BlockRangeError):
        # Ranges are checked before the device is called; reaching here is a bug.
        return INTERNAL_TARGET_FAILURE, True
    return LOGICAL_UNIT_COMMUNICATION_FAILURE, False


_OVERRUN_SENSE = encode_fixed_sense(INVALID_FIELD_IN_COMMAND_INFORMATION_UNIT)
_INTERNAL_SENSE = encode_fixed_sense(INTERNAL_TARGET_FAILURE)


def run_guarded(
    body: Callable[[Task], None],
    data_out: Sequence[memoryview],
    data_in: Sequence[memoryview],
    errors: ErrorReporter,
) -> ScsiResult:
    """Run ``body`` on a :class:`Task` for these buffers and return its completion.

    The one place where exceptions become completions: :class:`CheckCondition` → its
    sense; :class:`Overrun` → the overrun result; :class:`BlockError` → MEDIUM ERROR,
    ACCESS DENIED, ...; any other :class:`Exception` → HARDWARE ERROR, INTERNAL TARGET
    FAILURE, reported to ``errors``. (``KeyboardInterrupt`` and other non-``Exception``
    signals of the process are not command failures and pass through.)
    """
    total = _capacity(data_out) + _capacity(data_in)
    try:
        task = Task(data_out, data_in)
        body(task)
    except CheckCondition as cc:
        return ScsiResult(Status.CHECK_CONDITION, cc.sense_bytes(), residual=total)
    except Overrun:
        return ScsiResult(Status.CHECK_CONDITION, _OVERRUN_SENSE, residual=total, overrun=True)
    except BlockError as exc:
        sense, is_bug = block_error_sense(exc)
        if is_bug:
            errors.report(exc)
        return ScsiResult(Status.CHECK_CONDITION, encode_fixed_sense(sense), residual=total)
    except Exception as exc:
        errors.report(exc)
        return ScsiResult(Status.CHECK_CONDITION, _INTERNAL_SENSE, residual=total)
    moved = task.data_in_len + task.data_out_len
    return ScsiResult(
        Status.GOOD,
        data_in_len=task.data_in_len,
        data_out_len=task.data_out_len,
        residual=max(0, total - moved),
    )
