"""The fuzz rig: sets up what a target needs, runs the target script as a child for a
fixed time with a fixed seed (libFuzzer flags), then checks the invariants of issue 8.

For the live targets (``virtqueue``, ``vhost_user``, ``pf_rpc``, ``nbd``) the rig starts
a real ``vfdirect adapter --audit`` over a SAN of three file-backed LUNs, and a sentinel
VM (``vm-run --workload verify``) on VF 1 under its own vport; the fuzzed VF is VF 0
(for ``nbd``, a VM on VF 0 serving two NBD exports, one of them fuzzed). Before the run,
the LUN bytes outside the vdisks' extents are filled with a pattern; after it the rig
checks:

* the target exited 0 (a crash is an uncaught exception or a violated invariant; the
  input is saved by libFuzzer with ``-artifact_prefix``) within its time;
* the adapter (and the NBD VM) is alive and answers; no internal error was logged;
* the sentinel's verify progressed during the window, and ends ok (0 errors, 0
  mismatches) with its final read-back;
* the adapter's auditor ran checks and counted 0 memory and 0 extent violations;
* the guest-memory canaries outside the fuzzed front ends' granted memory were checked
  by the target (its counters) and never changed;
* the LUN bytes outside the fuzz VF's and the sentinel's vdisk extents are unchanged.

Importable by the tests (:func:`run_target`), and the entry of a target run alone
(:func:`standalone`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fuzzlib
from daemon_helpers import Daemon, make_san
from test_vm_nbd import Raw
from vf_test_helpers import VPORT, VPORT2, VPORT2_NN, VPORT_NN, mappings
from vm_helpers import VmProc

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk
from vfdirect.core.nbd import CommandType
from vfdirect.core.wwn import Wwn

TARGETS = ("scsi_cdb", "virtqueue", "vhost_user", "pf_rpc", "migration_stream", "nbd")
LIVE = frozenset({"virtqueue", "vhost_user", "pf_rpc", "nbd"})
#: Adapter events that reveal a bug, whatever the input.
BAD_EVENTS = ("vf_internal_error", "pf_internal_error", "vf_thread_stuck",
              "vf_unmap_deferred")
BLOCK = 512
#: Extra seconds a child gets beyond -max_total_time before it counts as hung.
HANG_GRACE_S = 90.0


class RigError(Exception):
    """The rig cannot be set up (e.g. the adapter has no auditor)."""


@dataclass
class RunResult:
    """What one target run did and which checks failed."""

    target: str
    seconds: float
    seed: int
    returncode: int | None = None
    execs: int = 0
    stats: dict[str, Any] = field(default_factory=dict)
    audit: dict[str, Any] = field(default_factory=dict)
    sentinel: dict[str, Any] = field(default_factory=dict)
    inflight: dict[str, int] = field(default_factory=dict)
    checks: int = 0
    failures: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    log_tail: str = ""

    def check(self, ok: bool, what: str) -> None:
        self.checks += 1
        if not ok:
            self.failures.append(what)

    @property
    def ok(self) -> bool:
        return not self.failures and self.checks > 0

    def counters(self) -> dict[str, Any]:
        s = self.stats
        child_checks = sum(int(v) for k, v in s.items() if k.endswith("checks")
                           and k != "audit_checks")
        violations = (int(self.audit.get("memory_violations", 0))
                      + int(self.audit.get("extent_violations", 0))
                      + int(s.get("extent_violations", 0)) + int(s.get("canary_violations", 0)))
        return {
            "suite": "fuzz", "target": self.target, "seconds": self.seconds, "seed": self.seed,
            "ok": self.ok, "execs": self.execs, "inputs": int(s.get("inputs", 0)),
            "processed": int(s.get("processed", 0)), "rejected": int(s.get("rejected", 0)),
            "resets": int(s.get("vf_resets", 0)),
            "checks": self.checks + child_checks,
            "audit_checks": int(self.audit.get("checks", s.get("audit_checks", 0))),
            "violations": violations,
            "inflight_sum": int(s.get("inflight_sum", 0)),
            "inflight_max": int(s.get("inflight_max", 0)),
            "sentinel": self.sentinel, "failures": self.failures, "wall_s": round(self.wall_s, 1),
            "stats": s,
        }

    def summary(self) -> str:
        c = self.counters()
        return (f"fuzz {self.target}: {'ok' if self.ok else 'FAILED'} execs={c['execs']} "
                f"inputs={c['inputs']} processed={c['processed']} rejected={c['rejected']} "
                f"resets={c['resets']} checks={c['checks']} audit_checks={c['audit_checks']} "
                f"violations={c['violations']} inflight(sum/max)="
                f"{c['inflight_sum']}/{c['inflight_max']} seed={self.seed} "
                f"time={self.seconds:g}s wall={c['wall_s']}s")

    def write_artifact(self) -> Path | None:
        """One JSON line in ``artifacts/proof/fuzz-<target>.json`` (when it can be made)."""
        try:
            out = fuzzlib.ROOT / "artifacts" / "proof"
            os.makedirs(out, exist_ok=True)
            path = out / f"fuzz-{self.target}.json"
            path.write_text(json.dumps(self.counters()) + "\n", encoding="utf-8")
            return path
        except OSError:
            return None


# -- the live rig ---------------------------------------------------------------------------


@functools.cache
def _adapter_has_audit() -> bool:
    done = subprocess.run([sys.executable, "-m", "vfdirect.cli.adapter", "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    return "--audit" in done.stdout


class LiveRig:
    """A real adapter with ``--audit``, the sentinel VM on VF 1, the fuzz VF 0 ready to be
    assigned (or, for ``nbd``, a VM on VF 0 serving NBD exports)."""

    def __init__(self, target: str, work: Path, *, require_audit: bool = True) -> None:
        if require_audit and not _adapter_has_audit():
            raise RigError("the adapter has no --audit flag (the auditor of issue 8, Task C, "
                           "has not landed): the fuzz invariants cannot be checked")
        self.target = target
        self.work = work
        self.vms: list[Any] = []
        self.shm: list[Path] = []
        self.daemon: Any = None
        self.pf: Any = None
        self.sockdir: Path | None = None
        self.nbd: dict[str, Any] = {}
        try:
            self._build(require_audit)
        except BaseException:
            self.close()
            raise

    def _build(self, require_audit: bool) -> None:

        target, work = self.target, self.work
        self.san = make_san(work / "san")
        self.vm0, self.vm1, self.layouts = mappings(self.san)
        lun2_only = target == "pf_rpc"
        # allowed extents by LUN number: the fuzz VF's vdisks and the sentinel's
        self.allowed: dict[int, list[tuple[int, int]]] = {0: [], 1: [], 2: []}
        for layout in (self.layouts.a, self.layouts.b, self.layouts.c, self.layouts.s):
            for e in layout.extents():
                self.allowed[e.lun.lun].append((int(e.start), int(e.end)))
        if lun2_only:  # the PF fuzzer owns LUN 2 (and only it is masked to its vport)
            self.allowed[2] = [(0, 1 << 40)]
        self._paint()
        self.before = self.snapshot()
        # IO threads: requests of the sentinel are in flight while the fuzz VF is faulted
        self.daemon = Daemon(work / "host1", "--io-threads", "2",
                             *(("--audit",) if require_audit else ()))
        self.daemon.wait_ready()
        self.pf = PfClient(self.daemon.sock, timeout=30.0)
        pf = self.pf
        pf.array_attach(self.san.directory)
        pf.vf_enable(4)
        pf.vport_create(VPORT, VPORT_NN)
        pf.vport_create(VPORT2, VPORT2_NN)
        pf.fabric_zone_create("vms", [VPORT, VPORT2, *self.san.target_ports])
        pf.fabric_mask_grant(VPORT, self.san.wwn, [2] if lun2_only else [0, 1])
        pf.fabric_mask_grant(VPORT2, self.san.wwn, [0, 1])
        self.sentinel = self._start_vm("sentinel", 1, VPORT2, self.vm1, (
            "--workload", "verify", "--depth", "4", "--window", "64", "--progress-ms", "200"))
        if target == "nbd":
            sockdir = Path(tempfile.mkdtemp(prefix="vfz-", dir="/tmp"))
            self.sockdir = sockdir
            exports = work / "exports.json"
            self.nbd = {"fuzz": str(sockdir / "f.sock"), "other": str(sockdir / "o.sock"),
                        "export": "sda", "other_export": "sdb"}
            exports.write_text(json.dumps({"exports": [
                {"disk": "sda", "unix": self.nbd["fuzz"]},
                {"disk": "sdb", "unix": self.nbd["other"]}]}))
            self.nbd_vm = self._start_vm("nbdvm", 0, VPORT, self.vm0, (
                "--workload", "idle", "--exports-file", str(exports)))
            self.nbd_vm.wait_event("nbd_exports")
            self.nbd["vm_pid"] = self.nbd_vm.pid
        self.wait_progress(0)

    def _paint(self) -> None:
        """Fill the LUN bytes outside the allowed extents with a pattern (a stray write of
        zeros must show too)."""
        for lun, ranges in self.allowed.items():
            path = self.san.lun_path(lun)
            size = path.stat().st_size
            with open(path, "r+b") as f:
                for start, end in self._outside(ranges, size // BLOCK):
                    f.seek(start * BLOCK)
                    pattern = hashlib.sha256(f"{lun}:{start}".encode()).digest() * 16
                    n = (end - start) * BLOCK
                    f.write((pattern * (n // len(pattern) + 1))[:n])

    @staticmethod
    def _outside(ranges: list[tuple[int, int]], blocks: int) -> list[tuple[int, int]]:
        out, pos = [], 0
        for s, e in sorted(ranges):
            if s > pos:
                out.append((pos, min(s, blocks)))
            pos = max(pos, e)
        if pos < blocks:
            out.append((pos, blocks))
        return [(s, e) for s, e in out if e > s]

    def snapshot(self) -> dict[int, str]:
        """SHA-256 of each LUN's bytes outside the allowed extents."""
        out = {}
        for lun, ranges in self.allowed.items():
            path = self.san.lun_path(lun)
            data = path.read_bytes()
            h = hashlib.sha256()
            for s, e in self._outside(ranges, len(data) // BLOCK):
                h.update(data[s * BLOCK:e * BLOCK])
            out[lun] = h.hexdigest()
        return out

    def _start_vm(self, name: str, vf: int, vport: Any, doc: dict[str, Any],
                  extra: tuple[str, ...]) -> Any:

        sock = str(self.daemon.run_dir / f"vf{vf}.sock")
        table = FirmwareTable(name, f"{name}-uuid", sock, tuple(
            FwDisk(vport, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
                   e["block_size"], e["serial"], Wwn.parse(e["wwn"])) for e in doc["luns"]))
        fw = self.work / f"{name}-fw.json"
        fw.write_text(json.dumps(table.dump()))
        mem = Path("/dev/shm") / f"vfd-fuzz-{os.getpid()}-{self.work.name}-{name}.mem"
        self.shm.append(mem)
        vm = VmProc(self.work, name, "--memory-file", str(mem), "--memory-size", "8MiB",
                    "--fwtable", str(fw), "--paused", *extra)
        self.vms.append(vm)
        vm.wait_event("vm_paused")
        self.pf.vf_assign(vf, name, vm.pid)
        self.pf.vport_bind(vport, vf)
        self.pf.mapping_load(vf, doc)
        vm.go()
        return vm

    def progress_writes(self) -> int:
        events = [e for e in self.sentinel.events() if e["event"] == "verify_progress"]
        return int(events[-1]["writes"]) if events else 0

    def wait_progress(self, above: int, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            writes = self.progress_writes()
            if writes > above:
                return writes
            if self.sentinel.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise RigError(f"the sentinel's verify made no progress past {above} writes "
                       f"(exit {self.sentinel.proc.poll()}):\n"
                       f"{self.sentinel.err_path.read_text()[-2000:]}")

    def config(self) -> dict[str, Any]:

        fuzz_doc = self.vm0
        if self.target == "pf_rpc":  # only vd-c, on LUN 2
            fuzz_doc = {**self.vm0, "luns": [e for e in self.vm0["luns"]
                                             if e["vdisk_id"] == "vd-c"]}
        return {"target": self.target, "tmp": str(self.work), "pf": str(self.daemon.sock),
                "vf": 0, "vport": VPORT.canonical(), "mapping": fuzz_doc,
                "sentinel_vf": 1, "sentinel_vport": VPORT2.canonical(),
                "array": str(self.san.directory), "array_wwn": self.san.wwn.canonical(),
                "nbd": self.nbd}

    def close(self) -> None:
        for vm in self.vms:
            with contextlib.suppress(Exception):
                vm.stop()
        if self.pf is not None:
            with contextlib.suppress(Exception):
                self.pf.close()
        if self.daemon is not None:
            with contextlib.suppress(Exception):
                self.daemon.stop()
        for path in self.shm:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.sockdir is not None:
            shutil.rmtree(self.sockdir, ignore_errors=True)


# -- running a target -----------------------------------------------------------------------


def _execs(log: str) -> int:
    m = re.findall(r"stat::number_of_executed_units:\s*(\d+)", log)
    if m:
        return int(m[-1])
    m = re.findall(r"Done (\d+) runs", log)
    return int(m[-1]) if m else 0


def _artifact_prefix(target: str, work: Path) -> str:
    try:
        out = fuzzlib.ROOT / "artifacts" / "proof"
        os.makedirs(out, exist_ok=True)
        return f"{out}/fuzz-{target}-"
    except OSError:
        return f"{work}/"


def run_child(target: str, *, seconds: float, seed: int, work: Path,
              config: dict[str, Any] | None, extra: list[str],
              result: RunResult) -> None:
    """Run ``fuzz/fuzz_<target>.py`` as the child; fill returncode, execs, stats."""
    script = fuzzlib.FUZZ_DIR / f"fuzz_{target}.py"
    stats_path = work / f"{target}-stats.json"
    env = dict(os.environ)
    env[fuzzlib.CHILD_ENV] = "1"
    env[fuzzlib.STATS_ENV] = str(stats_path)
    if config is not None:
        cfg = work / f"{target}-config.json"
        cfg.write_text(json.dumps(config))
        env[fuzzlib.CONFIG_ENV] = str(cfg)
    args = [sys.executable, str(script), f"-max_total_time={max(1, round(seconds))}",
            f"-seed={seed}", "-print_final_stats=1", "-timeout=60",
            f"-artifact_prefix={_artifact_prefix(target, work)}",
            *(("-len_control=0",) if target in LIVE else ()), *extra]
    log_path = work / f"{target}-child.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                env=env, cwd=work)
        try:
            result.returncode = proc.wait(seconds + HANG_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(30)
            result.failures.append(f"the target did not end within {seconds + HANG_GRACE_S:g}"
                                   f" s (hung)")
    for leftover in Path("/dev/shm").glob(f"vfd-fuzz-{proc.pid}-*"):  # a crashed child's
        with contextlib.suppress(FileNotFoundError):
            leftover.unlink()
    text = log_path.read_text(errors="replace")
    result.execs = _execs(text)
    result.log_tail = "\n".join(ln for ln in text.splitlines()
                                if not ln.startswith(("#", '"', "INFO:", "WARNING:")))[-3000:]
    with contextlib.suppress(FileNotFoundError, ValueError):
        result.stats = json.loads(stats_path.read_text())
    result.check(result.returncode == 0,
                 f"the target exited {result.returncode} (crash input saved with "
                 f"-artifact_prefix):\n{result.log_tail}")
    result.check(int(result.stats.get("inputs", 0)) > 0, "the target counted no input")
    for name in ("extent_violations", "canary_violations", "internal_errors"):
        result.check(int(result.stats.get(name, 0)) == 0, f"the target counted {name}")


def run_target(target: str, *, seconds: float, seed: int, work: Path,
               extra: list[str] | None = None, require_audit: bool = True) -> RunResult:
    """Set up the rig of ``target`` in ``work``, run it, check everything; never raises
    for a failed check (see :attr:`RunResult.failures`), only :class:`RigError` when the
    rig itself cannot be built."""
    if target not in TARGETS:
        raise RigError(f"unknown fuzz target {target!r} (one of {', '.join(TARGETS)})")
    started = time.monotonic()
    result = RunResult(target, seconds, seed)
    work.mkdir(parents=True, exist_ok=True)
    if target not in LIVE:
        run_child(target, seconds=seconds, seed=seed, work=work, config={"tmp": str(work)},
                  extra=list(extra or ()), result=result)
        replay = any(Path(a).is_file() for a in extra or () if not a.startswith("-"))
        if target == "scsi_cdb" and not replay:  # (one replayed input may do no IO)
            result.check(int(result.stats.get("audit_checks", 0)) > 0,
                         "the backend auditor checked no IO")
        result.wall_s = time.monotonic() - started
        return result
    rig = LiveRig(target, work, require_audit=require_audit)
    try:
        before = rig.progress_writes()
        run_child(target, seconds=seconds, seed=seed, work=work, config=rig.config(),
                  extra=list(extra or ()), result=result)
        _check_live(rig, result, before, require_audit)
    finally:
        rig.close()
    _check_after(rig, result)
    result.wall_s = time.monotonic() - started
    return result


def _check_live(rig: LiveRig, result: RunResult, before: int, require_audit: bool) -> None:

    alive = rig.daemon.proc.poll() is None
    result.check(alive, f"the adapter died (exit {rig.daemon.proc.poll()})")
    if not alive:
        return
    try:
        ident = rig.pf.adapter_identify()
        result.check(bool(ident.get("methods")), "the adapter does not answer identify")
        stats = rig.pf.adapter_get_stats()
    except (OSError, PfError) as exc:
        result.failures.append(f"the adapter does not answer: {exc}")
        return
    audit = stats.get("audit")
    if require_audit:
        if not isinstance(audit, dict) or not audit.get("enabled"):
            result.failures.append(f"adapter_get_stats has no enabled audit object: {audit!r}")
        else:
            result.audit = audit
            result.check(int(audit.get("checks", 0)) > 0, f"the auditor ran no check: {audit}")
            result.check(int(audit.get("memory_violations", -1)) == 0,
                         f"the auditor counted memory violations: {audit}")
            result.check(int(audit.get("extent_violations", -1)) == 0,
                         f"the auditor counted extent violations: {audit}")
    try:
        writes = rig.wait_progress(before)
        result.check(writes > before, "the sentinel's verify made no progress in the window")
    except RigError as exc:
        result.failures.append(str(exc))
    sentinel_vf = rig.pf.vf_get(1)
    result.check(sentinel_vf["state"] == "CONNECTED",
                 f"the sentinel VF is {sentinel_vf['state']} ({sentinel_vf.get('error')})")
    if rig.target in ("virtqueue", "vhost_user"):
        result.check(int(result.stats.get("canary_checks", 0)) > 0,
                     "the target checked no guest-memory canary")
    if rig.target == "nbd":
        vm_alive = rig.nbd_vm.proc.poll() is None
        result.check(vm_alive, f"the NBD VM died (exit {rig.nbd_vm.proc.poll()})")
        if vm_alive:
            result.check(_nbd_other_export_serves(rig.nbd["other"], rig.nbd["other_export"]),
                         "the VM's other export does not serve")
    # the sentinel ends: its final read-back of every block it wrote
    code = rig.sentinel.stop()
    lines = [ln for ln in rig.sentinel.out_path.read_text().splitlines() if ln.startswith("{")]
    res = json.loads(lines[-1]) if lines else {}
    result.sentinel = {k: res.get(k) for k in ("ok", "writes", "reads", "verified", "errors",
                                               "mismatches")}
    result.check(code == 0 and bool(res.get("ok")) and res.get("errors") == 0
                 and res.get("mismatches") == 0,
                 f"the sentinel's verify did not end ok (exit {code}): {res}")


def _check_after(rig: LiveRig, result: RunResult) -> None:
    bad = [e for e in rig.daemon.events() if e["event"] in BAD_EVENTS]
    result.check(not bad, f"the adapter logged internal errors: {bad[:3]}")
    after = rig.snapshot()
    changed = [lun for lun in after if after[lun] != rig.before[lun]]
    result.check(not changed, f"LUN bytes outside the vdisks' extents changed on LUNs "
                              f"{changed}")
    result.stats["outside_extent_checks"] = len(after)


def _nbd_other_export_serves(path: str, name: str) -> bool:

    try:
        client = Raw(Path(path))
        try:
            client.greet()
            client.go(name)
            data = os.urandom(4096)
            ok = client.request(CommandType.WRITE, 1, 65536, 4096, payload=data)[0] == 0
            return ok and client.request(CommandType.READ, 2, 65536, 4096,
                                         read=4096) == (0, data)
        finally:
            client.close()
    except (OSError, AssertionError, ConnectionError):
        return False


# -- standalone -----------------------------------------------------------------------------


def standalone(target: str, argv: list[str]) -> int:
    """``python fuzz/fuzz_<target>.py [-max_total_time=S] [-seed=N] [libFuzzer flags]
    [corpus dirs]``: build the rig, run, check, print the summary; 0 when all held."""
    seconds, seed, extra = 60.0, 1, []
    for arg in argv:
        if arg.startswith("-max_total_time="):
            seconds = float(arg.split("=", 1)[1])
        elif arg.startswith("-seed="):
            seed = int(arg.split("=", 1)[1])
        elif arg.startswith("-"):
            extra.append(arg)
        else:
            extra.append(str(Path(arg).resolve()))  # a corpus directory
    work = Path(tempfile.mkdtemp(prefix=f"vfd-fuzz-{target}-", dir="/tmp"))
    try:
        result = run_target(target, seconds=seconds, seed=seed, work=work, extra=extra)
    except RigError as exc:
        print(f"vfdirect: error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.write_artifact()
    print(result.summary())
    for failure in result.failures:
        print(f"  FAILED: {failure}", file=sys.stderr)
    return 0 if result.ok else 1
