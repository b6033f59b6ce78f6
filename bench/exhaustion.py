#!/usr/bin/env python3
"""Exhaustion benchmark: a victim VM's latency next to a hostile neighbour VF.

In one run, on one adapter daemon with two VFs (LUN files in ``--dir``):

* victim: ``vm-run --workload load`` on VF 1, 4 KiB random reads and writes (50/50)
  at QD1 and QD8, for ``--seconds`` each;
* neighbour on VF 0 (a hostile guest process, ``tests/proof/exhaustion_helpers.py``):
  none (the unloaded baseline, measured in the same run), ``flood`` (every request
  queue at full depth with the largest requests the VF allows: 126 segments,
  ``--transfer-blocks`` blocks, 65535 by default = 32 MiB), or ``never-collect`` (fills
  its queues, never reaps a completion, re-publishes and kicks without end).

Prints the victim's IOPS, p50 and p99 latency per case, the ratio loaded/unloaded of
the p99 (target: at most 2) and of the IOPS, and the neighbour's throughput, as a table
and as JSON (``--json FILE``); ``--png FILE`` draws the p99s (needs matplotlib).

    .venv/bin/python bench/exhaustion.py [--seconds S] [--io-threads N] [--json out]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "proof"))

from exhaustion_helpers import (
    MAX_SECTORS,
    SEG_MAX,
    HostileProc,
    Rig,
    rss_kib,
    spawn_hostile,
)
from vm_helpers import VmProc

from vfdirect.adapter.pf_client import PfClient

NEIGHBOURS = ("none", "flood", "never-collect")
DEPTHS = (1, 8)
TARGET_P99_RATIO = 2.0


def run_case(rig: Rig, pf: PfClient, work: Path, neighbour: str, qd: int,
             args: argparse.Namespace, n: int) -> dict[str, Any]:
    hostile: HostileProc | None = None
    victim: VmProc | None = None
    vmem = Path("/dev/shm") / f"vfd-bench-exh-{os.getpid()}-victim-{n}"
    hmem = Path("/dev/shm") / f"vfd-bench-exh-{os.getpid()}-hostile-{n}"
    try:
        deadline = time.monotonic() + 30
        while pf.vf_get(0)["state"] == "CONNECTED" or pf.vf_get(0)["outstanding"]:
            if time.monotonic() > deadline:
                raise SystemExit("the previous neighbour's front end did not go")
            time.sleep(0.05)
        if neighbour != "none":
            hostile = spawn_hostile(
                pf, rig, neighbour, hmem, "--queues", "2", "--queue-size", "128",
                "--segments", str(SEG_MAX), "--transfer-blocks", str(args.transfer_blocks),
                "--seconds", str(args.seconds + 60))
            time.sleep(args.settle)  # the neighbour at full speed first
        before = {int(v["vf"]): (v["io"] or {}) for v in pf.adapter_get_stats()["vfs"]}
        victim = VmProc(work, f"victim-{n}", "--memory-file", str(vmem), "--memory-size",
                        "16MiB", "--fwtable", str(rig.write_fwtable(1, "victim")),
                        "--workload", "load", "--depth", str(qd), "--bs", "8",
                        "--read-pct", "50", "--progress-ms", "1000", "--paused")
        victim.wait_event("vm_paused")
        rig.assign(pf, 1, "victim", victim.pid)
        victim.go()
        victim.wait_event("vm_scanned", 60)
        t0 = time.monotonic()
        pids = {"adapter": rig.pid, "victim_vm": victim.pid,
                **({"neighbour_vm": hostile.pid} if hostile is not None else {})}
        cpu0 = {k: cpu_s(p) for k, p in pids.items()}
        rss = []
        while time.monotonic() - t0 < args.seconds:
            rss.append(rss_kib(rig.pid)["VmRSS"])
            time.sleep(0.2)
        cpu = {k: round((cpu_s(p) - cpu0[k]) / (time.monotonic() - t0), 2)
               for k, p in pids.items()}
        victim.stop()
        code, result = victim.result()
        after = {int(v["vf"]): (v["io"] or {}) for v in pf.adapter_get_stats()["vfs"]}
        if code != 0 or not result.get("ok"):
            raise SystemExit(f"victim failed ({code}): {result}")
        elapsed = time.monotonic() - t0
        moved = (after[0].get("bytes_in", 0) + after[0].get("bytes_out", 0)
                 - before[0].get("bytes_in", 0) - before[0].get("bytes_out", 0))
        row = {"neighbour": neighbour, "qd": qd, "iops": result["iops"],
               "p50_us": result["latency"]["p50_us"], "p99_us": result["latency"]["p99_us"],
               "max_us": result["latency"]["max_us"], "ios": result["ios"],
               "neighbour_ios_s": round((after[0].get("ios", 0) - before[0].get("ios", 0))
                                        / elapsed, 1),
               "neighbour_mib_s": round(moved / elapsed / (1 << 20), 1),
               "adapter_rss_max_mib": round(max(rss) / 1024, 1) if rss else None,
               "cpu": cpu}
        if hostile is not None:
            hostile.stop()
            if hostile.proc.poll() not in (0, None):
                raise SystemExit(f"neighbour failed: {hostile.proc.returncode}")
        return row
    finally:
        if victim is not None:
            victim.stop()
        if hostile is not None:
            hostile.stop()
        for path in (vmem, hmem):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process ``pid``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (QD, neighbour): medians over the rounds; each loaded/unloaded ratio taken
    within its round (same machine state), then the median over the rounds."""
    base = {(r["round"], r["qd"]): r for r in rows if r["neighbour"] == "none"}
    out = []
    for qd in DEPTHS:
        for nb in NEIGHBOURS:
            mine = [r for r in rows if r["qd"] == qd and r["neighbour"] == nb]
            if not mine:
                continue

            def med(key: str, rows_: list[dict[str, Any]] = mine) -> float:
                return float(statistics.median(r[key] for r in rows_))

            p99_ratios = [r["p99_us"] / base[(r["round"], qd)]["p99_us"] for r in mine]
            iops_ratios = [r["iops"] / base[(r["round"], qd)]["iops"] for r in mine]
            out.append({"qd": qd, "neighbour": nb, "iops": med("iops"),
                        "p50_us": med("p50_us"), "p99_us": med("p99_us"),
                        "p99_ratio": round(statistics.median(p99_ratios), 2),
                        "p99_ratio_max": round(max(p99_ratios), 2),
                        "iops_ratio": round(statistics.median(iops_ratios), 3),
                        "neighbour_ios_s": round(med("neighbour_ios_s"), 1),
                        "neighbour_mib_s": med("neighbour_mib_s"),
                        "adapter_rss_max_mib": max(r["adapter_rss_max_mib"] or 0
                                                   for r in mine),
                        "cpu": {k: float(statistics.median(r["cpu"].get(k, 0) for r in mine))
                                for k in mine[0]["cpu"]}})
    return out


