#!/usr/bin/env python3
"""Live migration benchmark: downtime and total time against guest memory size and load.

In one run: one SAN (a storage array directory with two sparse LUNs), two host daemons
(``vfdirect host start``, each with its own adapter) sharing one SQLite inventory and
fabric, all on loopback. For each guest memory size (``--sizes``, MiB) and load
(``--loads``: ``idle``, or ``qd8w``: the ``load`` workload making 4 KiB random writes at
queue depth 8 to one thick virtual disk) a VM is started on h1 and migrated back and
forth ``--repeat`` times with ``vfdirect vm migrate VM --to HOST --json``; the final
record's report gives the downtime (VM paused to running on the destination), the
phases, the pre-copy rounds, the bytes sent and the worst IO stall the guest saw.

Baseline, same run and machine: the time (median of three) to copy the VM's memory file
from the source's run directory into the destination's through a loopback TCP
connection, with a plain Python read/sendall and recv_into/write loop (1 MiB chunks):
a naive stop-and-copy of that memory. The table prints migration total / raw copy.

Prints a table (median and max over the repeats) and JSON (``--json FILE``):

    .venv/bin/python bench/migration.py [--sizes 64,256,1024] [--loads idle,qd8w]
        [--repeat 3] [--dir /dev/shm] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray

ARRAY_WWN = Wwn.naa5(0xBE7C3001)
LUN_BLOCKS = (256 << 20) // 512  # two sparse 256 MiB LUNs
DISK_SIZE = "32MiB"
LOADS: dict[str, tuple[str, list[str]]] = {
    "idle": ("idle", []),
    # 4 KiB random writes at queue depth 8 (vm-run options through the VM's spec)
    "qd8w": ("load", ["--depth", "8", "--read-pct", "0", "--bs", "8",
                      "--progress-ms", "500"]),
}
WAIT_S = 120.0
CHUNK = 1 << 20


# -- processes ----------------------------------------------------------------------------


def vfd(*args: str, run_dir: Path | None = None, timeout: float = WAIT_S) -> str:
    """``vfdirect <args>`` (host commands) in a subprocess; its stdout."""
    env = dict(os.environ)
    if run_dir is not None:
        env["VFDIRECT_RUN_DIR"] = str(run_dir)
    proc = subprocess.run([sys.executable, "-m", "vfdirect.cli.host", *args],
                          capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"vfdirect {' '.join(args)} failed ({proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def vfd_json(*args: str, run_dir: Path, timeout: float = WAIT_S) -> Any:
    return json.loads(vfd(*args, "--json", run_dir=run_dir, timeout=timeout))


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] != "Z"


def _ours(pid: int) -> bool:
    try:
        return b"vfdirect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Host:
    """One ``vfdirect host`` daemon in ``run_dir``; :meth:`stop` reaps what it started."""

    def __init__(self, run_dir: Path, name: str, db: str, array: Path) -> None:
        self.run_dir, self.name, self.db, self.array = run_dir, name, db, array
        self.pids: set[int] = set()

    def start(self) -> None:
        vfd("host", "start", "--name", self.name, "--run-dir", str(self.run_dir),
            "--db", self.db, "--array", str(self.array), "--log-format", "json",
            "--vfs", "4")
        info = json.loads((self.run_dir / "host.json").read_text())
        self.pids.update({int(info["pid"]), int(info["adapter_pid"])})

    def cli(self, *args: str) -> str:
        return vfd(*args, run_dir=self.run_dir)

    def cli_json(self, *args: str, timeout: float = WAIT_S) -> Any:
        return vfd_json(*args, run_dir=self.run_dir, timeout=timeout)

    def note_vm(self, name: str) -> None:
        with contextlib.suppress(Exception):
            pid = self.cli_json("vm", "show", name)["vm"].get("pid")
            if pid:
                self.pids.add(int(pid))

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        with contextlib.suppress(OSError):
            for line in (self.run_dir / "host.log").read_text(errors="replace").splitlines():
                if line.startswith("{"):
                    with contextlib.suppress(ValueError):
                        out.append(json.loads(line))
        return out

    def stop(self) -> None:
        if (self.run_dir / "api.sock").exists():
            with contextlib.suppress(BaseException):
                vfd("host", "stop", "--wait", "30", run_dir=self.run_dir, timeout=60)
        for pid in sorted(self.pids):
            if not (_alive(pid) and _ours(pid)):
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def console_events(h: Host, vm: str) -> list[dict[str, Any]]:
    out = []
    with contextlib.suppress(OSError):
        text = (h.run_dir / "vms" / vm / "console.log").read_text(errors="replace")
        for line in text.splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
    return out


def wait_load(h: Host, vm: str, timeout: float = 60.0) -> None:
    """Two new load progress lines with writes (and no reads) on ``h``: the write load
    runs there."""
    first = len(console_events(h, vm))
    deadline = time.monotonic() + timeout
    while True:
        new = [e for e in console_events(h, vm)[first:] if e.get("event") == "load_progress"]
        if len(new) >= 2 and new[-1].get("writes", 0) > new[0].get("writes", 0):
            if new[-1].get("reads", 0):  # qd8w is writes only (--read-pct 0)
                raise SystemExit(f"VM {vm} on {h.name} makes reads: its workload "
                                 f"options (spec workload_args) were not applied")
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"VM {vm} on {h.name}: no load progress in {timeout:g} s")
        time.sleep(0.1)


# -- the baseline -------------------------------------------------------------------------


def raw_copy_s(src: Path, dst: Path) -> float:
    """Seconds to copy ``src`` into ``dst`` over a loopback TCP connection (Python loops,
    1 MiB chunks: read + sendall on one side, recv_into + write on the other)."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = [0]

    def receive() -> None:
        conn, _ = server.accept()
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        with conn, open(dst, "wb") as out:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                out.write(view[:n])
                received[0] += n

    t = threading.Thread(target=receive, daemon=True)
    start = time.perf_counter()
    t.start()
    with socket.create_connection(("127.0.0.1", port)) as conn, open(src, "rb") as f:
        while chunk := f.read(CHUNK):
            conn.sendall(chunk)
    t.join(WAIT_S)
    elapsed = time.perf_counter() - start
    server.close()
    if received[0] != src.stat().st_size:
        raise SystemExit(f"raw copy: {received[0]} of {src.stat().st_size} bytes arrived")
    return elapsed


