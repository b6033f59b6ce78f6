"""``vfdirect demo``: the main job, a two-host cluster on this machine end to end.

Two ``vfdirect host`` daemons (each with its own adapter) share one inventory (a SQLite
file), one storage array directory and the fabric beside it. The demo creates a
datastore, two VMs with two vdisks each, and prints each step of claim A as the
hypervisor performs it (read back from the inventory's events, ``GET /v1/events``). Both
VMs run the ``verify`` workload (journal-verified IO); one of them live-migrates back and
forth under that IO with a progress display. The final report has IOPS and p50/p99
latency per VM (from the VMs' ``verify_progress`` events), per-phase migration timings
and the verify results; the exit status is 0 only if every check held.

Everything it starts lives under one directory (a temporary one unless ``--dir``): a
SIGINT or SIGTERM, a failure or the end of the run stops the hosts through their API, then
ends by pid whatever process still runs from that directory, and removes a temporary
directory. ``--keep`` leaves the cluster running instead (the first host also serves its
API, and the dashboard, on a loopback TCP port).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import click

from vfdirect.cli.common import SIZE, CliError
from vfdirect.host.client import ApiError, HostClient

#: The steps of claim A the demo shows (docs/host.md, "Claim A, step by step").
CLAIM_A = {
    "A1": "the hypervisor creates a virtual disk",
    "A2": "it builds the mapping info (vdisk -> physical regions, vdisk -> address)",
    "A3": "it allocates the vdisk to the VM",
    "A4": "it sends the VM's mapping to the VF through the PF",
    "A5": "it creates a virtual port (and masks the LUNs to it)",
    "A6": "it associates the vport with the VM's mapping info",
    "A7": "it binds the vport to the VF (fabric login)",
    "A8": "it gives the VM its vdisk addresses (firmware table, page 0)",
}
HOSTS = ("h1", "h2")
VMS = ("vm1", "vm2")
MIGRATING_VM = "vm1"
BLOCK = 512
#: Bounds of the waits of the demo.
HOST_START_S = 90.0
STEP_S = 60.0
MIGRATION_S = 180.0
STOP_S = 30.0
SWEEP_S = 15.0


class DemoError(Exception):
    """A step of the demo could not be done (not a failed check: an error)."""


@dataclass
class Check:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class Options:
    duration: float
    vdisk_size: int
    memory: int
    migrations: int
    directory: Path | None
    keep: bool
    as_json: bool


@dataclass
class Report:
    ok: bool = False
    directory: str = ""
    kept: bool = False
    dashboard: str | None = None
    seconds: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)
    claims: list[dict[str, Any]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    vms: dict[str, dict[str, Any]] = field(default_factory=dict)
    migrations: list[dict[str, Any]] = field(default_factory=list)
    stop_commands: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the VMs' consoles ---------------------------------------------------------------------


def console_events(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The JSON lines of a VM console from byte ``offset``, and the offset after the
    last complete line (a line being written is left for the next call)."""
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    out: list[dict[str, Any]] = []
    for line in data[:end].splitlines():
        if line.startswith(b"{"):
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
    return out, offset + end


def io_summary(progress: list[dict[str, Any]]) -> dict[str, Any]:
    """IOPS and latency of a VM from its ``verify_progress`` events (1 s intervals):
    mean IOPS, the median of the intervals' p50 and p99, the worst interval's p99."""
    intervals = [e for e in progress if "iops" in e and e.get("iops", 0) > 0]
    if not intervals:
        return {"intervals": 0, "iops": 0.0, "p50_us": None, "p99_us": None,
                "worst_p99_us": None}
    return {"intervals": len(intervals),
            "iops": round(statistics.fmean(float(e["iops"]) for e in intervals), 1),
            "p50_us": round(statistics.median(float(e["p50_us"]) for e in intervals), 1),
            "p99_us": round(statistics.median(float(e["p99_us"]) for e in intervals), 1),
            "worst_p99_us": round(max(float(e["p99_us"]) for e in intervals), 1)}


def verify_totals(consoles: list[list[dict[str, Any]]]) -> dict[str, int]:
    """Writes, reads, reads verified and errors of a VM over all its processes (it has
    one per host it ran on, and a new one after each migration): a process's counters
    start at ``verify_started``; its last ``verify_progress`` has its totals."""
    keys = ("writes", "reads", "verified", "errors")
    total = dict.fromkeys(keys, 0)
    for events in consoles:
        last: dict[str, Any] | None = None
        for e in [*events, {"event": "verify_started"}]:
            if e.get("event") == "verify_started":
                if last is not None:
                    for k in keys:
                        total[k] += int(last.get(k, 0))
                last = None
            elif e.get("event") == "verify_progress":
                last = e
    return total


