"""The operator's view without a browser: Prometheus metrics at ``/metrics`` (scraped from
a real host running a VM under load), the guest IO sampler, and the host's structured
JSON log of a VM start (one line per claim A step, with its ids)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host
from prometheus_client.parser import text_string_to_metric_families

from vfdirect.core.migration.record import MigrationReport, Phase
from vfdirect.host.inventory import HostState, Inventory, MigrationOutcome
from vfdirect.host.metrics import IoSampler, parse_progress_line, vf_latency_buckets

A = ARRAY_WWN.canonical()
pytestmark = pytest.mark.timeout(300)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _scrape(h: Host) -> tuple[Samples, dict[str, str]]:
    """Every sample of the host's /metrics, keyed by (name, sorted labels), and each
    family's type."""
    with h.client() as c:
        text = c.get("/metrics")
    assert isinstance(text, str)
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def _get(samples: Samples, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items()
             if n == name and all(dict(ls).get(k) == val for k, val in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def _start_load_vm(h: Host, name: str = "vm1", workload: str = "load") -> None:
    h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
          "--chunk-blocks", "64")
    h.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256")
    h.cli("vm", "create", name, "--workload", workload)
    h.cli("vm", "attach", name, "d1")
    h.cli("vm", "start", name)


def _wait(predicate: Any, what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_metrics_move_with_the_vms_io(host: Host) -> None:
    _start_load_vm(host)
    # the guest's progress events reach the console at 1 s intervals
    _wait(lambda: "load_progress" in (host.run_dir / "vms/vm1/console.log").read_text(),
          "the guest's first load_progress")
    first, types = _scrape(host)
    assert types["vfdirect_vf_latency_seconds"] == "histogram"
    assert types["vfdirect_vf_ios"] == "counter"
    assert _get(first, "vfdirect_adapter_up", host="h1") == 1.0
    assert _get(first, "vfdirect_vm_state", vm="vm1", state="running") == 1.0
    vf = next(dict(ls)["vf"] for (n, ls), v in first.items()
              if n == "vfdirect_vf_info" and dict(ls).get("vm") == "vm1")
    assert _get(first, "vfdirect_vf_info", vf=vf, state="CONNECTED") == 1.0
    ios1 = _get(first, "vfdirect_vf_ios_total", vm="vm1")

    def moved() -> Samples | None:
        now, _ = _scrape(host)
        return now if _get(now, "vfdirect_vf_ios_total", vm="vm1") > ios1 else None

    second = _wait(moved, "the VF's IO counter to move")
    ios2 = _get(second, "vfdirect_vf_ios_total", vm="vm1")
    reads = _get(second, "vfdirect_vf_reads_total", vm="vm1")
    writes = _get(second, "vfdirect_vf_writes_total", vm="vm1")
    assert reads > 0 and writes > 0 and reads + writes <= ios2
    assert _get(second, "vfdirect_vf_bytes_total", vm="vm1", direction="in") > 0
    # the histogram: cumulative, log2 microsecond bounds, +Inf about the IO count (the
    # adapter counts a command before its latency: a few may be in between)
    buckets = sorted(((float(dict(ls)["le"]), v) for (n, ls), v in second.items()
                      if n == "vfdirect_vf_latency_seconds_bucket"
                      and dict(ls).get("vm") == "vm1"), key=lambda b: b[0])
    assert [le for le, _ in buckets[:3]] == [2e-6, 4e-6, 8e-6]
    assert buckets[-1][0] == float("inf")
    counts = [v for _, v in buckets]
    assert counts == sorted(counts)
    assert 0 < counts[-1] <= ios2 and ios2 - counts[-1] <= 256
    # the guest's own view, from its progress events
    assert _get(second, "vfdirect_vm_guest_iops", vm="vm1", workload="load") > 0
    assert _get(second, "vfdirect_vm_guest_latency_seconds", vm="vm1",
                quantile="0.99") > 0
    assert _get(second, "vfdirect_vm_guest_errors_total", vm="vm1") == 0
    assert _get(second, "vfdirect_pf_admin_requests_total", method="vport_bind") >= 1
    assert _get(second, "vfdirect_fabric_logins", host="h1") >= 2  # physical + vport


def test_migration_metrics_come_from_the_inventory_records(host: Host) -> None:
    """A migration record (as the source host's migration agent writes it) turns into
    outcome counts, a phase-duration histogram and the VM's latest phase durations."""
    ms = 1_000_000
    report = MigrationReport(migration="mig-test1", vm="vmx")
    t = 1_700_000_000_000_000_000
    for phase, length in ((Phase.PREPARE, 20), (Phase.QUIESCE, 1), (Phase.DRAIN, 3),
                          (Phase.HANDOFF, 2)):
        report.enter(phase, t)
        t += length * ms
        report.leave(phase, t)
    report.downtime_ns = 40 * ms
    report.finish("committed")
    with Inventory.open(host.db) as inv:
        inv.host_register("h2")  # a destination that has been and gone
        inv.host_set_state("h2", HostState.DOWN)
        inv.vm_create("vmx", memory_bytes=16 << 20, host="h1")
        inv.migration_begin("mig-test1", "vmx", source="h1", destination="h2")
        inv.migration_update("mig-test1", phases=report.to_dict(),
                             outcome=MigrationOutcome.COMMITTED)
    samples, types = _scrape(host)
    assert types["vfdirect_migration_phase_seconds"] == "histogram"
    assert _get(samples, "vfdirect_migrations_total", outcome="committed") == 1
    assert _get(samples, "vfdirect_migration_last_phase_seconds", vm="vmx",
                phase="prepare") == pytest.approx(0.020)
    assert _get(samples, "vfdirect_migration_last_downtime_seconds",
                vm="vmx") == pytest.approx(0.040)
    assert _get(samples, "vfdirect_migration_phase_seconds_bucket", phase="drain",
                le="0.0025") == 0
    assert _get(samples, "vfdirect_migration_phase_seconds_bucket", phase="drain",
                le="0.005") == 1
    assert _get(samples, "vfdirect_migration_phase_seconds_count", phase="quiesce") == 1


def test_vf_latency_buckets_are_the_adapters_log2_bounds() -> None:
    got = vf_latency_buckets([3, 0, 5, 1])
    assert got == [("2e-06", 3.0), ("4e-06", 3.0), ("8e-06", 8.0), ("+Inf", 9.0)]
    assert vf_latency_buckets([]) == [("+Inf", 0.0)]


def _line(event: str, ts: str, **fields: Any) -> str:
    return json.dumps({"ts": ts, "level": "INFO", "event": event, **fields}) + "\n"


def test_sampler_reads_consoles_incrementally(tmp_path: Path) -> None:
    console = tmp_path / "vms" / "vm1" / "console.log"
    console.parent.mkdir(parents=True)
    console.write_text("boot text line\n"
                       + _line("vm_connected", "2026-01-01T00:00:00.000Z")
                       + _line("verify_progress", "2026-01-01T00:00:01.000Z",
                               writes=100, reads=50, verified=40, errors=0, outstanding=4))
    sampler = IoSampler(tmp_path, "h1")
    sampler.poll()
    first = sampler.samples()["vm1"]
    assert len(first) == 1 and first[0]["iops"] is None  # no rate from one sample
    # a half-written line is kept until its end arrives
    with console.open("a") as f:
        text = _line("verify_progress", "2026-01-01T00:00:03.000Z", writes=300, reads=150,
                     verified=140, errors=0, outstanding=2)
        f.write(text[:20])
        f.flush()
        sampler.poll()
        assert len(sampler.samples()["vm1"]) == 1
        f.write(text[20:])
    sampler.poll()
    got = sampler.samples()["vm1"]
    assert got[-1]["iops"] == 150.0  # 300 more IOs in 2 s
    assert got[-1]["outstanding"] == 2 and got[-1]["host"] == "h1"
    assert sampler.samples(since_ms=got[-1]["t"]) == {}
    # the load workload's events carry their own rate and latency
    with console.open("a") as f:
        f.write(_line("load_progress", "2026-01-01T00:00:04.000Z", iops=999.5, reads=1,
                      writes=1, errors=0, p50_us=100.0, p99_us=900.0))
    sampler.poll()
    last = sampler.latest()["vm1"]
    assert last["iops"] == 999.5 and last["p99_us"] == 900.0
    # a new console (another boot, a file replaced) is read from its start
    console.unlink()
    console.write_text(_line("verify_progress", "2026-01-01T00:01:00.000Z", writes=1,
                             reads=1, verified=0, errors=0, outstanding=0))
    sampler.poll()
    assert sampler.samples()["vm1"][-1]["ios"] == 2


def test_progress_lines_other_than_progress_events_are_ignored() -> None:
    assert parse_progress_line("not json") is None
    assert parse_progress_line('{"event": "verify_progress"}') is None  # no time
    assert parse_progress_line('{"ts": "x", "event": "verify_progress"}') is None
    assert parse_progress_line('{"ts": "2026-01-01T00:00:00.000Z", "event": "other"}') is None
    got = parse_progress_line('{"ts": "2026-01-01T00:00:00.500Z", "event": "load_progress"}')
    assert got is not None and got["t_ms"] == pytest.approx(1767225600500.0)


#: claim A step -> the log lines a VM start leaves for it (event name, ids they carry)
CLAIM_A_LINES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "A1": [("vdisk_create", ("vdisk",))],
    "A3": [("vdisk_attach", ("vm", "vdisk"))],
    "A2": [("mapping_build", ("vm",))],
    "A4": [("mapping_load", ("vm", "vf"))],
    "A5": [("vport_create", ("vm", "vport")), ("fabric_mask_grant", ("vm", "vport"))],
    "A6": [("vport_associate", ("vm", "vport"))],
    "A7": [("vport_bind", ("vm", "vport", "vf"))],
    "A8": [("fwtable_write", ("vm", "vport"))],
}


def test_structured_log_has_one_json_line_per_claim_A_step_with_its_ids(host: Host) -> None:
    _start_load_vm(host, workload="idle")
    shown = host.cli_json("vm", "show", "vm1")
    vm = shown["vm"]
    ids = {"vm": "vm1", "vf": vm["vf"], "vport": vm["vport"],
           "vdisk": shown["disks"][0]["id"]}
    lines = host.events()  # every line of host.log is one JSON object
    raw = (host.run_dir / "host.log").read_text().splitlines()
    assert len(lines) == len([ln for ln in raw if ln.strip()])
    for claim, expected in CLAIM_A_LINES.items():
        for event, keys in expected:
            found = [e for e in lines if e["event"] == event and e.get("claim") == claim
                     and e.get("vm", "vm1") == "vm1"]
            assert len(found) == 1, (claim, event, found)
            line = found[0]
            assert {"ts", "level", "event"} <= line.keys()
            for key in keys:
                assert line.get(key) == ids[key], (claim, event, key, line)
    started = [e for e in lines if e["event"] == "vm_started"]
    assert len(started) == 1 and started[0]["vm"] == "vm1" and started[0]["vf"] == vm["vf"]
