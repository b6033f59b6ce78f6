"""The live-migration fault matrix (claim X1 and the "never two hosts" rule) through
real processes: two ``vfdirect host`` daemons (one shared SQLite inventory, one SAN, one
fabric), a VM under the ``verify`` workload, and at each phase of a migration one fault:
the destination host killed (SIGKILL), the destination VM process killed, the migration
connection cut. The faults are injected with ``VFDIRECT_MIGRATION_FAULTS`` (see
``vfdirect.host.migration.fault_point``): the hosts read the fault list from a file the
test rewrites per case, the migration holds at the chosen point while the test acts.

Before the commit point the outcome is always "aborted, the VM runs on the source, nothing
lost"; after it "committed, the VM runs on the destination, nothing lost". Each case
checks the outcome, the inventory, the VM processes of both hosts (one live ``vm-run``
of the VM, on the right host), the VF tables and fabric logins of both adapters and,
after ``vm stop``, the verify workload's final result (ok, 0 errors, 0 mismatches).
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from host_helpers import (
    ARRAY_WWN,
    Host,
    verify_result,
    wait_gone,
    wait_verify_progress,
)

from vfdirect.host.client import ApiError
from vfdirect.storage import StorageArray
from vfdirect.storage.faults import FAULTS_ENV, clear_lun_faults, set_lun_faults

A = ARRAY_WWN.canonical()
pytestmark = pytest.mark.timeout(300)

#: every bounded wait of this file
WAIT_S = 90.0
#: 32 MiB sparse LUNs
SAN_LUN_BLOCKS = 65536

#: faults injected, checks run, IO in flight at each fault (printed at the end)
COUNTERS: Counter[str] = Counter()
IN_FLIGHT: list[tuple[str, int, int]] = []
MATRIX: list[tuple[str, str, str, str]] = []


# -- the cluster (one per module; each case uses a fresh VM) ------------------------------


@dataclass
class Cluster:
    h1: Host
    h2: Host
    root: Path
    san: StorageArray

    @property
    def spec(self) -> Path:
        return self.root / "faults.spec"

    def faults(self, spec: str) -> None:
        tmp = self.spec.with_suffix(".tmp")
        tmp.write_text(spec)
        tmp.replace(self.spec)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("faults")
    # room for every case's two fresh vdisks (freed blocks are not reused at once)
    san = StorageArray.create(root / "san" / "array0", ARRAY_WWN)
    for _ in range(2):
        san.lun_create(SAN_LUN_BLOCKS, 512)
    db = str(root / "cluster.db")
    env = {"VFDIRECT_MIGRATION_FAULTS": f"@{root / 'faults.spec'}",
           FAULTS_ENV: "1"}
    h1 = Host(root / "run1", "h1", arrays=(san.directory,), db=db, env=env)
    h2 = Host(root / "run2", "h2", arrays=(san.directory,), db=db, env=env)
    started: list[Host] = []
    try:
        for h in (h1, h2):
            started.append(h)
            h.start()
        h1.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
               "--chunk-blocks", "64")
        yield Cluster(h1, h2, root, san)
    finally:
        for h in started:
            h.cleanup()
        _print_counters()


def _print_counters() -> None:
    print("\n-- migration fault matrix --")
    for row in MATRIX:
        print("  {:<12} {:<14} {:<15} {}".format(*row))
    print(f"faults injected: {COUNTERS['faults']}; checks run: {COUNTERS['checks']}; "
          f"guest IO errors while the LUNs failed: "
          f"{COUNTERS['guest_io_errors_while_luns_failed']}")
    for case, outstanding, mediated in IN_FLIGHT:
        print(f"  {case}: IO in flight at the fault {outstanding}, "
              f"mediated requests so far {mediated}")


def check(cond: bool, what: Any) -> None:
    COUNTERS["checks"] += 1
    assert cond, what


_T0 = time.monotonic()


def _mark(what: str) -> None:
    if os.environ.get("VFDIRECT_FAULTS_TRACE"):
        print(f"[{time.monotonic() - _T0:7.2f}] {what}", flush=True)


# -- reading the VM and the adapters ------------------------------------------------------


def vm_processes(h: Host, name: str) -> list[int]:
    """Live ``vm-run`` processes of VM ``name`` whose memory lives in ``h``'s run dir."""
    memory = str(h.run_dir / "vms" / name).encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if state == "Z" or b"vfdirect.cli.vm_run" not in argv:
            continue
        if name.encode() in argv and any(a.startswith(memory) for a in argv):
            out.append(int(entry.name))
    return out


