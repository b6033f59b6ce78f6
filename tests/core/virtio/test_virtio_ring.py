"""Driver <-> device over a bytearray guest: chains of every shape, indirect tables, the
16-bit wrap, notification suppression, the in-flight record, malformed chains."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_helpers import (
    DATA_BASE,
    GUEST_BASE,
    Pair,
    make_memory,
    make_pair,
    place,
    shapes,
    write_desc,
)

from vfdirect.core.virtio import (
    DescFlag,
    DriverLayout,
    QueueFullError,
    SplitQueueDriver,
    UsedFlag,
    Virtqueue,
    VirtqueueConfig,
    VirtqueueError,
    VirtqueueFault,
    VirtqueueUsageError,
    legacy_layout,
    need_event,
)

# -- the notification rule ----------------------------------------------------------------


def reference_need_event(event: int, new: int, old: int) -> bool:
    """2.7.7.2 in words: notify iff event is one of the indices old, old+1, ..., new-1
    (mod 2^16)."""
    return any((old + k) & 0xFFFF == event for k in range((new - old) & 0xFFFF))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 64))
def test_need_event_matches_its_definition(event: int, old: int, step: int) -> None:
    new = (old + step) & 0xFFFF
    assert need_event(event, new, old) == reference_need_event(event, new, old)


def test_need_event_wraps() -> None:
    assert need_event(0xFFFF, 0x0001, 0xFFFE)  # crossed 0xFFFF going past 0
    assert need_event(0x0000, 0x0001, 0xFFFE)
    assert not need_event(0x0001, 0x0001, 0xFFFE)
    assert not need_event(5, 5, 5)


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    {"size": 0}, {"size": 3}, {"size": 65536}, {"desc_addr": 8}, {"avail_addr": 1},
    {"used_addr": 2}, {"desc_addr": 1 << 64},
])
def test_config_validation(kwargs: dict[str, int]) -> None:
    base = {"size": 8, "desc_addr": 0x1000, "avail_addr": 0x1080, "used_addr": 0x1100}
    base.update(kwargs)
    with pytest.raises(VirtqueueError) as info:
        VirtqueueConfig(**base)
    assert info.value.fault is VirtqueueFault.BAD_CONFIG


def test_config_must_fit_memory() -> None:
    memory, _ = make_memory()
    with pytest.raises(VirtqueueError):
        Virtqueue(memory, VirtqueueConfig(256, GUEST_BASE - 16, GUEST_BASE + 0x1000,
                                          GUEST_BASE + 0x2000))
    with pytest.raises(VirtqueueError):  # used ring overlapping the descriptor table
        Virtqueue(memory, VirtqueueConfig(8, GUEST_BASE, GUEST_BASE + 0x200, GUEST_BASE + 8))


def test_legacy_layout() -> None:
    cfg = legacy_layout(0x10000, 256)
    assert (cfg.desc_addr, cfg.avail_addr, cfg.used_addr) == (0x10000, 0x11000, 0x12000)


# -- round trips ----------------------------------------------------------------------------


def roundtrip(pair: Pair, shape: tuple[list[int], list[int]], cursor: int, token: int,
              indirect: bool | None) -> int:
    readable, writable, cursor = place(shape, cursor)
    payload = bytes((token + i) & 0xFF for i in range(sum(n for _, n in readable)))
    done = 0
    for addr, length in readable:
        pair.memory.write(addr, payload[done:done + length])
        done += length
    head, _ = pair.driver.submit(readable, writable, token, indirect=indirect)
    chain = pair.device.pop()
    assert chain is not None and chain.head == head
    assert [(s.gpa, s.length) for s in chain.readable] == readable
    assert [(s.gpa, s.length) for s in chain.writable] == writable
    assert chain.read(pair.memory) == payload
    answer = bytes(range(256)) * 5
    written = chain.write(pair.memory, answer[:chain.writable_length])
    assert pair.device.in_flight == (head,)
    pair.device.push_used(head, written)
    used = pair.driver.pop_used()
    assert used is not None and (used.head, used.token, used.written) == (head, token, written)
    got = b"".join(pair.memory.read(a, n) for a, n in writable)
    assert got[:written] == answer[:written] and written == len(got)
    assert pair.device.in_flight == ()
    return cursor


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(shapes, st.sampled_from([None, True, False])), min_size=1,
                max_size=12), st.booleans())
def test_chains_of_every_shape_round_trip(chains: list, event_idx: bool) -> None:
    pair = make_pair(16, event_idx=event_idx, max_indirect=8)
    cursor = DATA_BASE
    for token, (shape, wanted) in enumerate(chains):
        indirect = None if wanted and len(shape[0]) + len(shape[1]) > 8 else wanted
        cursor = roundtrip(pair, shape, cursor, token, indirect)
    assert pair.driver.num_free == 16


def test_indirect_chain_uses_one_descriptor() -> None:
    pair = make_pair(8, max_indirect=8)
    rd, wr, _ = place(([10, 20, 30], [40, 50]), DATA_BASE)
    pair.driver.submit(rd, wr, 7)
    assert pair.driver.num_free == 7
    chain = pair.device.pop()
    assert chain is not None and chain.indirect and chain.descriptors == 5


def test_out_of_order_completion_and_in_flight_record() -> None:
    pair = make_pair(16)
    heads = []
    for token in range(5):
        rd, wr, _ = place(([16], [16]), DATA_BASE + 64 * token)
        heads.append(pair.driver.submit(rd, wr, 100 + token, indirect=False)[0])
    popped = [pair.device.pop() for _ in range(5)]
    assert pair.device.pop() is None
    assert pair.device.in_flight == tuple(heads)
    for i in (3, 0, 4):
        chain = popped[i]
        assert chain is not None
        pair.device.push_used(chain.head, i)
    assert pair.device.in_flight == (heads[1], heads[2])
    reaped = [pair.driver.pop_used() for _ in range(3)]
    assert [(u.token, u.written) for u in reaped if u] == [(103, 3), (100, 0), (104, 4)]
    assert pair.driver.pop_used() is None
    assert set(pair.driver.in_flight) == {heads[1], heads[2]}


def test_push_used_batch_publishes_once() -> None:
    pair = make_pair(8)
    for token in range(3):
        rd, wr, _ = place(([8], [8]), DATA_BASE + 64 * token)
        pair.driver.submit(rd, wr, token)
    chains = [pair.device.pop() for _ in range(3)]
    pair.device.push_used_batch([(c.head, 1) for c in chains if c])
    assert pair.device.used_idx == 3 and pair.driver.pending_used() == 3
    with pytest.raises(VirtqueueUsageError):
        pair.device.push_used(chains[0].head if chains[0] else 0, 0)  # no longer in flight


def test_written_length_checked_against_capacity() -> None:
    pair = make_pair(8)
    rd, wr, _ = place(([8], [8]), DATA_BASE)
    pair.driver.submit(rd, wr, 1)
    chain = pair.device.pop()
    assert chain is not None
    with pytest.raises(VirtqueueUsageError):
        pair.device.push_used(chain.head, 9)
    assert chain.write(pair.memory, b"x" * 20) == 8


@pytest.mark.parametrize("event_idx", [True, False])
def test_indices_wrap_past_65535(event_idx: bool) -> None:
    pair = make_pair(8, event_idx=event_idx, start_idx=0xFFF0)
    cursor = DATA_BASE
    for token in range(100):
        cursor = roundtrip(pair, ([8], [8, 8]), cursor, token, None)
    assert pair.device.last_avail_idx == (0xFFF0 + 100) & 0xFFFF
    assert pair.device.used_idx == pair.driver.last_used_idx == pair.device.last_avail_idx
    assert pair.driver.avail_idx == pair.device.last_avail_idx


def test_queue_full_and_staging_rules() -> None:
    pair = make_pair(4, max_indirect=0)
    rd, wr, _ = place(([8, 8], [8]), DATA_BASE)
    pair.driver.add(rd, wr, 1)
    with pytest.raises(VirtqueueUsageError):
        pair.driver.pop_used()  # staged chains must be published first
    with pytest.raises(QueueFullError):
        pair.driver.add(rd, wr, 2)
    assert pair.device.pop() is None  # nothing published yet
    assert pair.driver.publish() is True
    assert pair.device.pop() is not None


# -- notification suppression --------------------------------------------------------------


def test_event_idx_interrupt_decisions() -> None:
    pair = make_pair(8, event_idx=True)
    drv, dev = pair.driver, pair.device
    tokens = iter(range(1000))

    def one() -> int:
        rd, wr, _ = place(([8], [8]), DATA_BASE)
        drv.submit(rd, wr, next(tokens))
        chain = dev.pop()
        assert chain is not None
        return chain.head

    drv.enable_interrupts()  # used_event = last_used (0)
    dev.push_used(one(), 0)
    assert dev.should_notify()  # used idx crossed used_event 0
    assert not dev.should_notify()  # nothing new
    # The driver has not reaped: used_event stays 0, so the next completion is silent.
    dev.push_used(one(), 0)
    assert not dev.should_notify()
    assert drv.pop_used() and drv.pop_used()  # interrupts on: used_event -> 2
    dev.push_used(one(), 0)
    assert dev.should_notify()
    drv.disable_interrupts()
    assert drv.pop_used()  # interrupts off: used_event not advanced (stays 3)
    dev.push_used(one(), 0)
    assert not dev.should_notify()
    assert drv.enable_interrupts() is True  # a completion is already waiting


def test_flag_interrupt_decisions_without_event_idx() -> None:
    pair = make_pair(8, event_idx=False)
    drv, dev = pair.driver, pair.device
    rd, wr, _ = place(([8], [8]), DATA_BASE)
    drv.submit(rd, wr, 1)
    drv.submit(rd, wr, 2)
    a, b = dev.pop(), dev.pop()
    assert a and b
    drv.disable_interrupts()
    dev.push_used(a.head, 0)
    assert not dev.should_notify()
    assert drv.enable_interrupts() is True
    dev.push_used(b.head, 0)
    assert dev.should_notify()


def test_kick_suppression_without_event_idx() -> None:
    pair = make_pair(8, event_idx=False)
    drv, dev = pair.driver, pair.device
    rd, wr, _ = place(([8], [8]), DATA_BASE)
    assert drv.submit(rd, wr, 1)[1] is True
    dev.disable_kicks()
    assert pair.memory.load_u16(pair.layout.used_addr) & UsedFlag.NO_NOTIFY
    assert drv.submit(rd, wr, 2)[1] is False
    assert dev.enable_kicks() is True  # two chains waiting: poll instead of sleeping
    assert drv.submit(rd, wr, 3)[1] is True


def test_kick_suppression_with_event_idx() -> None:
    pair = make_pair(8, event_idx=True)
    drv, dev = pair.driver, pair.device
    rd, wr, _ = place(([8], [8]), DATA_BASE)
    assert drv.submit(rd, wr, 1)[1] is True  # avail_event 0 crossed
    assert drv.submit(rd, wr, 2)[1] is False  # device has not caught up
    assert dev.pop() and dev.pop()  # pop moves avail_event to last_avail_idx (2)
    assert drv.submit(rd, wr, 3)[1] is True
    assert dev.pop()
    dev.disable_kicks()  # polling: avail_event stays at 3 ...
    assert drv.submit(rd, wr, 4)[1] is True  # ... one kick at most
    assert dev.pop()
    assert drv.submit(rd, wr, 5)[1] is False
    assert dev.enable_kicks() is True
    # avail_event = 5: the device wants a kick for anything past what it has seen.
    assert drv.submit(rd, wr, 6)[1] is True
    assert drv.submit(rd, wr, 7)[1] is False


def test_notification_rule_property() -> None:
    # Device side: should_notify with EVENT_IDX equals the reference rule for every
    # used_event position around the published range.
    for used_event in range(12):
        pair = make_pair(8, event_idx=True)
        rd, wr, _ = place(([8], [8]), DATA_BASE)
        for token in range(6):
            pair.driver.submit(rd, wr, token)
        chains = [pair.device.pop() for _ in range(6)]
        pair.device.push_used_batch([(c.head, 0) for c in chains[:3] if c])
        pair.device.should_notify()  # signalled up to 3
        pair.memory.store_u16(pair.layout.avail_addr + 4 + 2 * 8, used_event)
        pair.device.push_used_batch([(c.head, 0) for c in chains[3:] if c])
        assert pair.device.should_notify() == reference_need_event(used_event, 6, 3)


# -- malformed chains ------------------------------------------------------------------------


def raw_pair(*, indirect: bool = True, size: int = 8) -> tuple[Pair, int]:
    """A pair whose descriptor table we write by hand; returns (pair, desc table gpa)."""
    pair = make_pair(size, max_indirect=8 if indirect else 0)
    return pair, pair.layout.desc_addr


def publish_head(pair: Pair, head: int) -> None:
    avail = pair.layout.avail_addr
    idx = pair.memory.load_u16(avail + 2)
    pair.memory.store_u16(avail + 4 + 2 * (idx % pair.layout.size), head)
    pair.memory.store_u16(avail + 2, (idx + 1) & 0xFFFF)


N, W, IND = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


def bad_chain_cases() -> list[tuple[str, VirtqueueFault]]:
    return [
        ("head", VirtqueueFault.BAD_HEAD),
        ("loop", VirtqueueFault.LOOP),
        ("next", VirtqueueFault.BAD_NEXT),
        ("bounds", VirtqueueFault.OUT_OF_BOUNDS),
        ("order", VirtqueueFault.READABLE_AFTER_WRITABLE),
        ("nested", VirtqueueFault.NESTED_INDIRECT),
        ("ind_next", VirtqueueFault.INDIRECT_WITH_NEXT),
        ("ind_len", VirtqueueFault.BAD_INDIRECT_LEN),
        ("ind_zero", VirtqueueFault.BAD_INDIRECT_LEN),
        ("ind_bounds", VirtqueueFault.OUT_OF_BOUNDS),
        ("ind_big", VirtqueueFault.CHAIN_TOO_LONG),
        ("ind_loop", VirtqueueFault.LOOP),
        ("not_negotiated", VirtqueueFault.INDIRECT_NOT_NEGOTIATED),
        ("avail_jump", VirtqueueFault.BAD_AVAIL_IDX),
        ("too_long", VirtqueueFault.CHAIN_TOO_LONG),
    ]


@pytest.mark.parametrize(("case", "fault"), bad_chain_cases())
def test_malformed_chains_raise_virtqueue_error(case: str, fault: VirtqueueFault) -> None:
    pair, table = raw_pair(indirect=case != "not_negotiated")
    mem = pair.memory
    ind = DATA_BASE  # an indirect table in the data area
    d = DATA_BASE + 0x1000
    head = 0
    if case == "head":
        head = 8
    elif case == "loop":
        write_desc(mem, table, 0, d, 8, N, 1)
        write_desc(mem, table, 1, d, 8, N, 0)
    elif case == "next":
        write_desc(mem, table, 0, d, 8, N, 9)
    elif case == "bounds":
        write_desc(mem, table, 0, 0x10, 8, 0, 0)
    elif case == "order":
        write_desc(mem, table, 0, d, 8, W | N, 1)
        write_desc(mem, table, 1, d, 8, 0, 0)
    elif case == "nested":
        write_desc(mem, table, 0, ind, 32, IND, 0)
        write_desc(mem, ind, 0, d, 8, N, 1)
        write_desc(mem, ind, 1, ind, 16, IND, 0)
    elif case == "ind_next":
        write_desc(mem, table, 0, ind, 32, IND | N, 1)
    elif case == "ind_len":
        write_desc(mem, table, 0, ind, 24, IND, 0)
    elif case == "ind_zero":
        write_desc(mem, table, 0, ind, 0, IND, 0)
    elif case == "ind_bounds":
        write_desc(mem, table, 0, 0x100, 32, IND, 0)
    elif case == "ind_big":
        write_desc(mem, table, 0, ind, 16 * 9, IND, 0)
    elif case == "ind_loop":
        write_desc(mem, table, 0, ind, 32, IND, 0)
        write_desc(mem, ind, 0, d, 8, N, 1)
        write_desc(mem, ind, 1, d, 8, N, 0)
    elif case == "not_negotiated":
        write_desc(mem, table, 0, ind, 32, IND, 0)
    elif case == "too_long":
        # 7 direct descriptors then an indirect table of 8: 15 buffers > size 8.
        for i in range(7):
            write_desc(mem, table, i, d, 8, N, i + 1)
        write_desc(mem, table, 7, ind, 128, IND, 0)
        for i in range(8):
            write_desc(mem, ind, i, d, 8, N if i < 7 else 0, i + 1)
    if case == "avail_jump":
        mem.store_u16(pair.layout.avail_addr + 2, 9)
    else:
        publish_head(pair, head)
    with pytest.raises(VirtqueueError) as info:
        pair.device.pop()
    assert info.value.fault is fault
    # The queue is broken now: it keeps refusing, indices untouched.
    assert pair.device.broken is info.value
    assert pair.device.last_avail_idx == 0
    with pytest.raises(VirtqueueError):
        pair.device.pop()


def test_direct_then_indirect_is_accepted() -> None:
    # 2.7.5.3.2: zero or more direct descriptors followed by one indirect descriptor.
    pair, table = raw_pair()
    mem, ind, d = pair.memory, DATA_BASE, DATA_BASE + 0x1000
    write_desc(mem, table, 0, d, 8, N, 1)
    write_desc(mem, table, 1, ind, 32, IND | W, 0)  # WRITE on the indirect one is ignored
    write_desc(mem, ind, 0, d + 8, 8, N, 1)
    write_desc(mem, ind, 1, d + 16, 8, W, 0)
    publish_head(pair, 0)
    chain = pair.device.pop()
    assert chain is not None and chain.indirect
    assert [s.gpa for s in chain.readable] == [d, d + 8]
    assert [s.gpa for s in chain.writable] == [d + 16]


def test_duplicate_head_is_refused() -> None:
    pair, table = raw_pair()
    write_desc(pair.memory, table, 0, DATA_BASE, 8, 0, 0)
    publish_head(pair, 0)
    publish_head(pair, 0)
    assert pair.device.pop() is not None
    with pytest.raises(VirtqueueError) as info:
        pair.device.pop()
    assert info.value.fault is VirtqueueFault.DUPLICATE_HEAD


def test_chain_copied_out_before_use() -> None:
    # Changing the descriptor after pop does not change the popped record.
    pair, table = raw_pair()
    write_desc(pair.memory, table, 0, DATA_BASE, 8, 0, 0)
    publish_head(pair, 0)
    chain = pair.device.pop()
    write_desc(pair.memory, table, 0, 0x10, 1 << 20, W, 0)
    assert chain is not None and chain.readable[0].gpa == DATA_BASE


def test_zero_length_descriptors_are_dropped() -> None:
    pair, table = raw_pair()
    write_desc(pair.memory, table, 0, 0xDEAD_0000, 0, N, 1)  # no bytes: address unchecked
    write_desc(pair.memory, table, 1, DATA_BASE, 4, W, 0)
    publish_head(pair, 0)
    chain = pair.device.pop()
    assert chain is not None and chain.readable == () and chain.writable_length == 4


def test_driver_layout_rules() -> None:
    memory, _ = make_memory()
    with pytest.raises(VirtqueueUsageError):
        DriverLayout(8, GUEST_BASE, GUEST_BASE + 128, GUEST_BASE + 256, GUEST_BASE + 0x401)
    with pytest.raises(VirtqueueUsageError):
        DriverLayout.plan(GUEST_BASE, 8, max_indirect=9)
    lay = DriverLayout.plan(GUEST_BASE, 8)
    bad = DriverLayout(8, lay.desc_addr, lay.avail_addr, lay.used_addr, lay.desc_addr)
    with pytest.raises(VirtqueueUsageError):
        SplitQueueDriver.create(memory, bad)  # state block over the descriptor table
