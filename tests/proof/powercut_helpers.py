"""Helpers of the power-cut suite: real adapter and VM processes started from a
pre-imported fork server (each restart costs milliseconds, not a Python start-up), the
PF configuration of one VM with two virtual disks, and the cut itself: SIGKILL of the
adapter and the VM at a random point while verify writes with FUA and flushes, with the
next VM (on fresh memory) reading every block back against the journal of the cut."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.context
import multiprocessing.forkserver
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_TESTS = Path(__file__).resolve().parents[1]
for _sub in ("adapter", "vm"):
    if str(_TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(_TESTS / _sub))

from daemon_helpers import ARRAY_WWN, datastore, entry  # noqa: E402
from vm_helpers import unlink  # noqa: E402

from vfdirect.adapter.pf_client import PfClient  # noqa: E402
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk  # noqa: E402
from vfdirect.core.guest.journal import EntryState  # noqa: E402
from vfdirect.core.ids import VdiskId  # noqa: E402
from vfdirect.core.wwn import Wwn  # noqa: E402
from vfdirect.storage import StorageArray  # noqa: E402
from vfdirect.storage.faults import FAULTS_ENV, clear_lun_faults, set_lun_faults  # noqa: E402
from vfdirect.vm.verify import read_journal_file  # noqa: E402

WAIT_S = 20.0
VPORT = Wwn.naa5(0x6501)
VPORT_NN = Wwn.naa5(0x6502)
REPO = _TESTS.parent
# "__main__": the fork server imports the main module (pytest) once, not each child
PRELOAD = ["__main__", "vfdirect.cli.adapter", "vfdirect.cli.vm_run", "powercut_helpers"]


# -- processes from a fork server ------------------------------------------------------


def _entry(kind: str, argv: list[str], out_path: str, err_path: str,
           env: dict[str, str]) -> None:
    """The child: stdio to files, the environment, then the product's own command."""
    null = os.open(os.devnull, os.O_RDONLY)
    out = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    err = os.open(err_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for fd, target in ((null, 0), (out, 1), (err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    os.environ.update(env)
    if kind == "adapter":
        from vfdirect.cli.adapter import adapter as command  # noqa: PLC0415
    else:
        from vfdirect.cli.vm_run import vm_run as command  # noqa: PLC0415
    command.main(args=argv, prog_name=f"vfdirect {kind}")


class Proc:
    """One adapter or VM process started by the fork server; always reaped."""

    def __init__(self, ctx: multiprocessing.context.ForkServerContext, kind: str,
                 argv: list[str], logs: Path, env: dict[str, str]) -> None:
        self.kind = kind
        self.out_path = logs.with_suffix(".out")
        self.err_path = logs.with_suffix(".err")
        for p in (self.out_path, self.err_path):
            p.write_bytes(b"")
        self.proc = ctx.Process(target=_entry, args=(kind, argv, str(self.out_path),
                                                     str(self.err_path), env), daemon=False)
        self.proc.start()

    @property
    def pid(self) -> int:
        assert self.proc.pid is not None
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.err_path.read_text().splitlines():
            if line.startswith("{"):
                with contextlib.suppress(json.JSONDecodeError):  # a line being written
                    out.append(json.loads(line))
        return out

    def wait_event(self, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if not self.proc.is_alive() or time.monotonic() >= deadline:
                raise AssertionError(f"{self.kind}: no {name} event (exit "
                                     f"{self.proc.exitcode}):\n{self.err_path.read_text()}")
            time.sleep(0.003)

    def result(self, timeout: float = WAIT_S) -> dict[str, Any]:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"{self.kind} did not exit"
        lines = [ln for ln in self.out_path.read_text().splitlines() if ln.startswith("{")]
        assert lines, f"{self.kind}: no result:\n{self.err_path.read_text()}"
        return dict(json.loads(lines[-1]))

    def kill9(self) -> None:
        if self.proc.exitcode is None:
            self.proc.kill()
        self.proc.join(WAIT_S)
        assert self.proc.exitcode is not None, f"{self.kind} {self.pid} survived SIGKILL"

    def stop(self) -> None:
        """SIGTERM, bounded wait, then SIGKILL."""
        if self.proc.exitcode is None:
            self.proc.terminate()
            self.proc.join(WAIT_S)
        if self.proc.exitcode is None:
            self.kill9()
        self.proc.close()


@contextlib.contextmanager
def fork_server() -> Iterator[multiprocessing.context.ForkServerContext]:
    """A fork server with the adapter and VM commands imported; stopped at the end."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    try:
        yield ctx
    finally:
        server = multiprocessing.forkserver._forkserver  # type: ignore[attr-defined]
        stop = getattr(server, "_stop", None)
        if stop is not None:
            stop()


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) process."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


# -- the stack of one cut ---------------------------------------------------------------


def vm_doc(array: StorageArray) -> dict[str, Any]:
    """Mapping info of the VM: vd-a (0, 0) on LUN 0 and vd-b (0, 1) across LUNs 0-1."""
    ds = datastore(array)
    a = ds.vdisk_create(VdiskId("vd-a"), 256)
    b = ds.vdisk_create(VdiskId("vd-b"), 10000)
    return {"format": "vfdirect.vf-mapping", "version": 1,
            "luns": [entry(0, 0, a), entry(0, 1, b)]}


def fwtable_json(doc: dict[str, Any], socket: str) -> str:
    return json.dumps(FirmwareTable("vm0", "vm0-uuid", socket, tuple(
        FwDisk(VPORT, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
               e["block_size"], e["serial"], Wwn.parse(e["wwn"])) for e in doc["luns"]
    )).dump())


def configure(pf: PfClient, array: StorageArray, *, first: bool) -> None:
    """Claim A steps before the VM runs (the fabric's zoning and masking persist in the
    array's fabric directory, so only the first start makes them)."""
    pf.array_attach(array.directory)
    pf.vf_enable(1)
    pf.vport_create(VPORT, VPORT_NN)
    if first:
        pf.fabric_zone_create("vm0", [VPORT, *array.target_ports])
        pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0, 1])


def assign(pf: PfClient, pid: int, doc: dict[str, Any]) -> None:
    pf.vf_assign(0, "vm0", pid)
    pf.vport_bind(VPORT, 0)
    pf.mapping_load(0, doc)


@dataclass
class Workload:
    """verify's durability options of the cut VMs."""

    depth: int = 8
    window: int = 24
    read_pct: float = 30.0
    fua_pct: float = 20.0
    flush_every: int = 12

    def args(self) -> list[str]:
        return ["--workload", "verify", "--depth", str(self.depth), "--window",
                str(self.window), "--read-pct", str(self.read_pct), "--fua-pct",
                str(self.fua_pct), "--flush-every", str(self.flush_every)]


@dataclass
class Figures:
    """What the suite proves, printed and written to artifacts/proof/<suite>.json."""

    suite: str
    seed: int
    cuts: int = 0
    in_flight: list[int] = field(default_factory=list)   # pending writes at each cut
    checks: int = 0          # blocks read back and judged
    required: int = 0        # acknowledged writes that had to be durable (FUA/flushed)
    floors: int = 0          # LBAs with a durable floor
    acked_fua: int = 0
    flushes_completed: int = 0
    rolled_back: int = 0     # acknowledged, not yet durable, taken back by a cut
    lost: int = 0
    torn: int = 0
    invented: int = 0
    details: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def take(self, recovery: dict[str, Any]) -> None:
        self.checks += int(recovery["checked"])
        self.required += int(recovery["required"])
        self.floors += int(recovery["floors"])
        self.acked_fua += int(recovery["acked_fua"])
        self.flushes_completed += int(recovery["flushes_completed"])
        for key in ("rolled_back", "lost", "torn", "invented"):
            setattr(self, key, getattr(self, key) + int(recovery[key]))
        self.details += list(recovery["details"])[: max(0, 20 - len(self.details))]

    def dump(self) -> dict[str, Any]:
        return {"suite": self.suite, "seed": self.seed, "cuts": self.cuts,
                "in_flight_sum": sum(self.in_flight),
                "in_flight_max": max(self.in_flight, default=0),
                "cuts_with_io_in_flight": sum(1 for n in self.in_flight if n),
                "checks": self.checks, "required_durable": self.required,
                "floors": self.floors, "acked_fua": self.acked_fua,
                "flushes_completed": self.flushes_completed,
                "rolled_back": self.rolled_back, "lost": self.lost,
                "torn": self.torn, "invented": self.invented,
                "seconds": round(self.seconds, 2)}

    def report(self) -> None:
        data = self.dump()
        print(f"\n{self.suite}: " + " ".join(f"{k}={v}" for k, v in data.items()))
        print(f"{self.suite}: in flight per cut: {self.in_flight}")
        with contextlib.suppress(OSError):
            out = REPO / "artifacts" / "proof"
            os.makedirs(out, exist_ok=True)
            (out / f"{self.suite}.json").write_text(json.dumps(data) + "\n")


class CutRig:
    """One SAN, one adapter run directory, two guest memory files used in turn; the
    adapter and each VM are killed -9 together at each cut."""

    def __init__(self, ctx: multiprocessing.context.ForkServerContext, tmp: Path,
                 array: StorageArray, *, seed: int, cache: dict[str, Any],
                 workload: Workload | None = None) -> None:
        self.ctx = ctx
        self.tmp = tmp
        self.array = array
        self.doc = vm_doc(array)
        self.rng = random.Random(seed)
        self.cache = cache
        self.workload = workload or Workload()
        self.run_dir = tmp / "host1"
        self.fwtable = tmp / "fw.json"
        self.fwtable.write_text(fwtable_json(self.doc, str(self.run_dir / "vf0.sock")))
        tag = f"vfd-test-{os.getpid()}-cut-{seed}"
        self.memories = [Path("/dev/shm") / f"{tag}-{n}" for n in range(2)]
        self.n = 0
        self.started: list[Proc] = []
        self.pids: list[int] = []  # every process started, for the leak check
        self.env = {FAULTS_ENV: "1"}

    def luns(self) -> list[Path]:
        return [self.array.lun_path(n) for n in (0, 1)]

    def _start(self, kind: str, argv: list[str]) -> Proc:
        proc = Proc(self.ctx, kind, argv, self.tmp / f"{kind}-{self.n}", self.env)
        self.started.append(proc)
        self.pids.append(proc.pid)
        return proc

    def boot(self, *, recover: bool, count: int | None = None) -> tuple[Proc, Proc]:
        """Adapter, then a VM on fresh memory (recovering from the previous one's
        journal when ``recover``); returns once the VM's workload has started."""
        for lun in self.luns():
            set_lun_faults(lun, volatile_cache={**self.cache,
                                                "seed": self.rng.randrange(1 << 30)})
        memory = self.memories[self.n % 2]
        previous = self.memories[(self.n - 1) % 2]
        unlink(memory)
        argv = ["--memory-file", str(memory), "--memory-size", "2MiB", "--request-queues",
                "1", "--tags", "16", "--queue-size", "32", "--slot-size", "4KiB",
                "--journal-size", "128KiB", "--fwtable", str(self.fwtable), "--paused",
                "--log-format", "json", "--progress-ms", "60000", *self.workload.args()]
        if recover:
            argv += ["--recover-from", str(previous)]
        if count is not None:
            argv += ["--count", str(count)]
        # both start at once: the VM boots and waits (paused) for its VF meanwhile
        adapter = self._start("adapter", ["--run-dir", str(self.run_dir), "--vfs", "2",
                                          "--log-format", "json"])
        vm = self._start("vm", argv)
        adapter.wait_event("adapter_ready")
        with PfClient(self.run_dir / "pf.sock", timeout=WAIT_S) as pf:
            configure(pf, self.array, first=self.n == 0)
            vm.wait_event("vm_paused")
            assign(pf, vm.pid, self.doc)
        os.kill(vm.pid, 10)  # SIGUSR1: boot
        vm.wait_event("verify_started")
        self.n += 1
        return adapter, vm

    def cut(self, adapter: Proc, vm: Proc, figures: Figures) -> None:
        """Let IO run a random while, then kill -9 both (in random order)."""
        time.sleep(self.rng.uniform(0.005, 0.08))
        order = [adapter, vm] if self.rng.random() < 0.5 else [vm, adapter]
        for proc in order:
            proc.kill9()
        journal = read_journal_file(self.memories[(self.n - 1) % 2])
        pending = sum(1 for e in journal if e.state is EntryState.PENDING and not e.flush)
        figures.cuts += 1
        figures.in_flight.append(pending)
        for proc in order:
            self.started.remove(proc)
            proc.stop()

    def close(self) -> None:
        for proc in self.started:
            proc.stop()
        self.started.clear()
        for memory in self.memories:
            unlink(memory)
        for lun in self.luns():
            clear_lun_faults(lun)


def run_cuts(rig: CutRig, cuts: int, figures: Figures, *, intact: bool = True) -> None:
    """``cuts`` power cuts; the VM after each reads every block back against the journal
    of the cut (``verify_recovered``); a last VM judges the last cut and stops cleanly."""
    start = time.monotonic()
    adapter, vm = rig.boot(recover=False)
    for _ in range(cuts):
        rig.cut(adapter, vm, figures)
        adapter, vm = rig.boot(recover=True)
        figures.take(vm.wait_event("verify_recovered"))
    # the last VM stops cleanly (SIGTERM): its own verify, after the last recovery, holds
    vm.proc.terminate()
    result = vm.result()
    if intact:  # (a broken durability path makes the recovery before it fail)
        assert result["ok"] and result["errors"] == 0, result
    figures.checks += int(result["final_checked"])
    rig.started.remove(vm)
    vm.stop()
    rig.started.remove(adapter)
    adapter.stop()
    figures.seconds = time.monotonic() - start


# -- the whole host: vfdirect host (+ its adapter and VM) killed -9 ----------------------

if str(_TESTS / "host") not in sys.path:
    sys.path.insert(0, str(_TESTS / "host"))


def _console(path: Path, offset: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with contextlib.suppress(FileNotFoundError), open(path, "rb") as f:
        f.seek(offset)
        for line in f.read().decode(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


def _wait_console(path: Path, offset: int, name: str, timeout: float = 60.0,
                  pid: int | None = None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        for event in _console(path, offset):
            if event.get("event") == name and (pid is None or event.get("pid", pid) == pid):
                return event
        if time.monotonic() >= deadline:
            tail = path.read_text(errors="replace")[-3000:] if path.exists() else ""
            raise AssertionError(f"no {name} in {path} after byte {offset}:\n{tail}")
        time.sleep(0.02)


class HostRig:
    """One ``vfdirect host`` (through the CLI) with one VM running verify with FUA and
    flushes; each cut kills -9 the host, its adapter and the VM, then restarts with
    ``vfdirect host start`` (reconciling from the inventory) and ``vm start``."""

    def __init__(self, tmp: Path, *, seed: int, cache: dict[str, Any],
                 workload: Workload | None = None) -> None:
        from host_helpers import ARRAY_WWN as HOST_ARRAY_WWN  # noqa: PLC0415
        from host_helpers import Host  # noqa: PLC0415

        self.array = StorageArray.create(tmp / "san" / "array0", HOST_ARRAY_WWN)
        for _ in range(2):
            self.array.lun_create(8192, 512)
        self.tmp = tmp
        self.rng = random.Random(seed)
        self.cache = cache
        self.workload = workload or Workload()
        self.host = Host(tmp / "run", arrays=(self.array.directory,), env={FAULTS_ENV: "1"})
        self.vm_dir = tmp / "run" / "vms" / "vm1"
        self.cuts = 0
        self.a = HOST_ARRAY_WWN.canonical()

    @property
    def console(self) -> Path:
        return self.vm_dir / "console.log"

    def _faults(self) -> None:
        for n in (0, 1):
            set_lun_faults(self.array.lun_path(n), volatile_cache={
                **self.cache, "seed": self.rng.randrange(1 << 30)})

    def _spec(self, recover: Path | None) -> None:
        spec_path = self.vm_dir / "spec.json"
        spec = json.loads(spec_path.read_text())
        args = [*self.workload.args()[2:], "--progress-ms", "60000"]  # minus --workload
        if recover is not None:
            args += ["--recover-from", str(recover)]
        spec["workload_args"] = args
        spec_path.write_text(json.dumps(spec))

    def setup(self) -> None:
        self._faults()
        h = self.host
        h.start()
        h.cli("datastore", "create", "ds0", "--lun", f"{self.a}:0", "--lun", f"{self.a}:1",
              "--chunk-blocks", "64")
        h.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256")
        h.cli("vdisk", "create", "d2", "--datastore", "ds0", "--blocks", "4096")
        h.cli("vm", "create", "vm1", "--workload", "verify", "--memory", "8MiB")
        h.cli("vm", "attach", "vm1", "d1")
        h.cli("vm", "attach", "vm1", "d2")

    def start_vm(self, recover: Path | None) -> tuple[int, int]:
        """``vm start`` (on fresh memory); returns the VM's pid and the console offset
        of its boot."""
        self._spec(recover)
        offset = self.console.stat().st_size if self.console.exists() else 0
        shown = self.host.cli_json("vm", "start", "vm1")
        pid = int(shown["pid"])
        self.host.pids.add(pid)
        _wait_console(self.console, offset, "verify_started")
        return pid, offset

    def cut(self, vm_pid: int, figures: Figures) -> Path:
        """A random while of IO, then SIGKILL of host, adapter and VM (random order);
        the memory file is kept aside as the record of the cut."""
        from host_helpers import wait_gone  # noqa: PLC0415

        time.sleep(self.rng.uniform(0.01, 0.2))
        pids = [self.host.pid, self.host.adapter_pid, vm_pid]
        self.host.pids.update(pids)
        self.rng.shuffle(pids)
        for pid in pids:
            os.kill(pid, 9)
        for pid in pids:
            assert wait_gone(pid, WAIT_S), f"pid {pid} survived SIGKILL"
        self.cuts += 1
        record = self.tmp / f"cut-{self.cuts}.mem"
        os.replace(self.vm_dir / "memory", record)
        journal = read_journal_file(record)
        figures.cuts += 1
        figures.in_flight.append(sum(1 for e in journal
                                     if e.state is EntryState.PENDING and not e.flush))
        return record

    def restart(self) -> None:
        self._faults()
        self.host.start()
        state = self.host.cli_json("vm", "show", "vm1")["vm"]["state"]
        if state != "stopped":
            self.host.cli("vm", "stop", "vm1")

    def close(self) -> None:
        self.host.cleanup()
        for n in (0, 1):
            clear_lun_faults(self.array.lun_path(n))
        for record in self.tmp.glob("cut-*.mem"):
            unlink(record)


def run_host_cuts(rig: HostRig, cuts: int, figures: Figures) -> None:
    start = time.monotonic()
    rig.setup()
    vm_pid, _ = rig.start_vm(None)
    for _ in range(cuts):
        record = rig.cut(vm_pid, figures)
        rig.restart()
        vm_pid, offset = rig.start_vm(record)
        figures.take(_wait_console(rig.console, offset, "verify_recovered"))
        unlink(record)
    rig.host.cli("vm", "stop", "vm1")
    figures.seconds = time.monotonic() - start
