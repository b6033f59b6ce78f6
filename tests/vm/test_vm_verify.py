"""The ``verify`` and ``load`` workloads over the adapter's own VF (real processes): a
bounded verify run, then a continuous one killed with -9 mid-run, then a run restarted
on the same memory: every read matches the journal of acknowledged writes (the latest
generation of the LBA, or zeros), across both kills. Also the ``load`` mix."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
from daemon_helpers import Daemon
from test_vm_adapter import _journal, assign, fwtable, prepare, wait_vf
from vm_helpers import VmProc

from vfdirect.adapter.pf_client import PfClient
from vfdirect.storage import StorageArray

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("vfdirect.adapter.vf") is None,
    reason="the adapter's VF data path (vfdirect.adapter.vf) is missing")

TIMEOUT_S = 15.0


def _progress(vm: VmProc) -> list[dict[str, object]]:
    return [e for e in vm.events() if e["event"] == "verify_progress"]


def test_verify_bounded_then_kill9_and_restart_over_the_vf(
        tmp_path: Path, san: StorageArray, adapter: Daemon, memfile: Path,
        vms: list[VmProc]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        doc = prepare(pf, san, masked=(0, 1, 2))
        table = tmp_path / "fw.json"
        table.write_text(json.dumps(fwtable(doc, str(adapter.run_dir / "vf0.sock")).dump()))
        common = ["--memory-file", str(memfile), "--workload", "verify", "--depth", "4",
                  "--window", "48", "--progress-ms", "100", "--paused"]

        def run(name: str, *extra: str) -> VmProc:
            if pf.vf_get(0)["vm"] is not None:
                pf.vf_unassign(0)
            vm = VmProc(tmp_path, name, *common, *extra)
            vms.append(vm)
            vm.wait_event("vm_paused")
            assign(pf, vm.pid, doc)
            vm.go()
            return vm

        # 1. bounded: 400 IOs, then the final read-back pass
        # a small journal (2046 entries): the continuous run must compact it
        first = run("vm1", "--memory-size", "8MiB", "--fwtable", str(table), "--count", "400",
                    "--journal-size", "64KiB")
        code, result = first.result()
        assert code == 0, result
        assert result["ok"] and result["errors"] == 0 and result["mismatches"] == 0, result
        assert result["writes"] > 0 and result["verified"] > 0
        assert result["final_checked"] == result["final_lbas"] > 0
        assert result["journal"]["acked"] == result["writes"]
        wait_vf(pf, "ASSIGNED")
        # 2. continuous, killed with -9 while IO is in flight, after a checkpoint or two
        second = run("vm2", "--restart")
        deadline = time.monotonic() + 90
        while not [e for e in second.events() if e["event"] == "verify_checkpoint"] or \
                int(str(_progress(second)[-1]["writes"])) < 2600:
            assert time.monotonic() < deadline and second.proc.poll() is None, \
                second.err_path.read_text()[-3000:]
            time.sleep(0.02)
        second.kill9()
        assert any(int(str(e["verified"])) > 0 for e in _progress(second))
        assert all(int(str(e["errors"])) == 0 for e in _progress(second))
        assert _journal(memfile)["acked"] > 0  # the journal survives the kill, compacted
        wait_vf(pf, "ASSIGNED")
        # 3. restarted on the same memory: the journal carries on, nothing mismatches
        third = run("vm3", "--restart", "--count", "400")
        code, result3 = third.result(timeout=120)
        assert code == 0, result3
        assert result3["ok"] and result3["mismatches"] == 0 and result3["io_errors"] == 0
        assert result3["verified"] > 0 and result3["boot_count"] == 3
        assert result3["final_checked"] == result3["final_lbas"]
        assert result3["journal"]["pending"] == 0 and result3["journal"]["failed"] == 0


def test_load_mix_over_the_vf(tmp_path: Path, san: StorageArray, adapter: Daemon,
                              memfile: Path, vms: list[VmProc]) -> None:
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        doc = prepare(pf, san, masked=(0, 1, 2))
        table = tmp_path / "fw.json"
        table.write_text(json.dumps(fwtable(doc, str(adapter.run_dir / "vf0.sock")).dump()))
        vm = VmProc(tmp_path, "vm", "--memory-file", str(memfile), "--memory-size", "8MiB",
                    "--fwtable", str(table), "--workload", "load", "--read-pct", "70",
                    "--depth", "8", "--bs", "8", "--count", "600", "--progress-ms", "100",
                    "--paused")
        vms.append(vm)
        vm.wait_event("vm_paused")
        assign(pf, vm.pid, doc)
        vm.go()
        code, result = vm.result()
        assert code == 0, result
        assert result["ok"] and result["ios"] == 600 and result["errors"] == 0, result
        assert result["reads"] > result["writes"] > 0 and result["iops"] > 0
        assert 0 < result["latency"]["p50_us"] <= result["latency"]["p99_us"]
        io = dict(pf.adapter_get_stats()["vfs"][0]["io"] or {})
        assert io["writes"] == result["writes"]