# -- one (size, load) case ----------------------------------------------------------------


def run_case(h1: Host, h2: Host, size_mib: int, load: str, repeat: int,
             settle_s: float) -> dict[str, Any]:
    workload, workload_args = LOADS[load]
    vm = f"b{size_mib}{load}"
    h1.cli("vdisk", "create", f"d-{vm}", "--datastore", "ds0", "--size", DISK_SIZE)
    h1.cli("vm", "create", vm, "--memory", f"{size_mib}MiB", "--workload", workload)
    if workload_args:  # vm-run options: the spec carries them (and migrates with the VM)
        spec_path = h1.run_dir / "vms" / vm / "spec.json"
        spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
        spec["workload_args"] = workload_args
        spec_path.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
    h1.cli("vm", "attach", vm, f"d-{vm}")
    h1.cli("vm", "start", vm)
    h1.note_vm(vm)
    if workload == "load":
        wait_load(h1, vm)
    time.sleep(settle_s)
    memory = h1.run_dir / "vms" / vm / "memory"
    copy_dst = h2.run_dir / f"rawcopy-{vm}"
    try:  # the median of three: the machine is shared
        raw_s = statistics.median(raw_copy_s(memory, copy_dst) for _ in range(3))
    finally:
        with contextlib.suppress(FileNotFoundError):
            copy_dst.unlink()
    runs: list[dict[str, Any]] = []
    where = h1
    try:
        for i in range(repeat):
            src, dst = (h1, h2) if i % 2 == 0 else (h2, h1)
            t0 = time.perf_counter()
            shown = src.cli_json("vm", "migrate", vm, "--to", dst.name, timeout=600)
            cli_s = time.perf_counter() - t0
            shown = settled(src, vm, shown)
            report = shown.get("report") or {}
            if shown.get("outcome") != "committed":
                raise SystemExit(f"migration {i} of {vm} {shown.get('outcome')}: "
                                 f"{report.get('error')}")
            where = dst
            dst.note_vm(vm)
            spans = [p for p in report["phases"] if p["end_ns"] is not None]
            total_ms = (max(p["end_ns"] for p in spans) - min(p["start_ns"] for p in spans)) / 1e6
            rounds = [r for r in report["precopy_rounds"] if not r.get("final")]
            final = [r for r in report["precopy_rounds"] if r.get("final")]
            run = {"i": i, "from": src.name, "to": dst.name,
                   "downtime_ms": report["downtime_ns"] / 1e6, "total_ms": total_ms,
                   "cli_s": cli_s, "precopy_rounds": len(rounds),
                   "final_pages": final[0]["pages"] if final else 0,
                   "bytes_sent": report["bytes_sent"],
                   "worst_stall_ms": report.get("worst_stall_ms"),
                   "outstanding_at_quiesce": report.get("outstanding_at_quiesce"),
                   "guest_in_flight_at_handoff": report.get("guest_in_flight_at_handoff"),
                   "mediated_requests": report.get("mediated_requests"),
                   "phases_ms": dict(report["summary"]),
                   "rounds": report["precopy_rounds"],
                   "breakdown_ms": downtime_breakdown(src, dst, vm, report)}
            runs.append(run)
            print(f"  {vm:>10} #{i} {src.name}->{dst.name}: downtime "
                  f"{run['downtime_ms']:7.1f} ms, total {total_ms:8.1f} ms, "
                  f"{run['precopy_rounds']} rounds, {run['bytes_sent'] / 2**20:7.1f} MiB, "
                  f"stall {run['worst_stall_ms']} ms", flush=True)
            if workload == "load":
                wait_load(dst, vm)
            else:
                time.sleep(settle_s)
    finally:
        with contextlib.suppress(BaseException):
            where.cli("vm", "stop", vm)
        with contextlib.suppress(BaseException):
            where.cli("vm", "delete", vm)
        with contextlib.suppress(BaseException):
            h1.cli("vdisk", "delete", f"d-{vm}")
    return summarize(size_mib, load, raw_s, runs)


