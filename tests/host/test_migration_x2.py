"""Claim X2 end to end: two real hosts whose adapters run VFs with IO threads
(``VFDIRECT_VF_IO_THREADS``, inherited by the adapter) over a deliberately slow SAN (the
storage fault injection, ``VFDIRECT_STORAGE_FAULTS``): a migration whose drain deadline
is far below the LUNs' latency hands the requests still executing in the source VF over
to the mediated path, which re-executes them once the VF reports their stale execution
finished; the migration commits and the guest's ``verify`` workload loses nothing."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host, console_events, wait_verify_progress

from vfdirect.storage import StorageArray
from vfdirect.storage.faults import FAULTS_ENV, clear_lun_faults, set_lun_faults

A = ARRAY_WWN.canonical()
DELAY_MS = 300
pytestmark = pytest.mark.timeout(600)


def _slow(san: StorageArray, delay_ms: int | None) -> None:
    for lun in (0, 1):
        if delay_ms is None:
            clear_lun_faults(san.lun_path(lun))
        else:
            set_lun_faults(san.lun_path(lun), delay_ms=delay_ms)


def test_claim_X2_drain_deadline_falls_back_to_mediated_path(
        tmp_path: Path, san: StorageArray, hosts: list[Host]) -> None:
    env = {FAULTS_ENV: "1", "VFDIRECT_VF_IO_THREADS": "4"}
    db = str(tmp_path / "cluster.db")
    h1 = Host(tmp_path / "run1", "h1", arrays=(san.directory,), db=db, env=env)
    h2 = Host(tmp_path / "run2", "h2", arrays=(san.directory,), db=db, env=env)
    hosts += [h1, h2]
    h1.start()
    h2.start()
    h1.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
           "--chunk-blocks", "64")
    h1.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256")
    h1.cli("vdisk", "create", "d2", "--datastore", "ds0", "--blocks", "256")
    h1.cli("vm", "create", "vm1", "--workload", "verify")
    h1.cli("vm", "attach", "vm1", "d1")
    h1.cli("vm", "attach", "vm1", "d2")
    h1.cli_json("vm", "start", "vm1")
    wait_verify_progress(h1, "vm1")
    try:
        _slow(san, DELAY_MS)  # every IO now takes 300 ms: the guest's are in the VF
        time.sleep(1.0)
        shown: dict[str, Any] = h1.cli_json("vm", "migrate", "vm1", "--to", "h2",
                                            "--drain-timeout", "50")
    finally:
        _slow(san, None)
    assert shown["outcome"] == "committed", shown
    report = shown["report"]
    assert report["drained"] is False, report
    assert report["handed_over_heads"] > 0, report
    # requests still executing in the source VF at the save went over as stale
    # executions: the mediated path waited for the VF to report them finished before
    # re-executing them (those that completed between drain and save were answered by
    # the VF itself; heads the mediated path had not reached when it was stopped go on
    # in the record, to the destination's VF)
    waited = [e for e in h1.events() if e.get("event") == "mediated_wait_stale"]
    done = [e for e in h1.events() if e.get("event") == "mediated_stale_done"]
    assert waited and done and waited[-1]["heads"] == done[-1]["heads"] > 0, \
        sorted({str(e.get("event")) for e in h1.events()})
    assert not [e for e in h1.events() if e.get("event") == "mediated_error"]
    on2 = h2.cli_json("vm", "show", "vm1")
    assert on2["vm"]["host"] == "h2" and on2["vm"]["state"] == "running"
    after = wait_verify_progress(h2, "vm1")
    assert after["errors"] == 0, after
    h2.cli("vm", "stop", "vm1")
    results = [e for e in console_events(h2, "vm1") if e.get("workload") == "verify" and "ok" in e]
    assert results, "no verify result"
    result = results[-1]
    assert result["ok"] and result["errors"] == 0 and result.get("mismatches", 0) == 0, \
        result