def plot(summary: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib  # noqa: PLC0415

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise SystemExit("matplotlib is not installed (pip install -e '.[bench]')") from None
    rows = summary["results"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    width = 0.25
    for i, nb in enumerate(NEIGHBOURS):
        ys = [next(r["p99_us"] for r in rows if r["neighbour"] == nb and r["qd"] == qd)
              for qd in DEPTHS]
        ax.bar([x + (i - 1) * width for x in range(len(DEPTHS))], ys, width,
               label=f"neighbour: {nb}")
    for x, qd in enumerate(DEPTHS):
        base = next(r["p99_us"] for r in rows if r["neighbour"] == "none" and r["qd"] == qd)
        ax.hlines(TARGET_P99_RATIO * base, x - 1.5 * width, x + 1.5 * width,
                  linestyles="--", colors="grey", linewidth=0.8)
    ax.set_xticks(range(len(DEPTHS)), [f"QD{qd}" for qd in DEPTHS])
    ax.set_ylabel("victim p99 latency (us), dashed: 2x unloaded")
    ax.set_title(f"Victim VF next to a hostile neighbour VF (io_threads "
                 f"{summary['io_threads']})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm", help="where the LUN files live")
    ap.add_argument("--seconds", type=float, default=8.0, help="per case")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of all cases, interleaved (a shared machine drifts)")
    ap.add_argument("--settle", type=float, default=1.0,
                    help="seconds the neighbour runs before the victim starts")
    ap.add_argument("--io-threads", type=int, default=0, help="adapter --io-threads")
    ap.add_argument("--transfer-blocks", type=int, default=MAX_SECTORS,
                    help="neighbour's blocks per request (512 B)")
    ap.add_argument("--json", dest="json_out", help="write the results as JSON here")
    ap.add_argument("--png", help="draw the p99 latencies here")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vfdirect-bench-exh-"))
    lun_dir = Path(tempfile.mkdtemp(prefix="vfdirect-bench-exh-", dir=args.dir))
    rig = Rig(work, io_threads=args.io_threads,
              hostile_blocks=max(2 * args.transfer_blocks, 16384), lun_dir=lun_dir)
    rows: list[dict[str, Any]] = []
    try:
        rig.start()
        with PfClient(rig.daemon.sock, timeout=30) as pf:
            n = 0
            for rnd in range(args.rounds):
                for qd in DEPTHS:
                    for nb in NEIGHBOURS:
                        n += 1
                        row = run_case(rig, pf, work, nb, qd, args, n)
                        row["round"] = rnd
                        rows.append(row)
                        print(f"  round {rnd} QD{qd} neighbour {nb:13} {row['iops']:8.0f} IOPS "
                              f"p50 {row['p50_us']:8.1f} us p99 {row['p99_us']:8.1f} us",
                              flush=True)
    finally:
        rig.stop()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(lun_dir, ignore_errors=True)

    results = aggregate(rows)
    print(f"\nvictim: 4 KiB random 50/50 read/write, {args.seconds:g} s per case, "
          f"{args.rounds} round(s) (medians; each ratio against the unloaded case of the same "
          f"round, median over rounds); adapter --io-threads {args.io_threads}; neighbour "
          f"requests: {SEG_MAX} segments, {args.transfer_blocks * 512 // 1024} KiB")
    print(f"{'QD':>3} {'neighbour':14} {'IOPS':>8} {'p50 us':>8} {'p99 us':>9} "
          f"{'p99 x':>6} {'IOPS x':>7} {'nb IOs/s':>8} {'nb MiB/s':>9}  CPUs used: "
          f"adapter/victim VM/neighbour VM")
    for r in results:
        c = r["cpu"]
        print(f"{r['qd']:>3} {r['neighbour']:14} {r['iops']:8.0f} {r['p50_us']:8.1f} "
              f"{r['p99_us']:9.1f} {r['p99_ratio']:6.2f} {r['iops_ratio']:7.3f} "
              f"{r['neighbour_ios_s']:8.1f} {r['neighbour_mib_s']:9.1f}  "
              f"{c.get('adapter', 0):.2f}/{c.get('victim_vm', 0):.2f}/"
              f"{c.get('neighbour_vm', 0):.2f}")
    worst = max(r["p99_ratio"] or 0 for r in results)
    summary = {"seconds": args.seconds, "io_threads": args.io_threads,
               "neighbour_segments": SEG_MAX,
               "neighbour_transfer_bytes": args.transfer_blocks * 512,
               "cpus": os.cpu_count(), "target_p99_ratio": TARGET_P99_RATIO,
               "worst_p99_ratio": worst, "target_met": worst <= TARGET_P99_RATIO,
               "rounds": args.rounds, "results": results, "cases": rows}
    print(f"worst p99 loaded/unloaded: {worst:.2f} (target <= {TARGET_P99_RATIO:g}: "
          f"{'met' if worst <= TARGET_P99_RATIO else 'MISSED'})")
    text = json.dumps(summary, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    if args.png:
        plot(summary, Path(args.png))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
