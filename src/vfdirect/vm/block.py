"""The guest's block layer (shell): SCSI disk discovery and asynchronous block IO over the
VF's virtio-scsi host.

Discovery (claim A8: the guest finds the virtual disk addresses with REPORT LUNS and
INQUIRY): for each target named by the firmware table (or 0..max_target when the table
names none), REPORT LUNS (SPC-4 6.33) on LUN 0; for each LUN, standard INQUIRY (skip
peripheral qualifier 011b, "no logical unit here", and anything not a direct-access
device), READ CAPACITY(16) (SBC-3), VPD pages 80h (serial) and 83h (NAA name). Disks are
named ``sda``, ``sdb``... in (target, LUN) order, and keep their name across rescans.

IO: :class:`Disk` ``submit_read`` / ``submit_write`` (optional FUA) / ``submit_flush``
(SYNCHRONIZE CACHE(16)) return an :class:`IoRequest` at once; up to ``queue_depth``
requests per disk are outstanding, the rest wait in the disk's queue (FIFO).
:meth:`BlockLayer.poll` runs completion callbacks. ``read``/``write``/``flush`` are the
synchronous forms. One request moves at most :attr:`Disk.max_blocks` blocks (one data
slot of the guest); the synchronous forms split larger transfers.

Errors (an :class:`IoError` in ``request.error``, raised by the synchronous forms):
CHECK CONDITION is :class:`CheckConditionError` carrying the decoded sense; a virtio-scsi
response other than OK is :class:`TransportError`; a command that timed out and was
aborted is :class:`IoTimeout`; a short transfer is :class:`IoError`. UNIT ATTENTION,
BUSY, TASK SET FULL and the transport's BUSY/RESET responses are retried (3 times), as
Linux's SCSI midlayer does.

Events: TRANSPORT_RESET RESCAN adds the LUN, REMOVED removes it (its queued requests
fail), EVENTS_MISSED rescans everything, PARAM_CHANGE "capacity data has changed"
re-reads the capacity; each change is appended to :attr:`BlockLayer.changes`.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vfdirect.core.guest.fwtable import FirmwareTable
from vfdirect.core.guest.scsidata import (
    DIRECT_ACCESS,
    QUALIFIER_NOT_SUPPORTED,
    ScsiDataError,
    parse_inquiry,
    parse_read_capacity16,
    parse_vpd_devid_naa,
    parse_vpd_serial,
)
from vfdirect.core.guest.virtscsi import Completion, ScsiEvent
from vfdirect.core.scsi.cdb import (
    Inquiry,
    Read16,
    ReadCapacity16,
    ReportLuns,
    SynchronizeCache16,
    Write16,
    encode_cdb,
)
from vfdirect.core.scsi.luns import LunError, decode_lun, parse_report_luns
from vfdirect.core.scsi.opcodes import Status
from vfdirect.core.scsi.sense import SenseData, SenseKey
from vfdirect.core.virtio.errors import QueueFullError
from vfdirect.core.virtio.scsi import (
    EventType,
    TransportResetReason,
    VirtioScsiResponse,
)
from vfdirect.vm.log import log_event
from vfdirect.vm.scsi import ScsiHost

__all__ = [
    "BlockLayer",
    "CheckConditionError",
    "Disk",
    "IoError",
    "IoRequest",
    "IoTimeout",
    "TransportError",
    "disk_name",
]

MAX_RETRIES = 3
_RETRY_STATUS = frozenset({Status.BUSY, Status.TASK_SET_FULL})
_RETRY_RESPONSE = frozenset({VirtioScsiResponse.BUSY, VirtioScsiResponse.RESET})
#: SPC-4: CAPACITY DATA HAS CHANGED (PARAM_CHANGE reason = asc | ascq << 8).
_CAPACITY_CHANGED = 0x2A | 0x09 << 8


class IoError(Exception):
    """A block IO failed."""

    def __init__(self, message: str, *, disk: str = "", op: str = "", lba: int = 0) -> None:
        super().__init__(f"{disk} {op} lba {lba}: {message}" if disk else message)
        self.disk = disk
        self.op = op
        self.lba = lba


class CheckConditionError(IoError):
    """The device server answered CHECK CONDITION; ``sense`` is the decoded sense."""

    def __init__(self, message: str, *, sense: SenseData | None, raw_sense: bytes,
                 **where: Any) -> None:
        super().__init__(message, **where)
        self.sense = sense
        self.raw_sense = raw_sense


class TransportError(IoError):
    """The virtio-scsi response was not OK (BAD_TARGET, ABORTED, FAILURE...)."""

    def __init__(self, message: str, *, response: int, **where: Any) -> None:
        super().__init__(message, **where)
        self.response = response


class IoTimeout(IoError):
    """The command timed out; ABORT TASK was sent."""


def disk_name(index: int) -> str:
    """``sda``..``sdz``, ``sdaa``... (Linux's sd naming)."""
    letters = ""
    n = index + 1
    while n:
        n, rem = divmod(n - 1, 26)
        letters = chr(ord("a") + rem) + letters
    return "sd" + letters


@dataclass(eq=False)
class IoRequest:
    """One block IO: what was asked, and, once ``done``, its outcome."""

    disk: Disk
    op: str
    lba: int
    blocks: int
    payload: bytes | None = None
    fua: bool = False
    callback: Callable[[IoRequest], None] | None = None
    cookie: int = 0
    done: bool = False
    error: IoError | None = None
    data: bytes | None = None
    retries: int = 0
    submitted: float = 0.0
    completed: float = 0.0
    tags: list[int] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.completed - self.submitted

    def result(self) -> bytes | None:
        """The data read (``None`` for writes and flushes), or raise the IO's error."""
        if not self.done:
            raise IoError("request still in progress")
        if self.error is not None:
            raise self.error
        return self.data


@dataclass(eq=False)
class Disk:
    """A SCSI disk the scan found."""

    layer: BlockLayer
    name: str
    target: int
    lun: int
    block_size: int
    num_blocks: int
    serial: str = ""
    wwn: str | None = None
    vendor: str = ""
    product: str = ""
    queue_depth: int = 32
    in_flight: int = 0
    pending: deque[IoRequest] = field(default_factory=deque)
    present: bool = True

    @property
    def address(self) -> tuple[int, int]:
        return (self.target, self.lun)

    @property
    def capacity_bytes(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def max_blocks(self) -> int:
        return max(1, self.layer.max_transfer // self.block_size)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "target": self.target, "lun": self.lun,
                "block_size": self.block_size, "num_blocks": self.num_blocks,
                "serial": self.serial, "wwn": self.wwn, "vendor": self.vendor,
                "product": self.product}

    # -- asynchronous IO ------------------------------------------------------------------

    def _check(self, lba: int, blocks: int) -> None:
        if not self.present:
            raise IoError("disk was removed", disk=self.name)
        if blocks < 1 or blocks > self.max_blocks:
            raise ValueError(f"{blocks} blocks per request; 1..{self.max_blocks}")
        if lba < 0 or lba + blocks > self.num_blocks:
            raise ValueError(f"blocks {lba}..{lba + blocks - 1} are beyond {self.name} "
                             f"({self.num_blocks} blocks)")

    def submit_read(self, lba: int, blocks: int, *,
                    callback: Callable[[IoRequest], None] | None = None,
                    cookie: int = 0) -> IoRequest:
        self._check(lba, blocks)
        return self.layer._enqueue(IoRequest(self, "read", lba, blocks, callback=callback,
                                             cookie=cookie))

    def submit_write(self, lba: int, data: bytes, *, fua: bool = False,
                     callback: Callable[[IoRequest], None] | None = None,
                     cookie: int = 0) -> IoRequest:
        if len(data) % self.block_size or not data:
            raise ValueError(f"{len(data)} bytes is not a whole number of "
                             f"{self.block_size}-byte blocks")
        blocks = len(data) // self.block_size
        self._check(lba, blocks)
        return self.layer._enqueue(IoRequest(self, "write", lba, blocks, bytes(data), fua,
                                             callback, cookie))

    def submit_flush(self, *, callback: Callable[[IoRequest], None] | None = None,
                     cookie: int = 0) -> IoRequest:
        if not self.present:
            raise IoError("disk was removed", disk=self.name)
        return self.layer._enqueue(IoRequest(self, "flush", 0, 0, callback=callback,
                                             cookie=cookie))

    # -- synchronous forms ----------------------------------------------------------------

    def read(self, lba: int, blocks: int, *, timeout: float = 60.0) -> bytes:
        requests = [self.submit_read(start, count)
                    for start, count in _split(lba, blocks, self.max_blocks)]
        self.layer.wait(requests, timeout)
        return b"".join(r.result() or b"" for r in requests)

    def write(self, lba: int, data: bytes, *, fua: bool = False, timeout: float = 60.0) -> None:
        if len(data) % self.block_size:
            raise ValueError(f"{len(data)} bytes is not a whole number of blocks")
        requests = []
        for start, count in _split(lba, len(data) // self.block_size, self.max_blocks):
            offset = (start - lba) * self.block_size
            requests.append(self.submit_write(
                start, data[offset:offset + count * self.block_size], fua=fua))
        self.layer.wait(requests, timeout)
        for r in requests:
            r.result()

    def flush(self, *, timeout: float = 60.0) -> None:
        request = self.submit_flush()
        self.layer.wait([request], timeout)
        request.result()


def _split(lba: int, blocks: int, per: int) -> list[tuple[int, int]]:
    return [(lba + i, min(per, blocks - i)) for i in range(0, blocks, per)] or [(lba, 0)]


class BlockLayer:
    """Disks over one SCSI host."""

    def __init__(self, host: ScsiHost, fwtable: FirmwareTable | None = None, *,
                 queue_depth: int | None = None, logger: logging.Logger | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.host = host
        self.fwtable = fwtable
        self.disks: dict[str, Disk] = {}
        self.changes: list[dict[str, Any]] = []
        self.on_change: Callable[[dict[str, Any]], None] = lambda change: None
        self._names: dict[tuple[int, int], str] = {}
        self._log = logger or logging.getLogger("vfdirect.vm")
        self._clock = clock
        self._rescan: set[tuple[int, int]] = set()
        self._rescan_all = False
        self._capacity_check: set[tuple[int, int]] = set()
        config = host.frontend.config
        per_lun = config.cmd_per_lun if config is not None else 32
        self.queue_depth = queue_depth or max(1, min(per_lun, host.driver.layout.params.tags))
        self.max_target = config.max_target if config is not None else 255
        host.on_event = self._on_events

    @property
    def max_transfer(self) -> int:
        return self.host.driver.max_transfer

    def disk_at(self, target: int, lun: int) -> Disk | None:
        name = self._names.get((target, lun))
        disk = self.disks.get(name) if name else None
        return disk if disk is not None and disk.present else None

    # -- synchronous commands (discovery) ------------------------------------------------

    def command(self, target: int, lun: int, cdb: bytes, *, data_out: bytes = b"",
                data_in: int = 0, timeout: float = 30.0) -> Completion:
        """Run one command to completion (retrying UNIT ATTENTION and BUSY)."""
        for attempt in range(MAX_RETRIES + 1):
            box: list[Completion] = []
            self._submit_raw(target, lun, cdb, box.append, data_out=data_out,
                             data_in=data_in, timeout=timeout)
            self._wait_for(box.__len__, timeout)
            completion = box[0]
            if attempt < MAX_RETRIES and _retryable(completion):
                continue
            return completion
        raise AssertionError("unreachable")

    def _submit_raw(self, target: int, lun: int, cdb: bytes, callback: Callable[[Completion],
                    None], *, data_out: bytes, data_in: int, timeout: float) -> int:
        deadline = self._clock() + timeout
        while True:
            try:
                return self.host.submit(target, lun, cdb, callback, data_out=data_out,
                                        data_in=data_in)
            except QueueFullError:
                if self._clock() >= deadline:
                    raise IoError("the guest's request queues stayed full") from None
                self.host.poll(min(0.01, max(0.0, deadline - self._clock())))

    def _wait_for(self, condition: Callable[[], object], timeout: float) -> None:
        deadline = self._clock() + timeout
        while not condition():
            remaining = deadline - self._clock()
            if remaining <= 0:
                raise IoError(f"no completion within {timeout} s")
            self.poll(remaining)

    # -- discovery ------------------------------------------------------------------------

    def scan(self, targets: Iterable[int] | None = None, *, timeout: float = 30.0) -> list[Disk]:
        """Discover LUNs on ``targets`` (default: the firmware table's targets, else
        0..max_target); returns the disks present, in name order."""
        if targets is None:
            if self.fwtable is not None and self.fwtable.disks:
                targets = self.fwtable.targets
            else:
                targets = range(self.max_target + 1)
        seen: set[tuple[int, int]] = set()
        scanned: set[int] = set()
        for target in targets:
            scanned.add(target)
            for lun in self._report_luns(target, timeout):
                if self._probe(target, lun, timeout) is not None:
                    seen.add((target, lun))
        for disk in list(self.disks.values()):
            if disk.present and disk.target in scanned and disk.address not in seen:
                self._remove(disk, "not reported by REPORT LUNS")
        return self.present_disks()

    def present_disks(self) -> list[Disk]:
        return sorted((d for d in self.disks.values() if d.present),
                      key=lambda d: (len(d.name), d.name))

    def _report_luns(self, target: int, timeout: float) -> list[int]:
        length = 8 + 8 * 256
        c = self.command(target, 0, encode_cdb(ReportLuns(allocation_length=length)),
                         data_in=length, timeout=timeout)
        if c.response == VirtioScsiResponse.BAD_TARGET:
            return []
        if not c.good or c.data is None:
            log_event(self._log, "report_luns_failed", level=logging.WARNING,
                      target=target, response=c.response, status=c.status)
            return []
        luns = []
        try:
            entries = parse_report_luns(c.data)
        except LunError:
            return []
        for raw in entries:
            try:
                luns.append(int(decode_lun(raw)))
            except LunError:
                log_event(self._log, "report_luns_unsupported", level=logging.WARNING,
                          target=target, lun=raw.hex())
        return sorted(set(luns))

    def _probe(self, target: int, lun: int, timeout: float) -> Disk | None:
        c = self.command(target, lun, encode_cdb(Inquiry(allocation_length=96)), data_in=96,
                         timeout=timeout)
        if not c.good or not c.data:
            return None
        try:
            info = parse_inquiry(c.data)
        except ScsiDataError:
            return None
        if info.qualifier == QUALIFIER_NOT_SUPPORTED or not info.present or \
                info.device_type != DIRECT_ACCESS:
            return None
        c = self.command(target, lun, encode_cdb(ReadCapacity16(allocation_length=32)),
                         data_in=32, timeout=timeout)
        if not c.good or c.data is None:
            return None
        try:
            capacity = parse_read_capacity16(c.data)
        except ScsiDataError:
            return None
        serial = ""
        c = self.command(target, lun, encode_cdb(Inquiry(evpd=True, page_code=0x80,
                                                         allocation_length=252)),
                         data_in=252, timeout=timeout)
        if c.good and c.data:
            try:
                serial = parse_vpd_serial(c.data)
            except ScsiDataError:
                serial = ""
        wwn = None
        c = self.command(target, lun, encode_cdb(Inquiry(evpd=True, page_code=0x83,
                                                         allocation_length=252)),
                         data_in=252, timeout=timeout)
        if c.good and c.data:
            try:
                wwn = parse_vpd_devid_naa(c.data)
            except ScsiDataError:
                wwn = None
        return self._add(target, lun, capacity.block_size, capacity.num_blocks,
                         serial=serial, wwn=wwn, vendor=info.vendor, product=info.product)

    def _add(self, target: int, lun: int, block_size: int, num_blocks: int, *, serial: str,
             wwn: str | None, vendor: str, product: str) -> Disk:
        name = self._names.get((target, lun))
        if name is None:
            used = set(self._names.values())
            name = next(disk_name(i) for i in itertools.count() if disk_name(i) not in used)
            self._names[(target, lun)] = name
        disk = self.disks.get(name)
        if disk is not None and disk.present and (disk.block_size, disk.num_blocks) == (
                block_size, num_blocks):
            disk.serial, disk.wwn, disk.vendor, disk.product = serial, wwn, vendor, product
            return disk
        new = disk is None or not disk.present
        if disk is None:
            disk = Disk(self, name, target, lun, block_size, num_blocks, serial, wwn, vendor,
                        product, queue_depth=self.queue_depth)
            self.disks[name] = disk
        else:
            disk.block_size, disk.num_blocks = block_size, num_blocks
            disk.serial, disk.wwn, disk.vendor, disk.product = serial, wwn, vendor, product
            disk.present = True
        self._change({"event": "added" if new else "resized", **disk.describe()})
        return disk

    def _remove(self, disk: Disk, why: str) -> None:
        disk.present = False
        while disk.pending:
            request = disk.pending.popleft()
            self._finish(request, IoError("disk was removed", disk=disk.name, op=request.op,
                                          lba=request.lba))
        self._change({"event": "removed", "name": disk.name, "target": disk.target,
                      "lun": disk.lun, "why": why})

    def _change(self, change: dict[str, Any]) -> None:
        self.changes.append(change)
        fields = {k: v for k, v in change.items() if k != "event"}
        log_event(self._log, f"disk_{change['event']}", **fields)
        self.on_change(change)

    # -- events ---------------------------------------------------------------------------

    def _on_events(self, events: list[ScsiEvent]) -> None:
        # Runs inside the host's poll: only note what to do; :meth:`poll` does it.
        for event in events:
            if event.missed:
                self._rescan_all = True
            if event.target is None or event.lun is None:
                continue
            where = (event.target, event.lun)
            if event.kind == EventType.TRANSPORT_RESET:
                if event.reason == TransportResetReason.REMOVED:
                    disk = self.disk_at(*where)
                    if disk is not None:
                        self._remove(disk, "TRANSPORT_RESET REMOVED event")
                elif event.reason == TransportResetReason.RESCAN:
                    self._rescan.add(where)
                else:
                    self._rescan_all = True
            elif event.kind == EventType.PARAM_CHANGE and event.reason == _CAPACITY_CHANGED:
                self._capacity_check.add(where)

    def _handle_rescans(self) -> None:
        if self._rescan_all:
            self._rescan_all = False
            self._rescan.clear()
            self.scan()
        while self._rescan:
            target, lun = self._rescan.pop()
            if lun == 0 and self.disk_at(target, lun) is None:
                self.scan([target])  # a new target: learn all its LUNs
            else:
                self._probe(target, lun, 30.0)
        while self._capacity_check:
            self._probe(*self._capacity_check.pop(), 30.0)

    # -- asynchronous IO engine -----------------------------------------------------------

    def _enqueue(self, request: IoRequest) -> IoRequest:
        request.submitted = self._clock()
        request.disk.pending.append(request)
        self._dispatch()
        return request

    def _dispatch(self) -> None:
        sent = False
        for disk in self.disks.values():
            while disk.pending and disk.in_flight < disk.queue_depth:
                if self.host.free_tags == 0:
                    break
                request = disk.pending[0]
                try:
                    self._send(request)
                except QueueFullError:
                    break
                disk.pending.popleft()
                disk.in_flight += 1
                sent = True
        if sent:
            self.host.flush_kicks()

    def _send(self, request: IoRequest) -> None:
        disk = request.disk
        if request.op == "read":
            cdb = encode_cdb(Read16(lba=request.lba, transfer_length=request.blocks))
            kwargs: dict[str, Any] = {"data_in": request.blocks * disk.block_size}
        elif request.op == "write":
            cdb = encode_cdb(Write16(lba=request.lba, transfer_length=request.blocks,
                                     fua=request.fua))
            kwargs = {"data_out": request.payload}
        else:
            cdb = encode_cdb(SynchronizeCache16())
            kwargs = {}

        def done(completion: Completion) -> None:
            self._completed(request, completion)

        tag = self.host.submit(disk.target, disk.lun, cdb, done, cookie=request.cookie,
                               kick=False, **kwargs)
        request.tags.append(tag)

    def _completed(self, request: IoRequest, c: Completion) -> None:
        disk = request.disk
        disk.in_flight -= 1
        where: dict[str, Any] = {"disk": disk.name, "op": request.op, "lba": request.lba}
        if request.retries < MAX_RETRIES and _retryable(c) and disk.present:
            request.retries += 1
            disk.pending.appendleft(request)
            return
        error: IoError | None = None
        if c.response != VirtioScsiResponse.OK:
            name = _response_name(c.response)
            if c.timed_out:
                error = IoTimeout(f"timed out, aborted (response {name})", **where)
            else:
                error = TransportError(f"virtio-scsi response {name}", response=c.response,
                                       **where)
        elif c.status == Status.CHECK_CONDITION:
            sense = c.sense_data()
            text = str(sense.sense) if sense is not None else "no sense data"
            error = CheckConditionError(f"CHECK CONDITION {text}", sense=sense,
                                        raw_sense=c.sense, **where)
        elif c.status != Status.GOOD:
            error = IoError(f"SCSI status {c.status:#04x}", **where)
        elif c.resid and request.op != "flush":
            error = IoError(f"short transfer: residual {c.resid} bytes", **where)
        if error is None and request.op == "read":
            request.data = c.data
        self._finish(request, error)

    def _finish(self, request: IoRequest, error: IoError | None) -> None:
        request.error = error
        request.done = True
        request.completed = self._clock()
        if request.callback is not None:
            request.callback(request)

    def poll(self, timeout: float = 0.0) -> int:
        """Reap completions (waiting up to ``timeout`` for one), run callbacks, send
        queued requests, handle rescans. Returns completions handled."""
        done = self.host.poll(timeout)
        self._dispatch()
        if self._rescan or self._rescan_all or self._capacity_check:
            self._handle_rescans()
        return done

    def wait(self, requests: Sequence[IoRequest], timeout: float) -> None:
        """Poll until every request is done; :class:`IoError` after ``timeout``."""
        self._wait_for(lambda: all(r.done for r in requests), timeout)

    @property
    def busy(self) -> bool:
        return any(d.in_flight or d.pending for d in self.disks.values())


def _retryable(c: Completion) -> bool:
    if c.response in _RETRY_RESPONSE:
        return True
    if c.response != VirtioScsiResponse.OK:
        return False
    if c.status in _RETRY_STATUS:
        return True
    if c.status == Status.CHECK_CONDITION:
        sense = c.sense_data()
        return sense is not None and sense.sense.key == SenseKey.UNIT_ATTENTION
    return False


def _response_name(response: int) -> str:
    try:
        return VirtioScsiResponse(response).name
    except ValueError:
        return str(response)