def _wait_for(what: str, fn: Any, timeout: float = WAIT_S) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fn()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def adapter_vms(h: Host) -> dict[int, tuple[str | None, int | None, str]]:
    """The adapter's VF table: VF -> (VM name, VM pid, state)."""
    shown = h.api("GET", "/v1/adapter")
    out = {}
    for v in shown.get("vfs", []):
        vm = v.get("vm") or {}
        out[int(v["vf"])] = (vm.get("name"), vm.get("pid"), str(v["state"]))
    return out


def logins(h: Host) -> list[dict[str, Any]]:
    return list(h.api("GET", "/v1/adapter").get("logins", []))


def vport_names(h: Host, name: str) -> set[str]:
    """The VM's vport WWPN and its alternate (the two port names it may log in with)."""
    shown = h.api("GET", f"/v1/vms/{name}")
    wwpn = shown["vm"]["vport"]
    names = {str(wwpn)}
    for vp in h.api("GET", "/v1/vports"):
        if vp.get("wwpn") == wwpn and vp.get("alternate_wwpn"):
            names.add(str(vp["alternate_wwpn"]))
    return names


# -- one case -----------------------------------------------------------------------------

PRE_COMMIT = [("source", "after_prepare"), ("source", "after_quiesce"),
              ("source", "after_drain"), ("source", "after_handoff"),
              ("source", "precopy_round"), ("source", "after_pause"),
              ("source", "after_end"), ("destination", "after_spawn"),
              ("destination", "after_pages"), ("destination", "after_boot")]
POST_COMMIT = [("source", "after_commit"), ("destination", "after_commit")]
FAULTS = ["kill_dest_host", "kill_dest_vm", "cut"]
#: how long both physical LUNs fail around the fault point (seconds before and after the
#: migration goes on)
LUN_FAIL_S = 0.4
_serial = iter(range(1, 1_000_000))


def start_verify_vm(h: Host, name: str) -> None:
    """A fresh VM (two fresh vdisks) started on ``h`` under ``verify`` (through the API:
    a CLI process per step costs seconds on a loaded machine)."""
    h.api("POST", "/v1/vms", {"name": name, "workload": "verify"})
    for disk in ("a", "b"):
        h.api("POST", "/v1/vdisks", {"datastore": "ds0", "name": f"{name}{disk}",
                                     "capacity_blocks": 256})
        h.api("POST", f"/v1/vms/{name}/attach", {"vdisk": f"{name}{disk}"})
    h.api("POST", f"/v1/vms/{name}/start")
    wait_verify_progress(h, name)


def remove_vm(cl: Cluster, name: str) -> None:
    """Best effort: the VM stopped wherever it is, deleted with its vdisks."""
    for h in (cl.h1, cl.h2):
        with contextlib.suppress(ApiError):
            h.api("POST", f"/v1/vms/{name}/stop")
    with contextlib.suppress(ApiError):
        cl.h1.api("DELETE", f"/v1/vms/{name}")
    for disk in ("a", "b"):
        with contextlib.suppress(ApiError):
            cl.h1.api("DELETE", f"/v1/vdisks/{name}{disk}")


def migration_done(h: Host, ident: str, timeout: float = WAIT_S) -> dict[str, Any]:
    """The finished migration's progress as its source shows it."""
    def done() -> dict[str, Any] | None:
        shown = h.api("GET", f"/v1/migrations/{ident}")
        progress = shown.get("progress") or {}
        return shown if progress.get("done") else None
    shown: dict[str, Any] = _wait_for(f"migration {ident} to end", done, timeout)
    return shown


def assert_vm_on(cl: Cluster, name: str, on: Host, wwpns: set[str]) -> int:
    """VM ``name`` runs on ``on`` only: inventory, processes, VFs, fabric logins."""
    other = cl.h2 if on is cl.h1 else cl.h1
    shown = on.api("GET", f"/v1/vms/{name}")["vm"]
    check(shown["host"] == on.name and shown["state"] == "running", shown)
    pid = int(shown["pid"])
    # one live vm-run of the VM, on ``on``; the other host's is gone (bounded wait: the
    # destination throws its process away on its own thread)
    check(_wait_for(f"{name}'s process on {other.name} to go",
                    lambda: not vm_processes(other, name), 30.0), other.name)
    check(vm_processes(on, name) == [pid], (vm_processes(on, name), pid))
    # the VF tables: one VF of ``on`` serves the VM, none of the other adapter
    table = adapter_vms(on)
    mine = [vf for vf, (vm, _, _) in table.items() if vm == name]
    check(mine == [int(shown["vf"])], (table, shown))
    check(table[mine[0]][1] == pid, (table, pid))
    table = adapter_vms(other)
    check(all(vm != name for vm, _, _ in table.values()), table)
    # the vport: one of its two port names logged in, by ``on``'s adapter
    logged = [lg for lg in logins(on) if lg.get("wwpn") in wwpns]
    check(len(logged) == 1 and int(logged[0]["pid"]) == on.adapter_pid, (logged, wwpns))
    return pid


