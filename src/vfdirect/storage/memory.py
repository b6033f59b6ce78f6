"""A physical LUN held in memory: a real backend (same contract, same conformance
suite), for tests of the layers above and for throw-away demos. Not persistent: FUA and
flush have nothing to wait for."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType
from typing import Self

from vfdirect.core.array import BLOCK_SIZES
from vfdirect.storage._posixio import byte_view, total_bytes
from vfdirect.storage.backend import check_io

_ZEROS = memoryview(bytes(1 << 20))


class MemoryBackend:
    """``num_blocks`` zeroed blocks in a ``bytearray``."""

    def __init__(self, block_size: int, num_blocks: int, name: str = "memory") -> None:
        if block_size not in BLOCK_SIZES:
            raise ValueError(f"block size {block_size} is not one of {BLOCK_SIZES}")
        if num_blocks < 1:
            raise ValueError("a LUN has at least one block")
        self._block_size = block_size
        self._num_blocks = num_blocks
        self._name = name
        self._data: bytearray | None = bytearray(block_size * num_blocks)
        self._mem = memoryview(self._data)

    @property
    def block_size(self) -> int:
        return self._block_size

    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def closed(self) -> bool:
        return self._data is None

    def read_blocks(self, lba: int, bufs: Sequence[memoryview]) -> None:
        mem = self._open_mem()
        check_io(lba, total_bytes(bufs), self._block_size, self._num_blocks, self._name)
        pos = lba * self._block_size
        for b in bufs:
            view = byte_view(b)
            n = view.nbytes
            view[:] = mem[pos : pos + n]
            pos += n

    def write_blocks(self, lba: int, bufs: Sequence[memoryview], *, fua: bool = False) -> None:
        mem = self._open_mem()
        check_io(lba, total_bytes(bufs), self._block_size, self._num_blocks, self._name)
        pos = lba * self._block_size
        for b in bufs:
            view = byte_view(b)
            n = view.nbytes
            mem[pos : pos + n] = view
            pos += n

    def flush(self) -> None:
        self._open_mem()

    def zero_blocks(self, lba: int, count: int) -> None:
        mem = self._open_mem()
        if count < 0:
            raise ValueError(f"{self._name}: negative block count {count}")
        check_io(lba, count * self._block_size, self._block_size, self._num_blocks, self._name)
        pos, end = lba * self._block_size, (lba + count) * self._block_size
        while pos < end:  # in pieces: zeroing a large LUN must not double its memory
            step = min(end - pos, len(_ZEROS))
            mem[pos : pos + step] = _ZEROS[:step]
            pos += step

    def close(self) -> None:
        if self._data is not None:
            self._mem.release()
            self._data = None

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _open_mem(self) -> memoryview:
        if self._data is None:
            raise ValueError(f"{self._name}: backend is closed")
        return self._mem