def _us(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} ms" if value >= 1000 else f"{value:.0f} us"


# -- the cluster ---------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cmdline(pid: int) -> list[bytes]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


class Cluster:
    """Two hosts under ``root``: ``san/array0`` (and the fabric beside it), ``h1/`` and
    ``h2/`` (run directories), ``inventory.db`` (shared)."""

    def __init__(self, root: Path, *, api_port: int | None = None) -> None:
        self.root = root
        self.api_port = api_port
        self.db = root / "inventory.db"
        self.array_dir = root / "san" / "array0"
        self.array_wwn = ""
        self._clients: dict[str, HostClient] = {}

    def run_dir(self, host: str) -> Path:
        return self.root / host

    def client(self, host: str) -> HostClient:
        if host not in self._clients:
            self._clients[host] = HostClient(self.run_dir(host) / "api.sock", timeout=STEP_S)
        return self._clients[host]

    def create_array(self) -> str:
        from vfdirect.core.wwn import Wwn  # noqa: PLC0415
        from vfdirect.storage import StorageArray, StorageError  # noqa: PLC0415

        try:
            array = StorageArray.create(self.array_dir,
                                        Wwn.naa5(int.from_bytes(os.urandom(4), "big")))
        except (StorageError, OSError) as exc:
            raise DemoError(f"cannot create the storage array in {self.array_dir}: "
                            f"{exc}") from exc
        self.array_wwn = array.wwn.canonical()
        return self.array_wwn

    def start_host(self, host: str, *, api_port: int | None = None) -> dict[str, Any]:
        """``vfdirect host start`` (the CLI: it daemonizes the host and waits for it)."""
        args = [sys.executable, "-m", "vfdirect.cli.host", "host", "start", "--name", host,
                "--run-dir", str(self.run_dir(host)), "--db", str(self.db),
                "--array", str(self.array_dir), "--log-format", "json", "--vfs", "4"]
        if api_port is not None:
            args += ["--api-port", str(api_port)]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=HOST_START_S,
                                  stdin=subprocess.DEVNULL, check=False,
                                  start_new_session=True)
        except subprocess.TimeoutExpired as exc:
            raise DemoError(f"host {host} did not start in {HOST_START_S:g} s") from exc
        if proc.returncode != 0:
            lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
            raise DemoError(f"host {host} did not start: "
                            f"{lines[-1] if lines else proc.returncode}")
        status: dict[str, Any] = self.client(host).get("/v1/host")
        return status

    def pids(self) -> list[int]:
        """Every live process started from this cluster's directory (its command line
        names a path in it), but this one."""
        prefix = str(self.root).encode()
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            args = _cmdline(int(entry.name))
            if any(a == prefix or a.startswith(prefix + b"/") for a in args):
                out.append(int(entry.name))
        return [p for p in out if _alive(p)]

    def stop(self) -> dict[int, str]:
        """Stop both hosts (their VMs and adapters) through their API, then end by pid
        whatever still runs from the directory. Returns the processes that had to be
        signalled, pid -> what it ran (empty when the hosts stopped everything)."""
        waiting = []
        for host in HOSTS:
            if not (self.run_dir(host) / "api.sock").exists():
                continue
            with contextlib.suppress(ApiError, OSError, KeyError, ValueError):
                c = HostClient(self.run_dir(host) / "api.sock", timeout=STOP_S)
                with c:
                    pid = int(c.get("/v1/host")["pid"])
                    c.post("/v1/host/stop", {"keep_running": False})
                    waiting.append(pid)
        deadline = time.monotonic() + STOP_S
        while any(_alive(p) for p in waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        signalled: dict[int, str] = {}
        for sig, wait_s in ((signal.SIGTERM, SWEEP_S), (signal.SIGKILL, 5.0)):
            deadline = time.monotonic() + wait_s
            while True:
                left = self.pids()
                if not left:
                    return signalled
                for pid in left:
                    if pid not in signalled or sig == signal.SIGKILL:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, sig)
                    if pid not in signalled:
                        args = [a.decode(errors="replace") for a in _cmdline(pid)]
                        module = args.index("-m") + 1 if "-m" in args else len(args)
                        name = args.index("--name") + 1 if "--name" in args else len(args)
                        signalled[pid] = " ".join(args[i] for i in (module, name)
                                                  if i < len(args)) or "?"
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.1)
        return signalled