def finish_verify(cl: Cluster, name: str, on: Host) -> None:
    """The workload goes on where the VM is, and ends ok with nothing lost."""
    wait_verify_progress(on, name)
    on.api("POST", f"/v1/vms/{name}/stop")
    result = verify_result(on, name)
    check(result["ok"] and result["errors"] == 0 and result.get("mismatches", 0) == 0,
          result)


def run_case(cl: Cluster, side: str, point: str, fault: str) -> dict[str, Any]:
    """Migrate a fresh verify VM h1 -> h2, fault ``fault`` at ``side:point``; returns
    the finished migration (the caller checks where the VM is)."""
    h1, h2 = cl.h1, cl.h2
    name = f"m{next(_serial)}"
    hold = cl.root / f"hold-{name}"
    spec = f"{side}:{point}:hold={hold}"
    if fault == "cut":
        spec += f",{side}:{point}:close"
    holds = [hold]
    if (side, point) == ("source", "after_end"):
        # the source sent END: the destination would boot and answer READY while the
        # source waits here (the fault would come after READY); it waits before READY
        holds.append(hold.with_name(hold.name + "-destination"))
        spec += f",destination:after_boot:hold={holds[1]}"
    start_verify_vm(h1, name)
    _mark(f"{name} vm started")
    for h in holds:
        h.touch()
    cl.faults(spec)
    try:
        started = h1.cli_json("vm", "migrate", name, "--to", h2.name, "--no-wait")
        ident = started["migration"]
        for h in holds:
            _wait_for(f"{side}:{point}", h.with_name(h.name + ".reached").exists)
        _mark(f"{name} reached")
        COUNTERS["faults"] += 1
        progress = h1.api("GET", f"/v1/migrations/{ident}").get("progress") or {}
        IN_FLIGHT.append((f"{side}:{point}:{fault}", int(progress.get("outstanding", 0)),
                          int(progress.get("mediated_requests", 0))))
        if fault == "kill_dest_host":
            h2.kill9()
        elif fault == "lun_fail":
            for lun in (0, 1):
                set_lun_faults(cl.san.lun_path(lun), fail="all")
            time.sleep(LUN_FAIL_S)
        elif fault == "kill_dest_vm":
            pids = _wait_for(f"{name}'s process on h2", lambda: vm_processes(h2, name))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            check(all(wait_gone(p, 10.0) for p in pids), pids)
        holds[0].unlink()
        if len(holds) > 1:
            if fault == "cut":
                # the source cuts before the destination answers (else READY may be in
                # the source's socket before it cuts, and it commits: legitimately)
                migration_done(h1, ident)
            holds[1].unlink()
        if fault == "lun_fail":
            time.sleep(LUN_FAIL_S)
            for lun in (0, 1):
                clear_lun_faults(cl.san.lun_path(lun))
        shown = migration_done(h1, ident)
        _mark(f"{name} migration done")
    finally:
        cl.faults("")
        for lun in (0, 1):
            clear_lun_faults(cl.san.lun_path(lun))
        for h in holds:
            with contextlib.suppress(FileNotFoundError):
                h.unlink()
        if wait_gone(h2.pid, 0.0):  # killed: the host comes back (adapter kept)
            h2.start()
    shown["vm_name"] = name
    return shown


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize(("side", "point"), PRE_COMMIT, ids=[f"{s}-{p}" for s, p in PRE_COMMIT])
def test_claim_X1_fault_before_commit_leaves_the_vm_on_the_source(
        cluster: Cluster, side: str, point: str, fault: str) -> None:
    shown = run_case(cluster, side, point, fault)
    name = shown["vm_name"]
    try:
        progress = shown["progress"]
        MATRIX.append((side, point, fault, progress["outcome"]))
        check(progress["outcome"] == "aborted", progress)
        wwpns = vport_names(cluster.h1, name)
        assert_vm_on(cluster, name, cluster.h1, wwpns)
        _mark(f"{name} placement checked")
        finish_verify(cluster, name, cluster.h1)
        _mark(f"{name} verified")
    finally:
        remove_vm(cluster, name)
        _mark(f"{name} removed")


