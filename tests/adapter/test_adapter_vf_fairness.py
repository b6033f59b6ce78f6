"""Fair sharing of the adapter between VFs (issue 8, exhaustion; adapter/vf/fairness.py):
the bulk-transfer gate lets at most ``lanes`` bulk transfers move at once, in arrival
order, never delays a small transfer, and frees its lane whatever happens; the VF
manager runs the VF threads at the short interpreter switch interval and gives the
previous one back when it closes. Every wait here is bounded; nothing is timed."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from typing import Any, cast

import pytest

from vfdirect.adapter.service import AdapterService
from vfdirect.adapter.vf.fairness import (
    BULK_BYTES,
    BULK_GATE,
    BULK_NICE,
    SWITCH_INTERVAL_S,
    BulkGate,
    bulk_lanes,
)
from vfdirect.adapter.vf.manager import VfManager

WAIT_S = 10.0


def test_bulk_lanes_half_the_cpus_at_least_one() -> None:
    assert [bulk_lanes(n) for n in (None, 1, 2, 3, 4, 16)] == [1, 1, 1, 1, 2, 8]
    assert BULK_GATE.lanes == bulk_lanes(os.cpu_count())
    assert BULK_GATE.threshold == BULK_BYTES


@pytest.mark.parametrize(("lanes", "threshold"), [(0, 1), (1, 0), (-1, 10)])
def test_bulk_gate_rejects_bad_settings(lanes: int, threshold: int) -> None:
    with pytest.raises(ValueError, match="must be >= 1"):
        BulkGate(lanes, threshold)


def _hold(gate: BulkGate, nbytes: int, entered: threading.Event,
          leave: threading.Event) -> threading.Thread:
    def run() -> None:
        with gate.transfer(nbytes):
            entered.set()
            leave.wait(WAIT_S)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_bulk_transfers_take_turns_small_ones_never_wait() -> None:
    gate = BulkGate(1, threshold=1000)
    leave_a = threading.Event()
    a_in = threading.Event()
    a = _hold(gate, 1000, a_in, leave_a)
    assert a_in.wait(WAIT_S)
    # a second bulk transfer waits for the lane
    b_in, leave_b = threading.Event(), threading.Event()
    b = _hold(gate, 5000, b_in, leave_b)
    assert not b_in.wait(0.05)
    # small transfers go through while the lane is taken (this thread, no wait)
    for size in (0, 1, 999):
        with gate.transfer(size):
            pass
    leave_a.set()
    assert b_in.wait(WAIT_S)  # the lane passed on
    leave_b.set()
    for t in (a, b):
        t.join(WAIT_S)
        assert not t.is_alive()
    assert gate.bulk == 2 and gate.waited == 1


def _waiting(gate: BulkGate) -> int:
    """Threads blocked on the gate's semaphore (its condition's waiters)."""
    return len(gate._sem._cond._waiters)  # type: ignore[attr-defined]


def test_bulk_gate_serves_waiters_in_arrival_order() -> None:
    gate = BulkGate(1, threshold=1)
    order: list[int] = []
    first_in, leave_first = threading.Event(), threading.Event()
    first = _hold(gate, 10, first_in, leave_first)
    assert first_in.wait(WAIT_S)
    waiters = []
    for i in range(4):
        def run(i: int = i) -> None:
            with gate.transfer(10):
                order.append(i)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        waiters.append(t)
        # the next one arrives only once this one waits at the gate
        deadline = time.monotonic() + WAIT_S
        while _waiting(gate) < i + 1:
            assert time.monotonic() < deadline, "a waiter never reached the gate"
            time.sleep(0.001)
    leave_first.set()
    for t in [first, *waiters]:
        t.join(WAIT_S)
        assert not t.is_alive()
    assert order == [0, 1, 2, 3]
    assert gate.waited == 4


def test_bulk_gate_frees_its_lane_on_error() -> None:
    gate = BulkGate(1, threshold=1)
    with pytest.raises(RuntimeError), gate.transfer(10):
        raise RuntimeError("the LUN failed")
    done = threading.Event()
    t = _hold(gate, 10, done, threading.Event())
    assert done.wait(WAIT_S)  # the lane is free again
    t.join(0)


def test_vf_manager_runs_vf_threads_at_the_short_switch_interval() -> None:
    before = sys.getswitchinterval()
    service: Any = type("NoVfs", (), {"platform": None})()
    manager = VfManager(cast(AdapterService, service), max_vfs=0,
                        logger=logging.getLogger("test"))
    try:
        manager.start()
        assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        assert before > SWITCH_INTERVAL_S
    finally:
        manager.close()
    assert sys.getswitchinterval() == pytest.approx(before)


class _Clock:
    """A clock the test moves by hand, and the pauses the gate asked for."""

    def __init__(self) -> None:
        self.now = 1_000_000_000
        self.slept: list[float] = []

    def __call__(self) -> int:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)


def _gate(clock: _Clock, **kw: Any) -> BulkGate:
    return BulkGate(1, threshold=1000, clock=clock, sleep=clock.sleep, **kw)


def test_bulk_pauses_while_another_vf_does_small_io() -> None:
    clock = _Clock()
    gate = _gate(clock, pause_ratio=1.0, recent_ns=50_000_000, max_pause_ns=50_000_000)
    # nobody else active: bulk transfers back to back
    with gate.transfer(5000, vf=0):
        clock.now += 8_000_000
    assert clock.slept == [] and gate.pauses == 0
    # VF 0's own small IO does not slow its bulk transfers down
    with gate.transfer(10, vf=0):
        pass
    with gate.transfer(5000, vf=0):
        clock.now += 8_000_000
    assert clock.slept == []
    # VF 1 did a small IO recently: VF 0's 8 ms transfer is followed by an 8 ms pause
    with gate.transfer(996, vf=1):
        pass
    with gate.transfer(5000, vf=0):
        clock.now += 8_000_000
    assert clock.slept == [pytest.approx(0.008)]
    # capped at max_pause_ns
    with gate.transfer(10, vf=1):
        pass
    with gate.transfer(5000, vf=0):
        clock.now += 40_000_000
    assert clock.slept[-1] == pytest.approx(0.040)
    with gate.transfer(10, vf=1):
        pass
    with gate.transfer(5000, vf=0):
        clock.now += 49_000_000
    assert clock.slept[-1] == pytest.approx(0.049)
    with gate.transfer(5000, vf=0):
        clock.now += 200_000_000
        with gate.transfer(10, vf=1):  # VF 1 active during VF 0's transfer
            pass
    assert clock.slept[-1] == pytest.approx(0.050)
    assert gate.pauses == 4 and gate.paused_ns == 8_000_000 + 40_000_000 + 99_000_000
    # VF 1's last small IO is now older than recent_ns: no pause any more
    clock.now += 60_000_000
    with gate.transfer(5000, vf=0):
        clock.now += 8_000_000
    assert len(clock.slept) == 4


def test_bulk_pause_ratio_zero_never_pauses() -> None:
    clock = _Clock()
    gate = _gate(clock, pause_ratio=0.0)
    with gate.transfer(10, vf=1):
        pass
    with gate.transfer(5000, vf=0):
        clock.now += 8_000_000
    assert clock.slept == [] and gate.bulk == 1
    with pytest.raises(ValueError, match="pause_ratio"):
        _gate(clock, pause_ratio=-1.0)


def test_bulk_lane_is_kept_during_the_pause_and_freed_after() -> None:
    clock = _Clock()
    seen: list[bool] = []
    gate = _gate(clock)

    def sleep(seconds: float) -> None:
        # during the pause the lane is still taken: another bulk transfer would wait
        seen.append(gate._sem.acquire(blocking=False))

    gate._sleep = sleep
    with gate.transfer(10, vf=1):
        pass
    with gate.transfer(5000, vf=0):
        clock.now += 1_000_000
    assert seen == [False]
    assert gate._sem.acquire(blocking=False)  # freed after the pause
    gate._sem.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="lowering a nice value back needs root")
def test_bulk_transfer_runs_at_low_priority_and_gets_it_back() -> None:
    gate = BulkGate(1, threshold=1000)
    assert gate.bulk_nice == BULK_NICE
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    with gate.transfer(10):  # small: never reniced
        assert os.getpriority(os.PRIO_PROCESS, tid) == before
    with gate.transfer(5000, pause=False):
        assert os.getpriority(os.PRIO_PROCESS, tid) == BULK_NICE
    assert os.getpriority(os.PRIO_PROCESS, tid) == before
    with pytest.raises(RuntimeError), gate.transfer(5000, pause=False):
        raise RuntimeError("the transfer failed")
    assert os.getpriority(os.PRIO_PROCESS, tid) == before


def test_bulk_nice_zero_leaves_the_priority_alone() -> None:
    gate = BulkGate(1, threshold=1000, bulk_nice=0)
    tid = threading.get_native_id()
    before = os.getpriority(os.PRIO_PROCESS, tid)
    with gate.transfer(5000, pause=False):
        assert os.getpriority(os.PRIO_PROCESS, tid) == before
