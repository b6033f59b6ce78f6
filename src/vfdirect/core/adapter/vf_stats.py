"""Per-VF data path statistics, pure: counters and a latency histogram.

Rules of this module:

* one :class:`VfStats` per VF, written by that VF's thread only; any other thread may
  call :meth:`VfStats.snapshot` at any time. Every counter is an ``int`` attribute or an
  element of a fixed-size list, so a concurrent snapshot never sees a container change
  size (it may see one command half-counted, which a statistic tolerates);
* latency is measured by the shell (it owns the clock) and handed in as nanoseconds;
  the histogram has log2 microsecond buckets: bucket 0 counts [0, 2) us, bucket ``i``
  counts [2^i, 2^(i+1)) us, the last bucket everything above;
* errors are counted by SCSI sense key (SPC-4 4.5.6), by virtio-scsi response code for
  commands that never reached a logical unit (BAD_TARGET, OVERRUN), and ring faults.
"""

from __future__ import annotations

from typing import Any

from vfdirect.core.adapter.vscsi import CommandOutcome, ControlOutcome
from vfdirect.core.scsi import SenseKey
from vfdirect.core.virtio.scsi import VirtioScsiResponse

#: Histogram buckets: the last one, [2^23 us, inf), starts at about 8.4 s.
LATENCY_BUCKETS = 24

_READS = frozenset({0x08, 0x28, 0x88, 0xA8})
_WRITES = frozenset({0x0A, 0x2A, 0x8A, 0xAA})


def latency_bucket(ns: int) -> int:
    """The histogram bucket of a latency of ``ns`` nanoseconds."""
    us = max(0, ns) // 1000
    return min(LATENCY_BUCKETS - 1, max(0, us.bit_length() - 1))


class VfStats:
    """Counters of one VF's data path."""

    __slots__ = ("bad_target", "bytes_in", "bytes_out", "check_conditions", "connections",
                 "control", "events_missed", "events_posted", "faults", "ios", "kicks",
                 "latency_us_log2", "notifications", "overruns", "reads", "refused",
                 "sense_keys", "tmfs", "writes")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Every counter back to zero (a function-level reset of the VF)."""
        self.ios = 0
        self.reads = 0
        self.writes = 0
        #: bytes moved to the guest (data-in) and from it (data-out)
        self.bytes_in = 0
        self.bytes_out = 0
        self.check_conditions = 0
        self.sense_keys = [0] * 16
        self.bad_target = 0
        self.overruns = 0
        self.control = 0
        self.tmfs = 0
        self.events_posted = 0
        self.events_missed = 0
        self.kicks = 0
        self.notifications = 0
        self.faults = 0
        self.connections = 0
        self.refused = 0
        self.latency_us_log2 = [0] * LATENCY_BUCKETS

    def record_command(self, outcome: CommandOutcome, latency_ns: int) -> None:
        self.ios += 1
        if outcome.cdb0 in _READS:
            self.reads += 1
        elif outcome.cdb0 in _WRITES:
            self.writes += 1
        self.bytes_in += outcome.data_in
        self.bytes_out += outcome.data_out
        if outcome.response == VirtioScsiResponse.BAD_TARGET:
            self.bad_target += 1
        elif outcome.response == VirtioScsiResponse.OVERRUN:
            self.overruns += 1
        if outcome.sense_key is not None:
            self.check_conditions += 1
            self.sense_keys[outcome.sense_key & 0xF] += 1
        self.latency_us_log2[latency_bucket(latency_ns)] += 1

    def record_control(self, outcome: ControlOutcome) -> None:
        self.control += 1
        if outcome.kind == "tmf":
            self.tmfs += 1

    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-ready) of every counter."""
        keys = list(self.sense_keys)
        return {
            "ios": self.ios, "reads": self.reads, "writes": self.writes,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "errors": {
                "check_conditions": self.check_conditions,
                "by_sense_key": {SenseKey(k).name: n for k, n in enumerate(keys) if n},
                "bad_target": self.bad_target, "overrun": self.overruns,
                "faults": self.faults,
            },
            "control": self.control, "tmfs": self.tmfs,
            "events_posted": self.events_posted, "events_missed": self.events_missed,
            "kicks": self.kicks, "notifications": self.notifications,
            "connections": self.connections, "refused_connections": self.refused,
            "latency_us_log2": list(self.latency_us_log2),
        }