# -- the run -------------------------------------------------------------------------------


class Demo:
    def __init__(self, cluster: Cluster, opts: Options,
                 say: Callable[..., None]) -> None:
        self.cluster = cluster
        self.opts = opts
        self.say = say
        self.report = Report(directory=str(cluster.root), options={
            "duration_s": opts.duration, "migrations": opts.migrations,
            "vdisk_size": opts.vdisk_size, "memory": opts.memory})
        self.last_event = 0
        self.where = {"vm1": "h1", "vm2": "h2"}
        self.vports: dict[str, str] = {}
        self.vdisks: dict[str, list[str]] = {vm: [] for vm in VMS}
        self.tty = (sys.stderr if opts.as_json else sys.stdout).isatty()

    # -- helpers ---------------------------------------------------------------------

    def api(self, host: str, method: str, path: str, body: Any = None) -> Any:
        c = self.cluster.client(host)
        try:
            if method == "GET":
                return c.get(path)
            return c.post(path, body)
        except ApiError as exc:
            raise DemoError(f"{method} {path} on {host}: {exc.message}") from exc

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        self.report.checks.append(Check(name, ok, detail))
        mark = click.style(" ok ", fg="green") if ok else click.style("FAIL", fg="red")
        self.say(f"  [{mark}] {name}{': ' + detail if detail else ''}")
        return ok

    def events(self) -> list[dict[str, Any]]:
        """The inventory's events since the last call (one inventory for both hosts)."""
        got: list[dict[str, Any]] = self.api("h1", "GET", f"/v1/events?after="
                                             f"{self.last_event}&limit=10000")
        if got:
            self.last_event = max(int(e["id"]) for e in got)
        return got

    def show_claims(self) -> None:
        for e in self.events():
            claim = e.get("claim")
            if not claim or not str(claim).startswith("A"):
                continue
            self.report.claims.append(e)
            self.say(f"    {click.style(claim, bold=True)} {e['kind']:<17} "
                     f"{self._describe(e)}")

    @staticmethod
    def _describe(e: dict[str, Any]) -> str:
        d = e.get("detail") or {}
        who = f"[{e['host']}] " if e.get("host") else ""
        kind = e["kind"]
        if kind == "vdisk_create":
            extents = ", ".join(f"LUN {x['lun']} blocks {x['start']}+{x['count']}"
                                for x in d.get("extents", []))
            return (f"{who}{e.get('vdisk')} '{d.get('name')}' on {d.get('datastore')}, "
                    f"{d.get('capacity_blocks')} blocks -> {extents}")
        if kind == "vdisk_attach":
            return f"{who}{e.get('vdisk')} -> {e.get('vm')} at target {d.get('target')} " \
                   f"LUN {d.get('lun')}"
        if kind == "mapping_build":
            parts = [f"{v['vdisk']}@{v['target']}:{v['lun']} -> "
                     + "+".join(f"LUN{x['lun']}[{x['start']}..+{x['count']}]"
                                for x in v.get("extents", []))
                     for v in d.get("vdisks", [])]
            return f"{who}{e.get('vm')}: " + "; ".join(parts)
        if kind == "mapping_load":
            return f"{who}{e.get('vm')}: PF mapping_load to VF {d.get('vf')} " \
                   f"({d.get('luns')} LUNs, generation {d.get('mapping_generation')})"
        if kind == "vport_create":
            return f"{who}WWPN {e.get('vport')} (WWNN {d.get('wwnn')}, alternate " \
                   f"{d.get('alternate_wwpn')})"
        if kind == "fabric_mask_grant":
            luns = ", ".join(f"{a}:{lun}" for a, nums in (d.get("luns") or {}).items()
                             for lun in nums)
            return f"{who}zone {d.get('zone')}: LUN {luns} masked to {e.get('vport')}"
        if kind == "vport_associate":
            return f"{who}{e.get('vport')} <-> {e.get('vm')}'s mapping info"
        if kind == "vport_bind":
            return f"{who}{e.get('vport')} -> VF {d.get('vf')}, logged in as N_Port " \
                   f"{d.get('nport_id')}"
        if kind == "fwtable_write":
            addrs = ", ".join(f"{t}:{lun}" for t, lun in d.get("addresses", []))
            return f"{who}{e.get('vm')} page 0: addresses (target:LUN) {addrs}"
        return who + " ".join(f"{k}={v}" for k, v in d.items())

    def console(self, vm: str, host: str) -> Path:
        return self.cluster.run_dir(host) / "vms" / vm / "console.log"

    def wait_progress(self, vm: str, host: str, offset: int,
                      timeout: float = STEP_S) -> dict[str, Any]:
        """Two ``verify_progress`` events of the VM's process on ``host`` after byte
        ``offset`` of its console, the second with more writes and more reads verified."""
        deadline = time.monotonic() + timeout
        seen: list[dict[str, Any]] = []
        path = self.console(vm, host)
        while True:
            got, offset = console_events(path, offset)
            for e in got:
                if e.get("event") == "verify_progress":
                    seen.append(e)
                elif e.get("workload") == "verify" and "ok" in e:
                    raise DemoError(f"{vm} stopped its workload on {host}: {e}")
            if len(seen) >= 2 and seen[-1]["writes"] > seen[0]["writes"] and \
                    seen[-1]["verified"] > seen[0]["verified"]:
                return seen[-1]
            if time.monotonic() >= deadline:
                raise DemoError(f"{vm} shows no verify progress on {host} in "
                                f"{timeout:g} s; see {path}")
            time.sleep(0.1)

    def io_line(self) -> str:
        parts = []
        for vm in VMS:
            events, _ = console_events(self.console(vm, self.where[vm]))
            last = [e for e in events if e.get("event") == "verify_progress" and "iops" in e]
            if last:
                e = last[-1]
                parts.append(f"{vm}@{self.where[vm]} {e['iops']:.0f} IOPS, p50 "
                             f"{_us(e['p50_us'])}, p99 {_us(e['p99_us'])}, "
                             f"{e['verified']} reads verified, {e['errors']} errors")
        return "; ".join(parts)

    # -- the steps ---------------------------------------------------------------------

    def run(self) -> Report:
        t0 = time.monotonic()
        say = self.say
        say(click.style("vfdirect demo", bold=True) + ": two hosts, one SAN, two VMs with "
            "direct access through SR-IOV VFs, live migration under verified IO")
        say(f"directory: {self.cluster.root}")
        wwn = self.cluster.create_array()
        say(f"storage array {wwn} in {self.cluster.array_dir}")
        for host in HOSTS:
            port = self.cluster.api_port if host == "h1" else None
            st = self.api_status(self.cluster.start_host(host, api_port=port))
            say(f"host {host} started: {st}")
        if self.cluster.api_port is not None:
            self.report.dashboard = f"http://127.0.0.1:{self.cluster.api_port}/dashboard"
            say(f"dashboard: {self.report.dashboard}")
        self.events()  # host registration etc.: not claim steps
        self.setup_storage()
        for vm in VMS:
            self.setup_vm(vm)
        self.check_claims()
        t_io = time.monotonic()
        self.migrate_under_io(t_io)
        self.finish()
        self.report.seconds = round(time.monotonic() - t0, 1)
        self.report.ok = all(c.ok for c in self.report.checks)
        return self.report

    @staticmethod
    def api_status(status: dict[str, Any]) -> str:
        return f"pid {status['pid']}, adapter pid {status['adapter']['pid']}"

    def setup_storage(self) -> None:
        o = self.opts
        a = self.cluster.array_wwn
        # two LUNs, each holding a VM's pair of vdisks and a chunk more: the allocator
        # spreads the four vdisks over both
        lun_bytes = 2 * o.vdisk_size + (4 << 20)
        for _ in range(2):
            self.api("h1", "POST", "/v1/luns", {"array": a, "num_blocks": lun_bytes // BLOCK,
                                                 "block_size": BLOCK})
        ds = self.api("h1", "POST", "/v1/datastores", {
            "name": "ds0", "luns": [f"{a}:0", f"{a}:1"], "block_size": BLOCK})
        self.events()
        self.say(f"datastore ds0: 2 physical LUNs of {lun_bytes >> 20} MiB, "
                 f"{ds['total_blocks']} blocks, chunks of {ds['chunk_blocks']}")
        self.say(click.style("claim A: configuring two VMs for virtual target addressing",
                             bold=True))
        for vm in VMS:
            for i in range(2):
                made = self.api("h1", "POST", "/v1/vdisks", {
                    "datastore": "ds0", "name": f"{vm}-disk{i}",
                    "capacity_blocks": o.vdisk_size // BLOCK, "thin": False})
                self.vdisks[vm].append(str(made["id"]))
        self.show_claims()

    def setup_vm(self, vm: str) -> None:
        host = self.where[vm]
        self.api(host, "POST", "/v1/vms", {"name": vm, "memory_bytes": self.opts.memory,
                                           "workload": "verify"})
        self.events()
        self.say(f"  {vm} defined on {host} ({self.opts.memory >> 20} MiB, workload verify)")
        for i in range(2):
            self.api(host, "POST", f"/v1/vms/{vm}/attach", {"vdisk": f"{vm}-disk{i}"})
        self.show_claims()
        offset = console_events(self.console(vm, host))[1]
        self.say(f"  starting {vm} on {host}")
        self.api(host, "POST", f"/v1/vms/{vm}/start", {})
        self.show_claims()
        shown = self.api(host, "GET", f"/v1/vms/{vm}")
        self.vports[vm] = str(shown["vm"].get("vport") or "")
        vf_map, inv_map = shown.get("vf_mapping"), shown.get("inventory_mapping")
        self.check(f"{vm}: the VF's mapping (read back through the PF) is the inventory's",
                   vf_map is not None and vf_map == inv_map,
                   f"VF {shown['vm'].get('vf')}, vport {self.vports[vm]}")
        recorded = sorted((int(d["address"]["target"]), int(d["address"]["lun"]))
                          for d in shown["disks"] if d.get("address"))
        scanned = self.scanned(vm, host, offset)
        self.check(f"{vm}: the guest found exactly the addresses the hypervisor gave it",
                   scanned == recorded and len(recorded) == 2,
                   "scan " + ", ".join(f"{t}:{lun}" for t, lun in scanned))
        first = self.wait_progress(vm, host, offset)
        self.say(f"  {vm} runs verify through its VF: {first['writes']} writes, "
                 f"{first['verified']} reads verified")

    def scanned(self, vm: str, host: str, offset: int) -> list[tuple[int, int]]:
        deadline = time.monotonic() + STEP_S
        while time.monotonic() < deadline:
            for e in console_events(self.console(vm, host), offset)[0]:
                if e.get("event") == "vm_scanned":
                    return sorted((int(d["target"]), int(d["lun"])) for d in e["disks"])
            time.sleep(0.05)
        return []

    def check_claims(self) -> None:
        for vm in VMS:
            seen = {e["claim"] for e in self.report.claims
                    if e.get("vm") == vm or (e.get("vport") and e.get("vport") ==
                                             self.vports.get(vm))
                    or e.get("vdisk") in self.vdisks[vm]}
            missing = sorted(set(CLAIM_A) - seen)
            self.check(f"{vm}: claim steps A1-A8 performed by the hypervisor", not missing,
                       "missing " + ", ".join(missing) if missing else
                       " ".join(sorted(seen)))

    def migrate_under_io(self, t_io: float) -> None:
        o = self.opts
        n = o.migrations
        if n:
            times = "once" if n == 1 else f"{n} times"
            self.say(click.style(f"claim B: live-migrating {MIGRATING_VM} {times} under "
                                 "verified IO", bold=True))
        gap = o.duration / (n + 1)
        for i in range(n):
            self.sleep_until(t_io + (i + 1) * gap)
            src = self.where[MIGRATING_VM]
            dst = HOSTS[1] if src == HOSTS[0] else HOSTS[0]
            self.say(f"migration {i + 1}/{n}: {MIGRATING_VM} {src} -> {dst}   "
                     f"(IO: {self.io_line()})")
            if not self.migrate(MIGRATING_VM, src, dst):
                state = self.vm_state(MIGRATING_VM)
                if state != "running":
                    self.check(f"{MIGRATING_VM} runs after the failed migration", False,
                               f"it is {state} on {self.where[MIGRATING_VM]}; no more "
                               "migrations")
                    break
                undone = self.report.migrations[-1]["outcome"] != "committed"
                self.say(f"  {MIGRATING_VM} still runs on {self.where[MIGRATING_VM]}"
                         + (" (the migration was undone)" if undone else ""))
        self.sleep_until(t_io + o.duration)

    def vm_state(self, vm: str) -> str:
        """The VM's state, and where it is, from the shared inventory."""
        shown = self.api(self.where[vm], "GET", f"/v1/vms/{vm}")
        self.where[vm] = str(shown["vm"].get("host") or self.where[vm])
        return str(shown["vm"]["state"])

    def sleep_until(self, when: float) -> None:
        """Wait, showing the VMs' IO: on a terminal a line updated every second, else
        a line every 5 s of a longer wait."""
        every = 1.0 if self.tty else 5.0
        shown = False
        next_line = time.monotonic() + every
        while True:
            now = time.monotonic()
            if now >= when:
                break
            if now >= next_line:
                line = "  IO: " + self.io_line()
                if self.tty:
                    self.say("\r\x1b[K" + line, nl=False)
                    shown = True
                else:
                    self.say(line)
                next_line = now + every
            time.sleep(min(when - now, 0.25))
        if shown:
            self.say("\r\x1b[K", nl=False)

    def migrate(self, vm: str, src: str, dst: str) -> bool:
        """Migrate ``vm`` (following the migration's progress); whether it committed."""
        offset = console_events(self.console(vm, dst))[1]
        self.events()
        started = self.api(src, "POST", f"/v1/vms/{vm}/migrate", {"to": dst})
        ident = started["migration"]
        deadline = time.monotonic() + MIGRATION_S
        last = ""
        while True:
            shown = self.api(src, "GET", f"/v1/migrations/{ident}")
            p = shown.get("progress") or {}
            line = (f"  {ident} {p.get('phase', shown['outcome']):<11} round "
                    f"{p.get('round', 0)}, {p.get('bytes_sent', 0) / 2**20:5.1f} MiB sent, "
                    f"dirty {p.get('dirty_pages', 0)} pages, outstanding IO "
                    f"{p.get('outstanding', 0)}, mediated {p.get('mediated_requests', 0)} "
                    f"requests")
            if line != last:
                if self.tty:
                    self.say("\r\x1b[K" + line, nl=False)
                else:
                    self.say(line)
                last = line
            if shown["outcome"] != "running" or p.get("done"):
                break
            if time.monotonic() > deadline:
                raise DemoError(f"migration {ident} still runs after {MIGRATION_S:g} s")
            time.sleep(0.2)
        if self.tty:
            self.say("")
        report = shown.get("report") or {}
        phases = {str(name): ms for name, ms in report.get("summary", [])}
        downtime = report.get("downtime_ns")
        record = {"id": ident, "vm": vm, "source": src, "destination": dst,
                  "outcome": shown["outcome"],
                  "downtime_ms": None if downtime is None else round(downtime / 1e6, 1),
                  "phases_ms": {k: None if v is None else round(float(v), 1)
                                for k, v in phases.items()},
                  "outstanding_at_quiesce": report.get("outstanding_at_quiesce"),
                  "precopy_rounds": len(report.get("precopy_rounds", [])),
                  "worst_stall_ms": report.get("worst_stall_ms"),
                  "mediated_requests": p.get("mediated_requests")}
        self.report.migrations.append(record)
        self.say("    phases: " + ", ".join(f"{k} {'-' if v is None else f'{v:.0f}'}"
                                            for k, v in record["phases_ms"].items())
                 + f" ms; downtime {record['downtime_ms']} ms")
        steps = [f"{e['claim']} {e['kind'].removeprefix('migration_')}" for e in self.events()
                 if e.get("claim") and e.get("vm") == vm and e["claim"][0] in "BX"]
        if steps:
            self.say("    steps: " + ", ".join(steps))
        committed = shown["outcome"] == "committed"
        self.check(f"migration {ident} {src} -> {dst} committed", committed,
                   "" if committed else str(report.get("error") or shown["outcome"]))
        if not committed:
            return False
        self.where[vm] = dst
        try:
            after = self.wait_progress(vm, dst, offset)
        except DemoError as exc:
            return self.check(f"{vm} continues its IO on {dst}", False, str(exc))
        return self.check(f"{vm} continues its IO on {dst}", after["errors"] == 0,
                          f"{after['writes']} writes, {after['verified']} reads verified, "
                          f"{after['errors']} errors")

    def finish(self) -> None:
        self.say(click.style("stopping the VMs: each reads back every block it wrote",
                             bold=True))
        for vm in VMS:
            host = self.where[vm]
            try:
                state = self.vm_state(vm)
                host = self.where[vm]
                if state != "running":
                    raise DemoError(f"{vm} is {state} on {host}")
                self.api(host, "POST", f"/v1/vms/{vm}/stop", {})
                result = self.verify_result(vm, host)
            except DemoError as exc:
                result = {"ok": False, "error_details": [str(exc)]}
            consoles = [console_events(self.console(vm, h))[0] for h in HOSTS]
            summary = io_summary([e for events in consoles for e in events
                                  if e.get("event") == "verify_progress"])
            self.report.vms[vm] = {"host": host, **summary, "totals": verify_totals(consoles),
                                   "verify": {k: result.get(k) for k in (
                                       "ok", "writes", "reads", "verified", "errors",
                                       "mismatches", "io_errors", "final_checked",
                                       "max_stall_ms")}}
            ok = bool(result.get("ok")) and result.get("errors") == 0
            self.check(f"{vm}: verify result", ok,
                       f"{result.get('verified')} reads verified, final pass "
                       f"{result.get('final_checked')} blocks, {result.get('mismatches')} "
                       f"mismatches, {result.get('io_errors')} IO errors"
                       + ("" if ok else f"; {result.get('error_details')}"))
            self.check(f"{vm}: IO measured", summary["intervals"] > 0,
                       f"{summary['intervals']} intervals")

    def verify_result(self, vm: str, host: str) -> dict[str, Any]:
        deadline = time.monotonic() + STEP_S
        while True:
            results = [e for e in console_events(self.console(vm, host))[0]
                       if e.get("workload") == "verify" and "ok" in e]
            if results:
                return results[-1]
            if time.monotonic() >= deadline:
                raise DemoError(f"no verify result from {vm} on {host}")
            time.sleep(0.1)

    def restart_vms(self) -> None:
        """Start the VMs again (a fresh verify run each) for the cluster left running."""
        for vm in VMS:
            try:
                self.api(self.where[vm], "POST", f"/v1/vms/{vm}/start", {})
            except DemoError as exc:
                self.say(f"  {vm} not restarted: {exc}")
            else:
                self.say(f"  {vm} runs verify again on {self.where[vm]}")


def print_report(report: Report, say: Callable[..., None]) -> None:
    say(click.style("report", bold=True))
    say(f"  {'VM':<5}{'host':<6}{'IOPS':>7}{'p50':>10}{'p99':>10}{'worst p99':>11}"
        f"{'writes':>9}{'verified':>10}{'errors':>7}  verify")
    for vm, r in report.vms.items():
        t, v = r["totals"], r["verify"]
        say(f"  {vm:<5}{r['host']:<6}{r['iops']:>7.0f}{_us(r['p50_us']):>10}"
            f"{_us(r['p99_us']):>10}{_us(r['worst_p99_us']):>11}{t['writes']:>9}"
            f"{t['verified']:>10}{t['errors']:>7}  {'ok' if v.get('ok') else 'FAILED'}")
    say("  (IOPS: mean of the 1 s intervals; p50, p99: their median; worst p99: the worst "
        "interval; counts: all of the VM's processes)")
    if report.migrations:
        phases: list[str] = []
        for m in report.migrations:
            phases += [p for p in m["phases_ms"] if p not in phases]
        say("  " + f"{'migration':<16}{'route':<8}{'outcome':<10}{'downtime':>9}"
            + "".join(f"{p:>{max(8, len(p)) + 1}}" for p in phases) + "  (ms)")
        for m in report.migrations:
            cells = ["-" if m["phases_ms"].get(p) is None else f"{m['phases_ms'][p]:.1f}"
                     for p in phases]
            say("  " + f"{m['id']:<16}{m['source'] + '->' + m['destination']:<8}"
                f"{m['outcome']:<10}{m['downtime_ms'] or '-':>9}"
                + "".join(f"{c:>{max(8, len(p)) + 1}}" for c, p in zip(cells, phases,
                                                                       strict=True)))
    passed = sum(c.ok for c in report.checks)
    failed = len(report.checks) - passed
    say(f"{passed} checks passed, {failed} failed, in {report.seconds:g} s: "
        + (click.style("OK", fg="green") if report.ok else click.style("FAILED", fg="red")))


@contextlib.contextmanager
def _interrupt_on_sigterm() -> Iterator[None]:
    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(opts: Options, say: Callable[..., None]) -> Report:
    """Run the demo; tear the cluster down unless it succeeded with ``keep``."""
    if opts.directory is not None:
        root = opts.directory.absolute()
        if root.exists() and (not root.is_dir() or any(root.iterdir())):
            raise CliError(f"--dir {root} is not an empty directory")
        root.mkdir(parents=True, exist_ok=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="vfdirect-demo-"))
    root = root.resolve()  # as the hosts name it in their command lines
    cluster = Cluster(root, api_port=_free_port() if opts.keep else None)
    demo = Demo(cluster, opts, say)
    kept = False
    try:
        with _interrupt_on_sigterm():
            try:
                report = demo.run()
            except KeyboardInterrupt:
                say("\ninterrupted: stopping the cluster")
                raise
            except (DemoError, ApiError, OSError) as exc:
                raise CliError(str(exc)) from exc
            if opts.keep:
                demo.restart_vms()
                report.kept = kept = True
                report.stop_commands = [
                    f"vfdirect host stop --run-dir {cluster.run_dir(h)}" for h in HOSTS]
                if opts.directory is None:
                    report.stop_commands.append(f"rm -r {root}")
            return report
    finally:
        if not kept:
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            try:
                ended = cluster.stop()
                if ended:
                    say(f"ended {len(ended)} process(es) the hosts left: "
                        + ", ".join(f"{pid} ({what})" for pid, what in ended.items()))
                if opts.directory is None:
                    shutil.rmtree(root, ignore_errors=True)
            finally:
                signal.signal(signal.SIGINT, previous)


@click.command()
@click.option("--duration", type=click.FloatRange(2.0, 86400.0), default=16.0,
              show_default=True, help="Seconds of verified IO (the migrations are spread "
                                      "over it).")
@click.option("--vdisk-size", type=SIZE, default="8MiB", show_default=True,
              help="Size of each of the four vdisks.")
@click.option("--memory", type=SIZE, default="16MiB", show_default=True,
              help="Guest memory of each VM (copied at each migration).")
@click.option("--migrations", type=click.IntRange(0, 1000), default=4, show_default=True,
              help="Live migrations of vm1, alternately h1 -> h2 and back.")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
              help="Build the cluster in this (new or empty) directory and keep it; "
                   "default: a temporary directory, removed at the end.")
