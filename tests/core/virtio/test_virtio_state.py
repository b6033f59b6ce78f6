"""Queue state: save/restore round trips, continuation after restore, plain-data form."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio_helpers import DATA_BASE, make_pair, place

from vfdirect.core.virtio import (
    QueueState,
    QueueStateError,
    Virtqueue,
    VirtqueueError,
    VirtqueueUsageError,
)


def busy_pair(in_flight: int, done: int, start_idx: int = 0):  # type: ignore[no-untyped-def]
    pair = make_pair(16, start_idx=start_idx)
    for token in range(in_flight + done):
        rd, wr, _ = place(([8], [8, 4]), DATA_BASE + 64 * token)
        pair.driver.submit(rd, wr, token)
    chains = [pair.device.pop() for _ in range(in_flight + done)]
    for chain in chains[:done]:
        assert chain is not None
        pair.device.push_used(chain.head, 1)
    return pair, [c for c in chains[done:] if c]


def test_save_restore_round_trip_and_continue() -> None:
    pair, waiting = busy_pair(in_flight=3, done=2, start_idx=0xFFFE)
    state = pair.device.save()
    assert state.in_flight == tuple(c.head for c in waiting)
    assert state.last_avail_idx == (0xFFFE + 5) & 0xFFFF
    assert state.used_idx == (0xFFFE + 2) & 0xFFFF
    restored = Virtqueue.restore(state, pair.memory)
    assert restored.save() == state
    assert QueueState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    # The new owner re-reads the in-flight chains, completes them, and goes on.
    for chain in waiting:
        again = restored.read_chain(chain.head)
        assert again.readable == chain.readable and again.writable == chain.writable
        restored.push_used(chain.head, 3)
    rd, wr, _ = place(([8], [8]), DATA_BASE + 0x2000)
    head, _ = pair.driver.submit(rd, wr, 99)
    chain = restored.pop()
    assert chain is not None and chain.head == head
    restored.push_used(head, 2)
    tokens = []
    while (used := pair.driver.pop_used()) is not None:
        tokens.append(used.token)
    assert sorted(tokens) == [0, 1, 2, 3, 4, 99]  # nothing lost, nothing repeated
    assert pair.driver.num_free == 16


def test_restore_reads_used_idx_from_the_ring_when_not_given() -> None:
    pair, _ = busy_pair(in_flight=0, done=3)
    queue = Virtqueue(pair.memory, pair.layout.queue_config(), last_avail_idx=3)
    assert queue.used_idx == 3


def test_read_chain_only_for_in_flight_heads() -> None:
    pair, waiting = busy_pair(in_flight=1, done=0)
    with pytest.raises(VirtqueueUsageError):
        pair.device.read_chain((waiting[0].head + 1) % 16)


GOOD: dict[str, Any] = QueueState(size=16, desc_addr=0x10000, avail_addr=0x10100,
                                  used_addr=0x10200, last_avail_idx=5, used_idx=3,
                                  in_flight=(4, 1), event_idx=True,
                                  indirect=False).to_dict()


def test_plain_form_is_versioned_and_checked() -> None:
    assert GOOD["format"] == "vfdirect.virtqueue-state" and GOOD["version"] == 1
    assert QueueState.from_dict(GOOD).in_flight == (4, 1)


def _with(**changes: Any) -> dict[str, Any]:
    data = dict(GOOD)
    data.update(changes)
    return data


def _resealed(**changes: Any) -> dict[str, Any]:
    """A mutation with a recomputed checksum, so that the field checks are reached."""
    data = _with(**changes)
    body = {k: v for k, v in data.items() if k not in ("format", "version", "crc32")}
    data["crc32"] = QueueState._crc(body)
    return data


@pytest.mark.parametrize("data", [
    "not a mapping", _with(format="other"), _with(version=2), _with(version="1"),
    _with(crc32=GOOD["crc32"] ^ 1), _with(size=32), {k: v for k, v in GOOD.items()
                                                     if k != "used_idx"},
    _with(extra=1), _resealed(size=12), _resealed(size=True), _resealed(last_avail_idx=7),
    _resealed(in_flight=[4, 4]), _resealed(in_flight=[4, 16], last_avail_idx=5),
    _resealed(in_flight="ab"), _resealed(used_idx=70000), _resealed(desc_addr=-16),
    _resealed(desc_addr=0x10008), _resealed(event_idx=1), _resealed(in_flight=[1.0, 2]),
    _resealed(in_flight=list(range(17))),
])
def test_from_dict_rejects(data: Any) -> None:
    with pytest.raises(QueueStateError):
        QueueState.from_dict(data)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(GOOD), "x"]),
                       st.one_of(st.integers(-5, 1 << 65), st.booleans(), st.text(max_size=3),
                                 st.lists(st.integers(-2, 40), max_size=20), st.none()),
                       max_size=6), st.booleans())
def test_from_dict_fuzz(changes: dict[str, Any], reseal: bool) -> None:
    data = _resealed(**changes) if reseal else _with(**changes)
    try:
        state = QueueState.from_dict(data)
    except QueueStateError:
        return
    assert QueueState.from_dict(state.to_dict()) == state


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 0xFFFF), st.lists(st.integers(0, 15), unique=True, max_size=16),
       st.booleans(), st.booleans())
def test_round_trip_property(used: int, heads: list[int], event_idx: bool,
                             indirect: bool) -> None:
    state = QueueState(size=16, desc_addr=0x10000, avail_addr=0x10100, used_addr=0x10200,
                       last_avail_idx=(used + len(heads)) & 0xFFFF, used_idx=used,
                       in_flight=tuple(heads), event_idx=event_idx, indirect=indirect)
    assert QueueState.from_dict(state.to_dict()) == state


def test_state_errors_are_virtqueue_errors() -> None:
    with pytest.raises(VirtqueueError):
        QueueState(size=16, desc_addr=0, avail_addr=0x100, used_addr=0x200,
                   last_avail_idx=1, used_idx=0)