def settled(h: Host, vm: str, shown: dict[str, Any], timeout: float = 60.0
            ) -> dict[str, Any]:
    """The migration's final record. ``vm migrate`` can return a record that still says
    ``running`` (its last poll read the inventory just before the migration thread's
    final write, then the live progress saying done): read it again from ``vm show``."""
    deadline = time.monotonic() + timeout
    while shown.get("outcome") == "running":
        if time.monotonic() > deadline:
            raise SystemExit(f"migration {shown.get('id')} of {vm} still running after "
                             f"{timeout:g} s")
        time.sleep(0.2)
        for m in h.cli_json("vm", "show", vm).get("migrations") or []:
            if m.get("id") == shown.get("id"):
                shown = m
    return shown


def downtime_breakdown(src: Host, dst: Host, vm: str, report: dict[str, Any]
                       ) -> dict[str, float]:
    """Where the downtime went, from the report's phase stamps and the destination VM's
    console: the source's pause to the end of the stream (the mediated path's stop,
    then the rest), the end of the stream to the VM booted on the received memory, the
    VM booted to connected to its new VF (READY, commit, COMMIT, vhost-user), the
    destination phase up to DONE, and DONE to the downtime's end stamp."""
    phases = {p["phase"]: p for p in report["phases"]}
    stop_copy = phases.get("stop_copy")
    dest = phases.get("destination")
    out: dict[str, float] = {}
    if stop_copy is None or dest is None or report.get("downtime_ns") is None:
        return out
    pause_ns = stop_copy["end_ns"] - report["downtime_ns"]
    out["pause_to_end_of_stream"] = (dest["start_ns"] - pause_ns) / 1e6
    out["destination_until_done"] = (dest["end_ns"] - dest["start_ns"]) / 1e6
    # the downtime ends after the source's bookkeeping of the destination phase
    out["done_to_downtime_stamp"] = (pause_ns + report["downtime_ns"] - dest["end_ns"]) / 1e6
    mediated = phases.get("mediated")
    if mediated is not None and mediated["end_ns"] is not None:
        out["mediated_stop"] = (mediated["end_ns"] - pause_ns) / 1e6
        # inventory writes of leaving the mediated phase, the final pages, STATE, END
        out["mediated_left_to_end_of_stream"] = (dest["start_ns"] - mediated["end_ns"]) / 1e6
    # the destination VM's own events (console JSON lines carry a wall-clock ts)
    events = console_events(dst, vm)
    stamps: dict[str, float] = {}
    for e in reversed(events):
        name = e.get("event")
        if name in ("vm_booted", "vm_connected", "vm_incoming") and name not in stamps:
            ts = _ts_ns(e)
            if ts is not None and ts >= pause_ns - 120e9:
                stamps[name] = ts
    if "vm_booted" in stamps:
        out["end_of_stream_to_vm_booted"] = (stamps["vm_booted"] - dest["start_ns"]) / 1e6
        if "vm_connected" in stamps:
            out["vm_booted_to_connected"] = (stamps["vm_connected"] - stamps["vm_booted"]) / 1e6
    return out


