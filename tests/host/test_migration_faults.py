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
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host, make_san, wait_gone

A = ARRAY_WWN.canonical()
pytestmark = pytest.mark.timeout(300)

#: every bounded wait of this file
WAIT_S = 90.0

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
    san = make_san(root / "san")
    db = str(root / "cluster.db")
    env = {"VFDIRECT_MIGRATION_FAULTS": f"@{root / 'faults.spec'}"}
    h1 = Host(root / "run1", "h1", arrays=(san.directory,), db=db, env=env)
    h2 = Host(root / "run2", "h2", arrays=(san.directory,), db=db, env=env)
    started: list[Host] = []
    try:
        for h in (h1, h2):
            started.append(h)
            h.start()
        h1.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
               "--chunk-blocks", "64")
        yield Cluster(h1, h2, root)
    finally:
        for h in started:
            h.cleanup()
        _print_counters()


def _print_counters() -> None:
    print("\n-- migration fault matrix --")
    for row in MATRIX:
        print("  {:<12} {:<14} {:<15} {}".format(*row))
    print(f"faults injected: {COUNTERS['faults']}; checks run: {COUNTERS['checks']}")
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


def _console(h: Host, name: str) -> list[dict[str, Any]]:
    out = []
    path = h.run_dir / "vms" / name / "console.log"
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _wait_progress(h: Host, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
    """Progress lines of the VM's current process on ``h`` show more writes and reads."""
    deadline = time.monotonic() + timeout
    first = len(_console(h, name))
    while True:
        new = [e for e in _console(h, name)[first:] if e.get("event") == "verify_progress"]
        if len(new) >= 2 and new[-1]["writes"] > new[0]["writes"] and \
                new[-1]["verified"] > new[0]["verified"]:
            return new[-1]
        assert time.monotonic() < deadline, f"no verify progress of {name} on {h.name}"
        time.sleep(0.1)


def _result(h: Host, name: str) -> dict[str, Any]:
    results = [e for e in _console(h, name) if e.get("workload") == "verify" and "ok" in e]
    assert results, f"no verify result in {name}'s console on {h.name}"
    return results[-1]


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
    shown = h.cli_json("adapter", "show")
    out = {}
    for v in shown.get("vfs", []):
        vm = v.get("vm") or {}
        out[int(v["vf"])] = (vm.get("name"), vm.get("pid"), str(v["state"]))
    return out


def logins(h: Host) -> list[dict[str, Any]]:
    return list(h.cli_json("adapter", "show").get("logins", []))


def vport_names(h: Host, name: str) -> set[str]:
    """The VM's vport WWPN and its alternate (the two port names it may log in with)."""
    shown = h.cli_json("vm", "show", name)
    wwpn = shown["vm"]["vport"]
    names = {str(wwpn)}
    for vp in h.cli_json("vport", "list"):
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
_serial = iter(range(1, 1_000_000))


def start_verify_vm(h: Host, name: str) -> None:
    h.cli("vm", "create", name, "--workload", "verify")
    for disk in ("a", "b"):
        h.cli("vdisk", "create", f"{name}{disk}", "--datastore", "ds0", "--blocks", "256")
        h.cli("vm", "attach", name, f"{name}{disk}")
    h.cli("vm", "start", name)
    _wait_progress(h, name)


def remove_vm(cl: Cluster, name: str) -> None:
    """Best effort: the VM stopped wherever it is, deleted with its vdisks."""
    for h in (cl.h1, cl.h2):
        h.cli("vm", "stop", name, check=False)
    for h in (cl.h1, cl.h2):
        if h.cli("vm", "delete", name, check=False).returncode == 0:
            break
    for disk in ("a", "b"):
        cl.h1.cli("vdisk", "delete", f"{name}{disk}", check=False)


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
    shown = on.cli_json("vm", "show", name)["vm"]
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
    _wait_progress(on, name)
    on.cli("vm", "stop", name)
    result = _result(on, name)
    check(result["ok"] and result["errors"] == 0 and result.get("mismatches", 0) == 0,
          result)


def run_case(cl: Cluster, side: str, point: str, fault: str) -> dict[str, Any]:
    """Migrate a fresh verify VM h1 -> h2, fault ``fault`` at ``side:point``; returns
    the finished migration (the caller checks where the VM is)."""
    h1, h2 = cl.h1, cl.h2
    name = f"m{next(_serial)}"
    hold = cl.root / f"hold-{name}"
    reached = hold.with_name(hold.name + ".reached")
    spec = f"{side}:{point}:hold={hold}"
    if fault == "cut":
        spec += f",{side}:{point}:close"
    start_verify_vm(h1, name)
    _mark(f"{name} vm started")
    hold.touch()
    cl.faults(spec)
    try:
        started = h1.cli_json("vm", "migrate", name, "--to", h2.name, "--no-wait")
        ident = started["migration"]
        _wait_for(f"{side}:{point}", reached.exists)
        _mark(f"{name} reached")
        COUNTERS["faults"] += 1
        progress = h1.api("GET", f"/v1/migrations/{ident}").get("progress") or {}
        IN_FLIGHT.append((f"{side}:{point}:{fault}", int(progress.get("outstanding", 0)),
                          int(progress.get("mediated_requests", 0))))
        if fault == "kill_dest_host":
            h2.kill9()
        elif fault == "kill_dest_vm":
            pids = _wait_for(f"{name}'s process on h2", lambda: vm_processes(h2, name))
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
            check(all(wait_gone(p, 10.0) for p in pids), pids)
        hold.unlink()
        shown = migration_done(h1, ident)
        _mark(f"{name} migration done")
    finally:
        cl.faults("")
        with contextlib.suppress(FileNotFoundError):
            hold.unlink()
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
