"""The device-side invariant (STYLE.md, after h11's fuzz target): whatever the driver
writes into the descriptor table, the available ring or an indirect table, ``pop()``
returns a chain whose every segment is inside guest memory, returns None, or raises
VirtqueueError -- never anything else, and it always terminates."""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from virtio_helpers import (
    DATA_BASE,
    DESC,
    GUEST_BASE,
    GUEST_SIZE,
    make_memory,
    make_pair,
    place,
    shapes,
)

from vfdirect.core.virtio import (
    QueueFullError,
    Virtqueue,
    VirtqueueConfig,
    VirtqueueError,
    legacy_layout,
)

SIZE = 8
CONFIG = legacy_layout(GUEST_BASE, SIZE, align=64, event_idx=True, indirect=True)
INDIRECT_AREA = DATA_BASE
END = GUEST_BASE + GUEST_SIZE

addresses = st.one_of(
    st.sampled_from([INDIRECT_AREA, INDIRECT_AREA + 16, DATA_BASE + 0x1000]),
    st.integers(DATA_BASE, END),
    st.sampled_from([0, GUEST_BASE - 8, GUEST_BASE, END - 16, END - 1, END, 1 << 63,
                     (1 << 64) - 1]),
    st.integers(0, (1 << 64) - 1),
)
lengths = st.one_of(st.integers(0, 512), st.sampled_from([0, 16, 32, 48, 128, 144]),
                    st.sampled_from([1, 15, 0xFFFFFFFF]), st.integers(0, 0xFFFFFFFF))
flags = st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF))
nexts = st.one_of(st.integers(0, SIZE - 1), st.integers(0, 0xFFFF))
fuzzy = st.builds(DESC.pack, addresses, lengths, flags, nexts)
#: Mostly-valid descriptors, so that long chains and indirect tables are reached too.
sane = st.builds(DESC.pack, st.integers(DATA_BASE, END - 512),
                 st.integers(1, 256), st.sampled_from([0, 1, 2, 3, 3, 1, 4]),
                 st.integers(0, SIZE - 1))
indirect_ptr = st.builds(lambda k: DESC.pack(INDIRECT_AREA, 16 * k, 4, 0), st.integers(1, 9))
descriptor = st.one_of(sane, sane, indirect_ptr, fuzzy)
structured = st.lists(descriptor, min_size=SIZE, max_size=SIZE).map(b"".join)
table = st.one_of(structured, structured, st.binary(min_size=16 * SIZE, max_size=16 * SIZE))
indirect_table = st.one_of(st.lists(descriptor, min_size=0, max_size=10).map(b"".join),
                           st.binary(max_size=160))
#: (how far avail.idx is ahead of last_avail_idx, or an absolute index; ring entries)
relative = st.integers(0, SIZE).map(lambda k: -1 - k)
head = st.integers(0, SIZE - 1)
avail_ring = st.tuples(st.one_of(relative, relative, relative, st.integers(0, 0xFFFF)),
                       st.lists(st.one_of(head, head, head, head, st.integers(0, 0xFFFF)),
                                min_size=SIZE, max_size=SIZE))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table, indirect_table, avail_ring, st.integers(0, 0xFFFF), st.booleans())
def test_pop_never_raises_anything_else(desc: bytes, ind: bytes,
                                        avail: tuple[int, list[int]], last_avail: int,
                                        indirect: bool) -> None:
    memory, _ = make_memory()
    config = VirtqueueConfig(SIZE, CONFIG.desc_addr, CONFIG.avail_addr, CONFIG.used_addr,
                             event_idx=True, indirect=indirect)
    memory.write(config.desc_addr, desc)
    memory.write(INDIRECT_AREA, ind)
    idx, ring = avail
    if idx < 0:
        idx = (last_avail - 1 - idx) & 0xFFFF
    memory.store_u16(config.avail_addr + 2, idx)
    for slot, head in enumerate(ring):
        memory.store_u16(config.avail_addr + 4 + 2 * slot, head)
    queue = Virtqueue(memory, config, last_avail_idx=last_avail)
    popped = []
    try:
        for _ in range(SIZE + 1):
            chain = queue.pop()
            if chain is None:
                break
            popped.append(chain)
            assert 0 <= chain.head < SIZE
            assert chain.descriptors <= SIZE
            for seg in chain.readable + chain.writable:
                assert seg.length > 0
                assert memory.contains(seg.gpa, seg.length)
                memory.views(seg.gpa, seg.length)
        else:
            raise AssertionError("more pops than the queue holds")
    except VirtqueueError as exc:
        event(f"fault {exc.fault.name}")
    event(f"{len(popped)} chains popped")
    # Every popped head can be completed.
    queue.push_used_batch((c.head, 0) for c in popped)
    assert queue.in_flight == ()


def drain(queue: Virtqueue, memory: object) -> tuple[int, str | None]:
    popped, fault = [], None
    try:
        for _ in range(queue.size + 1):
            chain = queue.pop()
            if chain is None:
                break
            popped.append(chain)
            for seg in chain.readable + chain.writable:
                assert seg.length > 0 and queue_memory(queue).contains(seg.gpa, seg.length)
        else:
            raise AssertionError("more pops than the queue holds")
    except VirtqueueError as exc:
        fault = exc.fault.name
    queue.push_used_batch((c.head, 0) for c in popped)
    return len(popped), fault


def queue_memory(queue: Virtqueue) -> object:
    return queue._memory  # the memory the queue checks against


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(shapes, min_size=1, max_size=6),
       st.lists(st.tuples(st.integers(0, 0x1FFF), st.integers(0, 255)), min_size=1,
                max_size=12))
def test_mutated_valid_rings(chains: list, flips: list[tuple[int, int]]) -> None:
    """Mutation fuzzing: a driver publishes valid chains (direct and indirect), then
    bytes of the ring areas and the indirect tables are overwritten."""
    pair = make_pair(8, max_indirect=8)
    cursor = DATA_BASE
    for token, shape in enumerate(chains):
        rd, wr, cursor = place(shape, cursor)
        try:
            pair.driver.submit(rd, wr, token, indirect=None if token % 2 else False)
        except QueueFullError:
            break
    lay = pair.layout
    areas = [(lay.desc_addr, 16 * 8), (lay.avail_addr, 4 + 2 * 8 + 2),
             (lay.indirect_addr, lay.indirect_bytes)]
    span = sum(n for _, n in areas)
    for position, value in flips:
        offset = position % span
        for addr, n in areas:
            if offset < n:
                pair.memory.write(addr + offset, bytes([value]))
                break
            offset -= n
    count, fault = drain(pair.device, pair.memory)
    event(f"mutated: {count} popped, fault {fault}")