def _ts_ns(event: dict[str, Any]) -> float | None:
    ts = event.get("ts")
    if isinstance(ts, (int, float)):
        return float(ts) * 1e9 if ts < 1e12 else float(ts)
    if isinstance(ts, str):
        from datetime import datetime  # noqa: PLC0415

        with contextlib.suppress(ValueError):
            return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() * 1e9
    return None


def _stats(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "max": max(values), "min": min(values)}


def summarize(size_mib: int, load: str, raw_s: float, runs: list[dict[str, Any]]
              ) -> dict[str, Any]:
    stalls = [r["worst_stall_ms"] for r in runs if r["worst_stall_ms"] is not None]
    phases = sorted({p for r in runs for p in r["phases_ms"]})
    breakdown = sorted({p for r in runs for p in r["breakdown_ms"]})
    total = _stats([r["total_ms"] for r in runs])
    return {
        "size_mib": size_mib, "load": load, "repeat": len(runs),
        "raw_copy_ms": raw_s * 1000,
        "downtime_ms": _stats([r["downtime_ms"] for r in runs]),
        "total_ms": total,
        "precopy_rounds": _stats([r["precopy_rounds"] for r in runs]),
        "bytes_sent": _stats([r["bytes_sent"] for r in runs]),
        "worst_stall_ms": _stats(stalls) if stalls else None,
        "ratio_total_vs_raw_copy": total["median"] / (raw_s * 1000),
        "phases_median_ms": {p: statistics.median(
            r["phases_ms"][p] for r in runs if r["phases_ms"].get(p) is not None)
            for p in phases},
        "downtime_breakdown_median_ms": {p: statistics.median(
            r["breakdown_ms"][p] for r in runs if p in r["breakdown_ms"]) for p in breakdown},
        "runs": runs,
    }


