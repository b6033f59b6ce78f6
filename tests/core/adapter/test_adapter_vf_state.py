"""The VF queue-state record (claims B3, B4, X1): restore(save(x)) round trips, and a
record that was tampered with, or does not match its descriptors, is refused before
anything in it is trusted. And the VF statistics."""

from __future__ import annotations

import contextlib
import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.adapter.vf_state import (
    QueueRecord,
    RegionRecord,
    VfQueueRecord,
    VfStateError,
)
from vfdirect.core.adapter.vf_stats import LATENCY_BUCKETS, VfStats, latency_bucket
from vfdirect.core.adapter.vscsi import CommandOutcome, ControlOutcome
from vfdirect.core.virtio.state import QueueState


@st.composite
def records(draw: st.DrawFn) -> VfQueueRecord:
    nregions = draw(st.integers(0, 3))
    regions = []
    fd = 0
    gpa = 0
    for _ in range(nregions):
        gpa += draw(st.integers(0, 1 << 20)) * 4096
        size = draw(st.integers(1, 1 << 16)) * 4096
        user = draw(st.none() | st.integers(0, 1 << 47))
        regions.append(RegionRecord(gpa, size, user, draw(st.integers(0, 1 << 30)), fd))
        fd += 1
        gpa += size
    queues = []
    for index in draw(st.lists(st.integers(0, 5), unique=True, max_size=4)):
        size = 1 << draw(st.integers(0, 8))
        heads = draw(st.lists(st.integers(0, size - 1), unique=True, max_size=size))
        used = draw(st.integers(0, 0xFFFF))
        state = QueueState(size, 0x1000, 0x2000, 0x3000, (used + len(heads)) & 0xFFFF, used,
                           tuple(heads), draw(st.booleans()), draw(st.booleans()))
        kick = call = None
        if draw(st.booleans()):
            kick, fd = fd, fd + 1
        if draw(st.booleans()):
            call, fd = fd, fd + 1
        queues.append(QueueRecord(index, draw(st.booleans()), state, kick, call))
    return VfQueueRecord(draw(st.integers(0, 255)), draw(st.integers(0, (1 << 64) - 1)), 96,
                         32, tuple(regions), tuple(queues), draw(st.booleans()))


@settings(max_examples=200)
@given(records())
def test_restore_of_save_is_identity(record: VfQueueRecord) -> None:
    data = json.loads(json.dumps(record.to_dict()))  # through the wire
    assert VfQueueRecord.from_dict(data, fds=record.fd_count) == record


def _sample() -> VfQueueRecord:
    state = QueueState(64, 0x10000, 0x10400, 0x10600, 12, 10, (3, 5), True, True)
    return VfQueueRecord(0, 1 << 32, 96, 32, (RegionRecord(0, 1 << 20, 0x7F0000, 0, 0),),
                         (QueueRecord(2, True, state, 1, 2),), False)


def _resign(data: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in data.items() if k not in ("format", "version", "crc32")}
    data["crc32"] = VfQueueRecord._crc(body)
    return data


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d.update(format="x"), "not a vfdirect.vf-queue-state record"),
    (lambda d: d.update(version=2), "unsupported"),
    (lambda d: d.update(extra=1), "fields differ"),
    (lambda d: d["queues"][0].update(index=3), "checksum mismatch"),
])
def test_tampering_is_refused(change: Any, message: str) -> None:
    data = _sample().to_dict()
    change(data)
    with pytest.raises(VfStateError, match=message):
        VfQueueRecord.from_dict(data, fds=3)


@pytest.mark.parametrize(("change", "fds", "message"), [
    (lambda d: None, 2, "came with it"),
    (lambda d: None, 4, "came with it"),
    (lambda d: d["queues"][0].update(call_fd=1), 3, "came with it"),
    (lambda d: d["queues"][0]["state"].update(used_idx=11), 3, "queues\\[0\\]"),
    (lambda d: d["regions"].append(dict(d["regions"][0], fd=3)), 4, "overlap"),
    (lambda d: d["regions"][0].update(size=0), 3, "size must be"),
    (lambda d: d["queues"].append(dict(d["queues"][0], kick_fd=None, call_fd=None)), 3,
     "appears twice"),
    (lambda d: d.update(events_missed=1), 3, "events_missed"),
])
def test_inconsistent_records_are_refused(change: Any, fds: int, message: str) -> None:
    data = copy.deepcopy(_sample().to_dict())
    change(data)
    if data["queues"] and "state" in data["queues"][0]:
        st_ = data["queues"][0]["state"]
        body = {k: v for k, v in st_.items() if k not in ("format", "version", "crc32")}
        st_["crc32"] = QueueState._crc(body)
    with pytest.raises(VfStateError, match=message):
        VfQueueRecord.from_dict(_resign(data), fds=fds)


@settings(max_examples=200)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=4),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6),
                                                                         c, max_size=4),
                    max_leaves=12), st.integers(0, 4))
def test_fuzz_from_dict_refuses_or_builds(data: Any, fds: int) -> None:
    with contextlib.suppress(VfStateError):
        VfQueueRecord.from_dict(data, fds=fds)


# -- statistics -------------------------------------------------------------------------


def test_latency_buckets_are_log2_microseconds() -> None:
    assert [latency_bucket(ns) for ns in (0, 999, 1000, 1999, 2000, 3999, 4000)] == \
        [0, 0, 0, 0, 1, 1, 2]
    assert latency_bucket(10**15) == LATENCY_BUCKETS - 1


def test_stats_count_commands_errors_and_bytes() -> None:
    stats = VfStats()
    stats.record_command(CommandOutcome(108 + 4096, 0, 0, None, 4096, 0, 0, 0x28), 150_000)
    stats.record_command(CommandOutcome(108, 0, 2, 5, 0, 0, 0, 0x2A), 3_000)
    stats.record_command(CommandOutcome(108, 3, 0, None, 0, 0, 9, 0x00), 500)
    stats.record_command(CommandOutcome(108, 1, 0, None, 0, 0, 0, 0x28), 500)
    stats.record_control(ControlOutcome(1, "tmf", 0, 5))
    snap = stats.snapshot()
    assert (snap["ios"], snap["reads"], snap["writes"], snap["bytes_in"]) == (4, 2, 1, 4096)
    assert snap["errors"] == {"check_conditions": 1, "by_sense_key": {"ILLEGAL_REQUEST": 1},
                              "bad_target": 1, "overrun": 1, "faults": 0}
    assert snap["tmfs"] == 1 and sum(snap["latency_us_log2"]) == 4
    assert snap["latency_us_log2"][7] == 1  # 150 us in [128, 256)
    json.dumps(snap)
    stats.clear()
    assert stats.snapshot()["ios"] == 0
