"""Block-device doubles and small helpers shared by the SCSI core tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vfdirect.core.block import BlockDevice, BlockRangeError
from vfdirect.core.scsi.identity import BlockLimits, LuIdentity
from vfdirect.core.scsi.task import ScsiResult
from vfdirect.core.wwn import Wwn

#: The WWN used by most tests: NAA 5, OUI 00-14-05, vendor-specific id 0x123456789.
TEST_WWN = Wwn(bytes.fromhex("5001405123456789"))


class RamDisk:
    """A bytearray-backed :class:`BlockDevice` that checks the protocol's contract."""

    def __init__(self, block_size: int = 512, num_blocks: int = 64) -> None:
        self._block_size = block_size
        self._num_blocks = num_blocks
        self.data = bytearray(block_size * num_blocks)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def _span(self, lba: int, bufs: Sequence[memoryview]) -> tuple[int, int]:
        nbytes = sum(memoryview(b).nbytes for b in bufs)
        if nbytes % self._block_size:
            raise AssertionError(f"IO of {nbytes} bytes is not a whole number of blocks")
        if lba < 0 or lba * self._block_size + nbytes > len(self.data):
            raise BlockRangeError(f"IO at {lba} of {nbytes} bytes is outside the device")
        return lba * self._block_size, nbytes

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        pos, _ = self._span(lba, bufs)
        for b in bufs:
            n = len(b)
            b[:] = self.data[pos : pos + n]
            pos += n

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        pos, _ = self._span(lba, bufs)
        for b in bufs:
            n = len(b)
            self.data[pos : pos + n] = b
            pos += n

    def flush(self) -> None:
        pass


class HugeDevice:
    """Geometry without storage: any capacity up to 2^64 blocks; reads return zeros."""

    def __init__(self, block_size: int, num_blocks: int) -> None:
        self._block_size = block_size
        self._num_blocks = num_blocks
        self.calls: list[tuple[Any, ...]] = []

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self.calls.append(("read", lba))
        for b in bufs:
            b[:] = bytes(len(b))

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self.calls.append(("write", lba))

    def flush(self) -> None:
        self.calls.append(("flush",))


@dataclass
class Call:
    op: str
    lba: int = 0
    nbytes: int = 0
    fua: bool = False
    exporters: list[object] = field(default_factory=list)


class RecordingDevice:
    """Wraps a device and records every call, including which objects the buffers it
    received belong to (to check that data moves without an intermediate copy)."""

    def __init__(self, inner: BlockDevice) -> None:
        self.inner = inner
        self.calls: list[Call] = []

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    @property
    def num_blocks(self) -> int:
        return self.inner.num_blocks

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        self.calls.append(
            Call("read", lba, sum(len(b) for b in bufs), False, [b.obj for b in bufs])
        )
        self.inner.read_blocks(lba, bufs)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        self.calls.append(Call("write", lba, sum(len(b) for b in bufs), fua, [b.obj for b in bufs]))
        self.inner.write_blocks(lba, bufs, fua=fua)

    def flush(self) -> None:
        self.calls.append(Call("flush"))
        self.inner.flush()

    def ops(self) -> list[str]:
        return [c.op for c in self.calls]


class FailingDevice(RamDisk):
    """A RamDisk whose operations raise the configured exception."""

    def __init__(
        self,
        *,
        on_read: BaseException | None = None,
        on_write: BaseException | None = None,
        on_flush: BaseException | None = None,
    ) -> None:
        super().__init__()
        self.on_read, self.on_write, self.on_flush = on_read, on_write, on_flush

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        if self.on_read is not None:
            raise self.on_read
        super().read_blocks(lba, bufs)

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        if self.on_write is not None:
            raise self.on_write
        super().write_blocks(lba, bufs, fua=fua)

    def flush(self) -> None:
        if self.on_flush is not None:
            raise self.on_flush


def make_identity(**overrides: Any) -> LuIdentity:
    fields: dict[str, Any] = {
        "vendor": "VFDIRECT",
        "product": "VDISK",
        "revision": "0001",
        "serial": "SER123",
        "wwn": TEST_WWN,
        "limits": BlockLimits(max_transfer_blocks=128),
    }
    fields.update(overrides)
    return LuIdentity(**fields)


Executor = Callable[..., ScsiResult]


def run(
    execute: Executor,
    cdb: bytes,
    *,
    data_in: int = 0,
    data_out: bytes = b"",
) -> tuple[ScsiResult, bytes]:
    """Execute ``cdb`` with a data-in buffer of ``data_in`` bytes and ``data_out`` as the
    data-out buffer; return the result and the data-in bytes transferred."""
    buf = bytearray(data_in)
    outs = [memoryview(data_out)] if data_out else []
    ins = [memoryview(buf)] if data_in else []
    result = execute(cdb, outs, ins)
    return result, bytes(buf[: result.data_in_len])
