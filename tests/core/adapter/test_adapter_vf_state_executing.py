"""Claim X2 in the VF queue-state record: the heads the saving VF was still executing
(``executing``, with the ``saver`` token) round trip, are checked against the heads in
flight, and are absent from records that have none (which stay byte-identical)."""

from __future__ import annotations

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
from vfdirect.core.virtio.state import QueueState

TOKEN = "0123456789abcdef"


def _record(executing: tuple[tuple[int, int], ...] = (),
            saver: str | None = None) -> VfQueueRecord:
    q2 = QueueState(64, 0x10000, 0x10400, 0x10600, 12, 8, (3, 5, 9, 11), True, True)
    q3 = QueueState(64, 0x20000, 0x20400, 0x20600, 1, 0, (7,), True, True)
    return VfQueueRecord(1, 1 << 32, 96, 32, (RegionRecord(0, 1 << 20, None, 0, 0),),
                         (QueueRecord(2, True, q2, 1, 2), QueueRecord(3, True, q3, None, None)),
                         False, executing, saver)


def _resign(data: dict[str, Any]) -> dict[str, Any]:
    body = {k: v for k, v in data.items() if k not in ("format", "version", "crc32")}
    data["crc32"] = VfQueueRecord._crc(body)
    return data


@settings(max_examples=100)
@given(st.lists(st.sampled_from([(2, 3), (2, 5), (2, 9), (2, 11), (3, 7)]), unique=True,
                min_size=1))
def test_executing_heads_round_trip(executing: list[tuple[int, int]]) -> None:
    record = _record(tuple(executing), TOKEN)
    data = json.loads(json.dumps(record.to_dict()))
    back = VfQueueRecord.from_dict(data, fds=record.fd_count)
    assert back == record and back.executing == tuple(executing)
    assert back.without_executing() == _record()


def test_a_record_without_executing_heads_has_neither_field() -> None:
    data = _record().to_dict()
    assert "executing" not in data and "saver" not in data
    assert VfQueueRecord.from_dict(data, fds=3).executing == ()


def test_heads_and_token_go_together() -> None:
    with pytest.raises(VfStateError, match="go together"):
        _record(((2, 3),))
    with pytest.raises(VfStateError, match="go together"):
        _record((), TOKEN)


@pytest.mark.parametrize(("executing", "saver", "message"), [
    ([[2, 4]], TOKEN, "head 4 is not in flight on vring 2"),
    ([[4, 3]], TOKEN, "not in flight on vring 4"),
    ([[2, 3], [2, 3]], TOKEN, "listed twice"),
    ([[2]], TOKEN, r"executing\[0\] must be"),
    ([[2, "3"]], TOKEN, r"executing\[0\] must be"),
    ([], TOKEN, "non-empty list"),
    ([[2, 3]], "XYZ", "saver must be"),
    ([[2, 3]], None, "saver must be"),
])
def test_bad_executing_lists_are_refused(executing: Any, saver: Any, message: str) -> None:
    data = _record(((2, 3),), TOKEN).to_dict()
    data["executing"] = executing
    data["saver"] = saver
    with pytest.raises(VfStateError, match=message):
        VfQueueRecord.from_dict(_resign(data), fds=3)


def test_one_field_without_the_other_is_refused() -> None:
    data = _record(((2, 3),), TOKEN).to_dict()
    del data["saver"]
    with pytest.raises(VfStateError, match="fields differ"):
        VfQueueRecord.from_dict(_resign(data), fds=3)


def test_the_list_is_covered_by_the_checksum() -> None:
    data = _record(((2, 3),), TOKEN).to_dict()
    data["executing"] = [[2, 5]]
    with pytest.raises(VfStateError, match="checksum"):
        VfQueueRecord.from_dict(data, fds=3)