@click.option("--keep", is_flag=True,
              help="Leave the cluster running (dashboard on a loopback TCP port) and print "
                   "how to stop it.")
@click.option("--json", "as_json", is_flag=True, help="Print the final report as JSON.")
def demo(  # noqa: PLR0917 (click passes one argument per option)
    duration: float, vdisk_size: int, memory: int, migrations: int,
    directory: Path | None, keep: bool, as_json: bool,
) -> int:
    """Run the main job: a two-host cluster on this machine, end to end.

    Starts two hosts sharing an inventory and a file-backed storage array, creates a
    datastore and two VMs with two vdisks each (printing each claim-A step the hypervisor
    performs), runs the verify workload on both, live-migrates vm1 back and forth under
    that IO, and prints a report: IOPS and latency per VM, per-phase migration timings,
    verify results. Exits 0 only if every check held. Ctrl-C stops everything."""
    if vdisk_size < 1 << 20 or vdisk_size % BLOCK:
        raise CliError(f"--vdisk-size {vdisk_size} must be a multiple of {BLOCK} bytes and "
                       "at least 1MiB")
    if memory < 4 << 20 or memory % 4096:
        raise CliError(f"--memory {memory} must be a multiple of 4KiB and at least 4MiB")
    opts = Options(duration=duration, vdisk_size=vdisk_size, memory=memory,
                   migrations=migrations, directory=directory, keep=keep, as_json=as_json)

    def say(text: str = "", nl: bool = True) -> None:
        click.echo(text, nl=nl, err=as_json)

    report = run_demo(opts, say)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, default=str))
    else:
        print_report(report, say)
    if report.kept:
        say(f"the cluster keeps running in {report.directory}")
        if report.dashboard:
            say(f"dashboard: {report.dashboard}   metrics: "
                f"{report.dashboard.removesuffix('/dashboard')}/metrics")
        say("stop it with:")
        for cmd in report.stop_commands:
            say(f"  {cmd}")
    return 0 if report.ok else 1