POST_FAULTS = ["kill_dest_host", "cut"]


@pytest.mark.parametrize(("side", "point"), PRE_COMMIT + POST_COMMIT,
                         ids=[f"{s}-{p}" for s, p in PRE_COMMIT + POST_COMMIT])
def test_physical_lun_failure_at_each_phase_loses_nothing(
        cluster: Cluster, side: str, point: str) -> None:
    """Both physical LUNs fail (every IO: MEDIUM ERROR) around a phase of the
    migration. That is no fault of the migration: it ends (committed, or aborted before
    the commit point) with the VM on the one host its outcome says; the guest saw IO
    errors while the LUNs failed, none once they are back, and never a wrong block."""
    shown = run_case(cluster, side, point, "lun_fail")
    name = shown["vm_name"]
    try:
        progress = shown["progress"]
        MATRIX.append((side, point, "lun_fail", progress["outcome"]))
        check(progress["outcome"] in ("committed", "aborted"), progress)
        on = cluster.h2 if progress["outcome"] == "committed" else cluster.h1
        assert_vm_on(cluster, name, on, vport_names(on, name))
        first = wait_verify_progress(on, name)
        later = wait_verify_progress(on, name)
        check(later["io_errors"] == first["io_errors"] and later["mismatches"] == 0,
              (first, later))
        COUNTERS["guest_io_errors_while_luns_failed"] += int(later["io_errors"])
        on.api("POST", f"/v1/vms/{name}/stop")
        result = verify_result(on, name)
        check(result["mismatches"] == 0 and result["unresolved"] == 0 and
              result["io_errors"] == later["io_errors"], result)
    finally:
        remove_vm(cluster, name)


@pytest.mark.parametrize("fault", POST_FAULTS)
@pytest.mark.parametrize(("side", "point"), POST_COMMIT,
                         ids=[f"{s}-{p}" for s, p in POST_COMMIT])
def test_fault_after_commit_leaves_the_vm_on_the_destination(
        cluster: Cluster, side: str, point: str, fault: str) -> None:
    """After the commit point the VM is the destination's: a cut connection does not
    matter, a killed destination host adopts the VM process it had booted when it comes
    back (the source let go of its paused process already)."""
    shown = run_case(cluster, side, point, fault)
    name = shown["vm_name"]
    try:
        progress = shown["progress"]
        MATRIX.append((side, point, fault, progress["outcome"]))
        check(progress["outcome"] == "committed", progress)
        wwpns = vport_names(cluster.h2, name)
        assert_vm_on(cluster, name, cluster.h2, wwpns)
        _mark(f"{name} placement checked")
        finish_verify(cluster, name, cluster.h2)
    finally:
        remove_vm(cluster, name)


@pytest.mark.parametrize(("side", "point"), POST_COMMIT,
                         ids=[f"{s}-{p}" for s, p in POST_COMMIT])
def test_destination_vm_killed_after_commit_is_reported_and_resumed_on_its_memory(
        cluster: Cluster, side: str, point: str) -> None:
    """The commit point passed: the VM is the destination's whatever happens (the
    source let go of it). Its process dying before it resumed the guest is in the
    migration record (``destination_error``) and the events; the guest's memory is
    complete on the destination, so a new process resumes it there (were that to fail
    too, the VM would stay there in ERROR, restartable): nothing is lost."""
    h1, h2 = cluster.h1, cluster.h2
    shown = run_case(cluster, side, point, "kill_dest_vm")
    name = shown["vm_name"]
    try:
        progress = shown["progress"]
        check(progress["outcome"] == "committed", progress)
        ident = shown["id"]

        def settled() -> dict[str, Any] | None:
            vm: dict[str, Any] = h2.api("GET", f"/v1/vms/{name}")["vm"]
            return vm if vm["state"] in ("running", "error") else None
        vm = _wait_for(f"{name} running or in error", settled, 60.0)
        MATRIX.append((side, point, "kill_dest_vm", f"{progress['outcome']}, {vm['state']}"))
        check(vm["host"] == "h2" and vm["state"] == "running", vm)
        record = h2.api("GET", f"/v1/migrations/{ident}")
        check("destination_error" in (record.get("detail") or {}), record)
        events = [e for e in h2.api("GET", f"/v1/events?vm={name}")
                  if e.get("kind") == "vm_migrated_in"]
        check(any((e.get("detail") or {}).get("restarted_after") for e in events), events)
        wwpns = vport_names(h2, name)
        assert_vm_on(cluster, name, h2, wwpns)
        check(not vm_processes(h1, name), name)
        finish_verify(cluster, name, h2)
    finally:
        remove_vm(cluster, name)


