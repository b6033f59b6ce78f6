"""The driver keeps all of its state in guest memory: a new driver attached to the same
memory continues exactly where the old one stopped -- also when the old one was killed
between any two of its stores (SYSTEM.md 6)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_helpers import DATA_BASE, Pair, make_pair, place, shapes

from vfdirect.core.virtio import (
    DescriptorChain,
    DeviceProtocolError,
    DriverStateError,
    QueueFullError,
    SplitQueueDriver,
    Virtqueue,
    VirtqueueUsageError,
)
from vfdirect.core.virtio.driver import CTL_MAGIC


class Crash(Exception):
    """The guest process was killed."""


def crash_after(stores: int) -> Callable[[], None]:
    count = [0]

    def hook() -> None:
        count[0] += 1
        if count[0] > stores:
            raise Crash

    return hook


TOKEN = struct.Struct("<Q")


@dataclass
class World:
    """A guest (driver objects that come and go) and a device (one Virtqueue)."""

    pair: Pair
    driver: SplitQueueDriver
    cursor: int = DATA_BASE
    device_seen: list[int] = field(default_factory=list)
    device_chains: dict[int, DescriptorChain] = field(default_factory=dict)
    submitted_ok: set[int] = field(default_factory=set)
    reaped: list[int] = field(default_factory=list)
    next_token: int = 1

    @classmethod
    def new(cls, size: int = 8, **kwargs: object) -> World:
        pair = make_pair(size, **kwargs)  # type: ignore[arg-type]
        return cls(pair, pair.driver)

    def reattach(self) -> None:
        self.driver = SplitQueueDriver.attach(self.pair.memory, self.pair.layout.ctl_addr)

    def submit(self, shape: tuple[list[int], list[int]] = ([8], [8]),
               indirect: bool | None = None) -> int:
        token = self.next_token
        self.next_token += 1
        shape = ([8, *shape[0]], shape[1])  # the first readable buffer carries the token
        rd, wr, self.cursor = place(shape, self.cursor)
        self.pair.memory.write(rd[0][0], TOKEN.pack(token))
        self.driver.submit(rd, wr, token, indirect=indirect)
        self.submitted_ok.add(token)
        return token

    def device_pop_all(self) -> None:
        while (chain := self.pair.device.pop()) is not None:
            token = TOKEN.unpack(chain.read(self.pair.memory, 0, 8))[0]
            self.device_seen.append(token)
            self.device_chains[token] = chain

    def device_complete(self, tokens: list[int]) -> None:
        for token in tokens:
            chain = self.device_chains.pop(token)
            self.pair.device.push_used(chain.head, min(token % 7, chain.writable_length))

    def reap(self, limit: int = 1 << 30) -> None:
        for _ in range(limit):
            expected = self.driver.peek_used()
            before = self.driver.last_used_idx
            try:
                used = self.driver.pop_used()
            except Crash:
                self.reattach()
                if self.driver.last_used_idx != before:  # committed before the kill
                    assert expected is not None
                    self.reaped.append(expected.token)
                continue
            if used is None:
                return
            assert expected == used
            self.reaped.append(used.token)

    def finish(self) -> None:
        """Drain everything and check exactly-once delivery."""
        self.driver.fault_hook = lambda: None
        self.device_pop_all()
        self.device_complete(list(self.device_chains))
        self.reap()
        assert len(self.device_seen) == len(set(self.device_seen)), "device saw a repeat"
        assert self.submitted_ok <= set(self.device_seen), "a submitted request was lost"
        assert sorted(self.reaped) == sorted(self.device_seen), "completion lost/repeated"
        assert self.driver.num_free == self.driver.size
        assert self.driver.in_flight == {}
        self.reattach()
        assert self.driver.num_free == self.driver.size


def test_reattach_continues_without_loss_or_repeat() -> None:
    world = World.new(16)
    tokens = [world.submit(([16], [8, 8]), indirect=i % 2 == 0) for i in range(5)]
    world.device_pop_all()
    world.device_complete(tokens[1:3])
    world.reattach()  # the guest process restarts
    assert set(world.driver.in_flight.values()) == set(tokens)
    assert world.driver.num_free == 16 - (1 + 4 + 1 + 4 + 1)
    world.reap()
    assert sorted(world.reaped) == tokens[1:3]
    world.reattach()
    more = [world.submit() for _ in range(2)]
    world.device_pop_all()
    assert world.device_seen == tokens + more
    world.finish()


def test_reattach_preserves_interrupt_choice_and_indices() -> None:
    world = World.new(8, start_idx=0xFFFD)
    for _ in range(6):
        world.submit()
        world.device_pop_all()
        world.device_complete(list(world.device_chains))
        world.reap()
    world.driver.disable_interrupts()
    world.reattach()
    assert not world.driver.interrupts_enabled
    assert world.driver.avail_idx == world.driver.last_used_idx == (0xFFFD + 6) & 0xFFFF
    world.finish()


@pytest.mark.parametrize("indirect", [False, True])
@pytest.mark.parametrize("stores", range(12))
def test_crash_inside_submit(indirect: bool, stores: int) -> None:
    world = World.new(8)
    first = world.submit()  # something already in flight
    world.driver.fault_hook = crash_after(stores)
    try:
        world.submit(([8, 8], [8]), indirect=indirect)
        crashed = False
    except Crash:
        crashed = True
    world.reattach()
    world.device_pop_all()
    assert world.device_seen[0] == first
    assert len(world.device_seen) in (1, 2)
    if not crashed:
        assert len(world.device_seen) == 2
    world.submit()  # the restarted guest carries on
    world.finish()


@pytest.mark.parametrize("stores", range(6))
def test_crash_inside_reap(stores: int) -> None:
    world = World.new(8)
    tokens = [world.submit(([8], [8, 8])) for _ in range(3)]
    world.device_pop_all()
    world.device_complete([tokens[1], tokens[0]])
    world.driver.fault_hook = crash_after(stores)
    world.reap()
    world.finish()


ops = st.lists(st.one_of(
    st.tuples(st.just("submit"), shapes, st.sampled_from([None, True, False])),
    st.tuples(st.just("device"), st.lists(st.integers(0, 30), max_size=4)),
    st.tuples(st.just("reap"), st.integers(1, 4)),
    st.tuples(st.just("crash"), st.integers(0, 12)),
    st.tuples(st.just("restart"),),
), max_size=40)


@settings(max_examples=120, deadline=None)
@given(ops, st.booleans())
def test_random_crashes_never_lose_or_repeat(script: list[tuple], event_idx: bool) -> None:
    world = World.new(8, event_idx=event_idx)
    for op in script:
        if op[0] == "submit":
            shape = (op[1][0][:3], op[1][1][:3])
            try:
                world.submit(shape, indirect=op[2])
            except QueueFullError:
                pass
            except Crash:
                world.reattach()
        elif op[0] == "device":
            world.device_pop_all()
            pending = list(world.device_chains)
            chosen = list(dict.fromkeys(pending[i % len(pending)] for i in op[1])) if (
                pending) else []
            world.device_complete(chosen)
        elif op[0] == "reap":
            world.reap(op[1])
        elif op[0] == "crash":
            world.driver.fault_hook = crash_after(op[1])
        else:
            world.reattach()
    world.finish()


# -- attach refuses what is not a valid state ---------------------------------------------


def test_attach_requires_a_state_block() -> None:
    world = World.new(8)
    ctl = world.pair.layout.ctl_addr
    with pytest.raises(DriverStateError):
        SplitQueueDriver.attach(world.pair.memory, ctl + 64)
    with pytest.raises(DriverStateError):
        SplitQueueDriver.attach(world.pair.memory, 1 << 40)
    world.pair.memory.store_u16(ctl + 4, 2)  # version
    with pytest.raises(DriverStateError):
        SplitQueueDriver.attach(world.pair.memory, ctl)
    world.pair.memory.store_u16(ctl + 4, 1)
    world.pair.memory.store_u32(ctl + 8, 6)  # size not a power of 2
    with pytest.raises(DriverStateError):
        SplitQueueDriver.attach(world.pair.memory, ctl)


def test_attach_detects_inconsistent_rings() -> None:
    world = World.new(8)
    world.submit()
    mem, lay = world.pair.memory, world.pair.layout
    mem.store_u16(lay.avail_addr + 2, 50)  # avail.idx far ahead of the state word
    with pytest.raises(DriverStateError):
        SplitQueueDriver.attach(mem, lay.ctl_addr)
    mem.store_u16(lay.avail_addr + 2, 2)  # one ahead, but the ring slot is not free_head
    mem.store_u16(lay.avail_addr + 4 + 2, 7)
    with pytest.raises(DriverStateError):
        SplitQueueDriver.attach(mem, lay.ctl_addr)
    assert mem.load_u32(lay.ctl_addr) == CTL_MAGIC


def test_device_misbehaviour_is_reported() -> None:
    world = World.new(8)
    world.submit()
    world.device_pop_all()
    mem, lay = world.pair.memory, world.pair.layout
    mem.store_u32(lay.used_addr + 4, 5)  # used element for head 5: never made available
    mem.store_u16(lay.used_addr + 2, 1)
    with pytest.raises(DeviceProtocolError):
        world.driver.pop_used()
    mem.store_u16(lay.used_addr + 2, 3)  # more used than in flight
    with pytest.raises(DeviceProtocolError):
        world.driver.peek_used()


def test_constructor_is_private() -> None:
    world = World.new(8)
    with pytest.raises(VirtqueueUsageError):
        SplitQueueDriver(world.pair.memory, world.pair.layout, None)


def test_device_and_driver_share_one_config() -> None:
    world = World.new(8)
    device = Virtqueue(world.pair.memory, world.pair.layout.queue_config())
    assert device.config == world.pair.device.config
