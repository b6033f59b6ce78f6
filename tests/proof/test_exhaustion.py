"""Exhaustion (issue 8): a guest that floods its queues, or submits without ever
collecting its completions, cannot grow the adapter's memory without bound, cannot have
more requests outstanding than its queues hold, and its protocol abuse puts only its own
VF in ERROR, while a victim VM on another VF of the same adapter verifies every block.

One adapter (2 IO threads per VF), a hostile guest process on VF 0 (see
``exhaustion_helpers``), and ``vm-run --workload verify`` on VF 1. Phases, each a new
hostile guest process (a new connection and memory table): warm-up (flood, then
never-collect), flood 1x, flood 4x, never-collect 4x, then the abuses (a head published
while in flight; ``avail.idx`` more than a queue ahead), each followed by ``vf_reset``.
The adapter's RSS (``/proc/<pid>/status``) and per-VF outstanding counts (PF
``adapter_get_stats``) are sampled all along. No timing assertion anywhere.

``VFDIRECT_EXHAUSTION_SCALE=N`` multiplies the 1x/4x request counts (the check stays:
the same fixed RSS allowance, however long the flood runs).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from exhaustion_helpers import (
    SEG_MAX,
    WAIT_S,
    HostileProc,
    Rig,
    rss_kib,
    spawn_hostile,
    vf_outstanding,
)
from vm_helpers import VmProc, shm_path, unlink

from vfdirect.adapter.pf_client import PfClient

QUEUE = 128
QUEUES = 2
#: 128 KiB per request in CI, cut in the most segments the VF allows
TRANSFER_BLOCKS = int(os.environ.get("VFDIRECT_EXHAUSTION_TRANSFER_BLOCKS", "256"))
SCALE = int(os.environ.get("VFDIRECT_EXHAUSTION_SCALE", "1"))
#: 1x: what the queues hold; the 4x runs are 8 times a queue (the victim being active,
#: the adapter paces the hostile VF: see adapter/vf/fairness.py)
ONE_X = QUEUES * QUEUE * SCALE
#: RSS growth allowed after the warm-up, whatever the flood length (KiB)
ALLOWANCE_KIB = 8 * 1024
SAMPLE_S = 0.02
#: the assertions of the test body outside the sampler (counted in the printed checks)
CHECKS = 16
ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(300)


class Watch:
    """Samples of the adapter while the hostile guests run."""

    def __init__(self, pf: PfClient, rig: Rig) -> None:
        self.pf = pf
        self.rig = rig
        self.rss: list[int] = []
        self.outstanding_max = {0: 0, 1: 0}
        self.outstanding_samples = 0
        self.checks = 0

    def sample(self) -> None:
        self.rss.append(rss_kib(self.rig.pid)["VmRSS"])
        for vf, n in vf_outstanding(self.pf).items():
            self.outstanding_max[vf] = max(self.outstanding_max.get(vf, 0), n)
            # the ring protocol bounds it: never more than the VF's rings hold
            assert n <= (2 + QUEUES) * QUEUE, (vf, n)
            self.checks += 1
        self.outstanding_samples += 1

    def run(self, hostile: HostileProc, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while hostile.proc.poll() is None:
            assert time.monotonic() < deadline, "hostile guest did not finish in time"
            self.sample()
            time.sleep(SAMPLE_S)
        self.sample()
        return hostile.result(WAIT_S)


def wait_state(pf: PfClient, vf: int, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + WAIT_S
    while True:
        got = pf.vf_get(vf)
        if got["state"] == state:
            return got
        assert time.monotonic() < deadline, f"VF {vf} is {got['state']}, not {state}"
        time.sleep(0.01)


def vf_ios(pf: PfClient, vf: int) -> int:
    for v in pf.adapter_get_stats()["vfs"]:
        if int(v["vf"]) == vf:
            return int((v["io"] or {}).get("ios", 0))
    raise AssertionError(f"VF {vf} is not enabled")


def settled_rss(pid: int) -> int:
    """VmRSS once the adapter is idle (the lowest of a few reads)."""
    values = []
    for _ in range(5):
        values.append(rss_kib(pid)["VmRSS"])
        time.sleep(0.02)
    return min(values)


def test_exhaustion_hostile_guests_bounded_memory_isolated_victim(tmp_path: Path) -> None:
    rig = Rig(tmp_path, io_threads=2, hostile_blocks=16384)
    victim: VmProc | None = None
    hostiles: list[HostileProc] = []
    mems = [shm_path(f"exh-{i}") for i in range(8)]
    counters: dict[str, Any] = {"suite": "exhaustion"}
    try:
        rig.start()
        with PfClient(rig.daemon.sock, timeout=WAIT_S) as pf:
            victim = VmProc(tmp_path, "victim", "--memory-file", str(mems[0]),
                            "--memory-size", "8MiB", "--fwtable",
                            str(rig.write_fwtable(1, "victim")), "--workload", "verify",
                            "--depth", "4", "--window", "64", "--progress-ms", "200",
                            "--paused")
            victim.wait_event("vm_paused")
            rig.assign(pf, 1, "victim", victim.pid)
            victim.go()
            victim.wait_event("verify_started")
            watch = Watch(pf, rig)
            common = ("--queues", str(QUEUES), "--queue-size", str(QUEUE),
                      "--segments", str(SEG_MAX), "--transfer-blocks", str(TRANSFER_BLOCKS))
            results: dict[str, dict[str, Any]] = {}
            rss: dict[str, int] = {}

            def phase(name: str, mode: str, requests: int, mem: Path) -> dict[str, Any]:
                hostile = spawn_hostile(pf, rig, mode, mem, *common,
                                        "--requests", str(requests))
                hostiles.append(hostile)
                result = watch.run(hostile, 240)
                hostile.stop()
                unlink(mem)
                wait_state(pf, 0, "ASSIGNED")  # the VF let the front end go
                results[name] = result
                rss[name] = settled_rss(rig.pid)
                return result

            phase("warmup-flood", "flood", QUEUE // 2, mems[1])
            phase("warmup-never-collect", "never-collect", QUEUE // 2, mems[2])
            base = rss["warmup-never-collect"]
            phase("flood-1x", "flood", ONE_X, mems[3])
            phase("flood-4x", "flood", 4 * ONE_X, mems[4])
            nc = phase("never-collect-4x", "never-collect", 4 * ONE_X, mems[5])
            # never collected: the device handed back many times what the queues hold
            assert nc["completed"] >= 4 * ONE_X - QUEUES * QUEUE
            assert nc["submitted"] >= 4 * ONE_X
            growth = {k: v - base for k, v in rss.items()}
            counters.update({
                "hostile_requests": sum(r["submitted"] for r in results.values()),
                "hostile_bytes": sum(r["bytes_requested"] for r in results.values()),
                "hostile_kicks": sum(r["kicks"] for r in results.values()),
                "phases": {k: {"requests": r["submitted"], "rss_kib": rss[k],
                               "growth_kib": growth[k]} for k, r in results.items()},
                "rss_samples": len(watch.rss), "rss_min_kib": min(watch.rss),
                "rss_max_kib": max(watch.rss), "rss_base_kib": base,
                "peak_outstanding": watch.outstanding_max,
                "outstanding_bound": (2 + QUEUES) * QUEUE,
                "queue_size": QUEUE, "queues": QUEUES, "segments": SEG_MAX,
                "transfer_blocks": TRANSFER_BLOCKS})
            # the samples saw the hostile VF's requests in flight (IO threads)
            assert watch.outstanding_max[0] > 0
            # no growth proportional to the flood: a fixed allowance for 1x and 4x alike
            for name in ("flood-1x", "flood-4x", "never-collect-4x"):
                assert growth[name] <= ALLOWANCE_KIB, (name, growth)
            assert rss["flood-4x"] - rss["flood-1x"] <= ALLOWANCE_KIB // 2, rss
            # protocol abuse: only the hostile VF goes to ERROR
            faults = []
            in_flight: list[int] = []
            for i, mode in enumerate(("dup-head", "avail-jump")):
                hostile = spawn_hostile(pf, rig, mode, mems[6 + i], *common)
                hostiles.append(hostile)
                abuse = watch.run(hostile, 60)
                assert abuse["disconnected"], abuse
                err = wait_state(pf, 0, "ERROR")
                faults.append(err["error"])
                # what the victim had in flight when the neighbour faulted
                in_flight.append(vf_outstanding(pf)[1])
                victim_vf = pf.vf_get(1)
                assert victim_vf["state"] == "CONNECTED" and victim_vf["error"] is None
                hostile.stop()
                unlink(mems[6 + i])
                pf.vf_reset(0)
            assert "in flight" in faults[0] and "ahead" in faults[1], faults
            counters["faults_injected"] = len(faults)
            counters["fault_reasons"] = faults
            counters["victim_in_flight_at_faults"] = {"sum": sum(in_flight),
                                                      "max": max(in_flight)}
            counters["victim_vf_ios"] = vf_ios(pf, 1)
            victim.stop()
            code, result = victim.result()
            assert code == 0, result
            assert result["ok"] and result["errors"] == 0 and result["mismatches"] == 0, result
            assert result["io_errors"] == 0 and result["verified"] > 0, result
            assert result["final_checked"] == result["final_lbas"] > 0, result
            counters.update({"victim_ios": result["writes"] + result["reads"],
                             "victim_verified": result["verified"],
                             "victim_errors": result["errors"],
                             "victim_mismatches": result["mismatches"],
                             "victim_max_stall_ms": result.get("max_stall_ms"),
                             "checks": watch.checks + CHECKS})
    finally:
        for hostile in hostiles:
            hostile.stop()
        if victim is not None:
            victim.stop()
        rig.stop()
        for mem in mems:
            unlink(mem)
    line = json.dumps(counters, sort_keys=True)
    print(f"\nexhaustion counters: {line}")
    try:
        out = ROOT / "artifacts" / "proof"
        os.makedirs(out, exist_ok=True)
        (out / "exhaustion.json").write_text(line + "\n")
    except OSError:
        pass