def test_vm_migrate_bad_input_is_one_line_and_changes_nothing(cluster: Cluster) -> None:
    h1 = cluster.h1
    name = f"m{next(_serial)}"
    start_verify_vm(h1, name)
    try:
        before = h1.api("GET", f"/v1/vms/{name}")["vm"]
        migrations = len(h1.api("GET", "/v1/migrations"))
        cases = [(("--to", "nosuchhost"), "nosuchhost"), (("--to", "h1"), "h1")]
        for args, word in cases:
            out = h1.cli("vm", "migrate", name, *args, check=False)
            lines = out.stderr.strip().splitlines()
            check(out.returncode != 0 and len(lines) == 1 and
                  lines[0].startswith("vfdirect: error: ") and word in lines[0], out)
        out = h1.cli("vm", "migrate", "nosuchvm", "--to", "h2", check=False)
        lines = out.stderr.strip().splitlines()
        check(out.returncode != 0 and len(lines) == 1 and "nosuchvm" in lines[0], out)
        after = h1.api("GET", f"/v1/vms/{name}")["vm"]
        check((after["host"], after["state"], after["pid"], after["vf"]) ==
              (before["host"], before["state"], before["pid"], before["vf"]), after)
        check(len(h1.api("GET", "/v1/migrations")) == migrations, "a migration record")
        # a stopped VM does not migrate
        h1.api("POST", f"/v1/vms/{name}/stop")
        out = h1.cli("vm", "migrate", name, "--to", "h2", check=False)
        lines = out.stderr.strip().splitlines()
        check(out.returncode != 0 and len(lines) == 1 and "stopped" in lines[0], out)
        after = h1.api("GET", f"/v1/vms/{name}")["vm"]
        check(after["host"] == "h1" and after["state"] == "stopped", after)
        check(len(h1.api("GET", "/v1/migrations")) == migrations, "a migration record")
        check(not vm_processes(cluster.h2, name), name)
    finally:
        remove_vm(cluster, name)


def test_destination_that_lost_its_source_after_ready_gives_up_and_the_commit_is_refused(
        cluster: Cluster) -> None:
    """The connection goes after READY, before COMMIT, while the source (alive, slow)
    still holds READY. The destination does not wait for it: the inventory decides at
    once, and since the source had not committed, "aborted"; the source's commit that
    comes later is refused, so it aborts too and its VM goes on on its VF. Never both
    hosts: the destination threw its VM process away before the source could commit."""
    h1, h2 = cluster.h1, cluster.h2
    name = f"m{next(_serial)}"
    hold = cluster.root / f"hold-{name}"
    start_verify_vm(h1, name)
    hold.touch()
    cluster.faults(f"source:after_ready:close,source:after_ready:hold={hold}")
    try:
        ident = h1.cli_json("vm", "migrate", name, "--to", h2.name, "--no-wait")["migration"]
        _wait_for("source:after_ready", hold.with_name(hold.name + ".reached").exists)
        COUNTERS["faults"] += 1

        def decision() -> str | None:
            detail = h1.api("GET", f"/v1/migrations/{ident}")["detail"]
            return detail.get("decision")
        # decided by the destination alone: the source is still held at READY
        check(_wait_for("the destination's decision", decision) == "aborted", ident)
        check(hold.exists(), "the source moved on")
        hold.unlink()
        shown = migration_done(h1, ident)
    finally:
        cluster.faults("")
        with contextlib.suppress(FileNotFoundError):
            hold.unlink()
    try:
        progress = shown["progress"]
        MATRIX.append(("source", "after_ready", "cut", progress["outcome"]))
        check(progress["outcome"] == "aborted", progress)
        check(shown["detail"].get("decision") == "aborted", shown)
        assert_vm_on(cluster, name, h1, vport_names(h1, name))
        finish_verify(cluster, name, h1)
    finally:
        remove_vm(cluster, name)