# -- main ---------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with contextlib.suppress(OSError, ValueError):
        mem = int(Path("/proc/meminfo").read_text().split()[1]) * 1024
    return {"cpus": os.cpu_count(), "cpu": cpu, "memory_bytes": mem,
            "kernel": platform.release(), "python": platform.python_version(),
            "loadavg": os.getloadavg()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="64,256,1024", help="guest memory sizes, MiB")
    ap.add_argument("--loads", default="idle,qd8w", help=f"of {', '.join(LOADS)}")
    ap.add_argument("--repeat", type=int, default=3, help="migrations per case (alternating)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds the VM runs before the first and between migrations")
    ap.add_argument("--dir", default="/dev/shm",
                    help="where the run directories (VM memory files) live")
    ap.add_argument("--json", dest="json_out", help="write the results as JSON here")
    ap.add_argument("--keep", action="store_true",
                    help="keep the run directories (host logs, VM consoles) afterwards")
    args = ap.parse_args()
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s]
    except ValueError:
        raise SystemExit(f"--sizes: expected MiB numbers, got {args.sizes!r}") from None
    loads = [x for x in args.loads.split(",") if x]
    if unknown := [x for x in loads if x not in LOADS]:
        raise SystemExit(f"--loads: unknown {', '.join(unknown)} (known: {', '.join(LOADS)})")
    if args.repeat < 1 or not sizes or any(s < 16 for s in sizes):
        raise SystemExit("need --repeat >= 1 and sizes of at least 16 MiB")
    work = Path(tempfile.mkdtemp(prefix="vfdmig-", dir=args.dir))
    hosts: list[Host] = []
    results: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    started = time.time()
    try:
        array = StorageArray.create(work / "san", ARRAY_WWN)
        array.lun_create(LUN_BLOCKS, 512)
        array.lun_create(LUN_BLOCKS, 512)
        db = str(work / "cluster.db")
        h1 = Host(work / "r1", "h1", db, array.directory)
        h2 = Host(work / "r2", "h2", db, array.directory)
        hosts += [h1, h2]
        h1.start()
        h2.start()
        a = ARRAY_WWN.canonical()
        h1.cli("datastore", "create", "ds0", "--lun", f"{a}:0", "--lun", f"{a}:1",
               "--chunk-blocks", "2048")
        for size in sizes:
            for load in loads:
                try:
                    results.append(run_case(h1, h2, size, load, args.repeat, args.settle))
                except SystemExit as exc:  # one case failed: report it, go on
                    print(f"  {size} MiB {load}: FAILED: {exc}", flush=True)
                    failed.append({"size_mib": size, "load": load, "error": str(exc)})
    finally:
        for h in hosts:
            h.stop()
        if args.keep:
            print(f"run directories kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    print(f"\n{args.repeat} migrations per case (alternating h1->h2, h2->h1), loopback, "
          f"run dirs in {args.dir}; times in ms, median / max")
    head = (f"{'MiB':>5} {'load':5} {'downtime':>15} {'total':>17} {'rounds':>6} "
            f"{'MiB sent':>9} {'stall':>15} {'raw copy':>9} {'total/raw':>9}")
    print(head)
    for r in results:
        st = r["worst_stall_ms"]  # idle: no guest IO, the "stall" is the time since scan
        stall = f"{st['median']:7.1f}/{st['max']:<7.1f}" if st and r["load"] != "idle" \
            else f"{'-':>15}"
        print(f"{r['size_mib']:>5} {r['load']:5} "
              f"{r['downtime_ms']['median']:7.1f}/{r['downtime_ms']['max']:<7.1f} "
              f"{r['total_ms']['median']:8.1f}/{r['total_ms']['max']:<8.1f} "
              f"{r['precopy_rounds']['median']:6.0f} "
              f"{r['bytes_sent']['median'] / 2**20:9.1f} {stall} "
              f"{r['raw_copy_ms']:9.1f} {r['ratio_total_vs_raw_copy']:9.2f}")
    print("\nmedian phase times, ms (overlapping: mediated spans pre-copy and stop-copy)")
    names = ["prepare", "quiesce", "drain", "handoff", "precopy", "stop_copy",
             "destination", "commit"]
    print(f"{'MiB':>5} {'load':5} " + " ".join(f"{n:>11}" for n in names))
    for r in results:
        print(f"{r['size_mib']:>5} {r['load']:5} " + " ".join(
            f"{r['phases_median_ms'].get(n, float('nan')):11.1f}" for n in names))
    print("\nmedian downtime breakdown, ms")
    for r in results:
        print(f"{r['size_mib']:>5} {r['load']:5} " + ", ".join(
            f"{k} {v:.1f}" for k, v in r["downtime_breakdown_median_ms"].items()))
    summary = {"bench": "migration", "dir": args.dir, "repeat": args.repeat,
               "started": started, "seconds": time.time() - started, "machine": machine(),
               "targets_256mib_ms": {"idle": 100, "qd8w": 300}, "results": results,
               "failed": failed}
    text = json.dumps(summary, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    for f in failed:
        print(f"FAILED {f['size_mib']} MiB {f['load']}: {f['error']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
