#!/usr/bin/env python3
"""Datapath benchmark: fio on the backing file vs IO through the guest driver and one VF.

In one run, on one physical LUN file:

* baseline: fio (psync and io_uring engines, QD1 and QD32) on the LUN file itself;
* vfdirect: an adapter daemon with one VF; this process is the VM: it boots the guest
  runtime on a shared-memory file, connects to the VF over vhost-user, scans, and drives
  4 KiB random reads and writes through the virtio-scsi driver and block layer at QD1
  and QD32 against a thick virtual disk mapped onto the same LUN.

Prints IOPS, p50 and p99 latency and the ratio vfdirect/fio per pattern, as a table and
as JSON (``--json FILE``). ``--dir /dev/shm`` is the CPU-bound regime (default); a
directory on a disk with ``--direct`` makes fio bypass the page cache (device-bound).

    .venv/bin/python bench/datapath.py [--dir DIR] [--seconds S] [--size 256MiB] [--json out]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from vfdirect.adapter.pf_client import PfClient
from vfdirect.cli.common import parse_size
from vfdirect.core.alloc import Datastore
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk
from vfdirect.core.guest.layout import LayoutParams
from vfdirect.core.ids import VdiskId
from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray
from vfdirect.vm.block import BlockLayer, IoRequest
from vfdirect.vm.frontend import VhostUserFrontend
from vfdirect.vm.guest import boot_guest
from vfdirect.vm.scsi import ScsiHost

BS = 4096
ARRAY_WWN = Wwn.naa5(0xBE7C0001)
VPORT, VNODE = Wwn.naa5(0xBE7C1001), Wwn.naa5(0xBE7C1000)
PATTERNS = [("randread", 1), ("randread", 32), ("randwrite", 1), ("randwrite", 32)]


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def run_fio(path: Path, rw: str, qd: int, engine: str, seconds: float, direct: bool,
            size: int) -> dict[str, float]:
    cmd = ["fio", "--name=bench", f"--filename={path}", f"--rw={rw}", f"--bs={BS}",
           f"--size={size}", f"--ioengine={engine}", "--time_based", f"--runtime={seconds}",
           "--invalidate=0", f"--direct={int(direct)}", "--output-format=json",
           "--randrepeat=0", "--norandommap"]
    if engine == "psync" and qd > 1:
        cmd += [f"--numjobs={qd}", "--group_reporting"]  # psync: depth = threads
    else:
        cmd += [f"--iodepth={qd}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 60)
    job = json.loads(out.stdout[out.stdout.index("{"):])["jobs"][0]
    side = job["read" if "read" in rw else "write"]
    p = side["clat_ns"]["percentile"]
    return {"iops": side["iops"], "p50_us": p["50.000000"] / 1000, "p99_us": p["99.000000"] / 1000}


def run_vf(layer: BlockLayer, disk: Any, rw: str, qd: int, seconds: float) -> dict[str, float]:
    nblocks = disk.num_blocks // (BS // disk.block_size)
    per = BS // disk.block_size
    rng = random.Random(1)
    payload = os.urandom(BS)
    lat: list[float] = []
    done = 0
    inflight: list[IoRequest] = []

    def submit() -> IoRequest:
        lba = rng.randrange(nblocks) * per
        if rw == "randread":
            return disk.submit_read(lba, per)
        return disk.submit_write(lba, payload)

    end = time.perf_counter() + seconds
    for _ in range(qd):
        inflight.append(submit())
    while True:
        layer.poll(0.5)
        still = []
        for r in inflight:
            if r.done:
                if r.error is not None:
                    raise SystemExit(f"IO failed: {r.error}")
                lat.append(r.latency)
                done += 1
            else:
                still.append(r)
        inflight = still
        now = time.perf_counter()
        if now >= end:
            break
        while len(inflight) < qd:
            inflight.append(submit())
    layer.wait(inflight, 30)
    return {"iops": done / seconds, "p50_us": pct(lat, 50) * 1e6, "p99_us": pct(lat, 99) * 1e6}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", default="/dev/shm", help="where the LUN file lives")
    ap.add_argument("--size", default="256MiB", help="LUN size")
    ap.add_argument("--seconds", type=float, default=5.0, help="per pattern")
    ap.add_argument("--direct", action="store_true", help="fio with O_DIRECT (device-bound)")
    ap.add_argument("--json", dest="json_out", help="write the results as JSON here")
    args = ap.parse_args()
    size = parse_size(args.size)
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed (apt-get install fio)")
    work = Path(tempfile.mkdtemp(prefix="vfdirect-bench-", dir=args.dir))
    mem_path = Path("/dev/shm") / f"vfdirect-bench-{os.getpid()}.mem"
    adapter = None
    frontend = None
    guest = None
    try:
        array = StorageArray.create(work / "array", ARRAY_WWN)
        lun = array.lun_create(size // 512, 512)
        lun_file = array.lun_path(0)
        with open(lun_file, "r+b") as f:  # fill it so that reads hit real data
            chunk = os.urandom(1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)
        results: list[dict[str, Any]] = []
        for rw, qd in PATTERNS:
            for engine in ("psync", "io_uring"):
                r = run_fio(lun_file, rw, qd, engine, args.seconds, args.direct, size)
                results.append({"pattern": rw, "qd": qd, "who": f"fio-{engine}", **r})
                print(f"  fio {engine:8} {rw:9} QD{qd:<2} {r['iops']:>10.0f} IOPS", flush=True)

        run_dir = work / "host"
        adapter = subprocess.Popen(
            [sys.executable, "-m", "vfdirect.cli.adapter", "--run-dir", str(run_dir),
             "--log-format", "json"], stdout=subprocess.DEVNULL,
            stderr=open(work / "adapter.log", "wb"))  # noqa: SIM115
        deadline = time.monotonic() + 20
        while not (run_dir / "pf.sock").exists():
            if time.monotonic() > deadline or adapter.poll() is not None:
                raise SystemExit("adapter did not start: " + (work / "adapter.log").read_text())
            time.sleep(0.05)
        ds = Datastore("bench", 512)
        ds.lun_add(lun, fresh=True)
        layout = ds.vdisk_create(VdiskId("vd-bench"), ds.usage().free_blocks)
        doc = {"format": "vfdirect.vf-mapping", "version": 1, "luns": [{
            "target": 0, "lun": 0, "vdisk_id": layout.vdisk_id, "block_size": 512,
            "capacity_blocks": layout.capacity_blocks, "serial": "BENCH0001",
            "wwn": Wwn.naa5(0xBE7C2001).canonical(), "layout": layout.dump()}]}
        guest = boot_guest(mem_path, params=LayoutParams(memory_size=32 << 20,
                                                         journal_size=4096))
        with PfClient(run_dir / "pf.sock", timeout=30) as pf:
            pf.array_attach(array.directory)
            pf.vf_enable(1)
            pf.vport_create(VPORT, VNODE)
            pf.fabric_zone_create("bench", [VPORT, *array.target_ports])
            pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0])
            sock = str(pf.vf_assign(0, "bench", os.getpid())["socket_path"])
            pf.vport_bind(VPORT, 0)
            pf.mapping_load(0, doc)
        frontend = VhostUserFrontend(sock)
        frontend.connect(guest, deadline=time.monotonic() + 20)
        host = ScsiHost(guest, frontend)
        table = FirmwareTable("bench", "bench", sock, (FwDisk(
            VPORT, 0, 0, layout.vdisk_id, layout.capacity_blocks, 512, "BENCH0001",
            Wwn.naa5(0xBE7C2001)),))
        layer = BlockLayer(host, table)
        (disk,) = layer.scan()
        disk.queue_depth = 64
        for rw, qd in PATTERNS:
            r = run_vf(layer, disk, rw, qd, args.seconds)
            results.append({"pattern": rw, "qd": qd, "who": "vfdirect", **r})
            print(f"  vfdirect          {rw:9} QD{qd:<2} {r['iops']:>10.0f} IOPS", flush=True)
    finally:
        if frontend is not None:
            frontend.close()
        if guest is not None:
            guest.close()
        with contextlib.suppress(FileNotFoundError):
            mem_path.unlink()
        if adapter is not None:
            adapter.terminate()
            try:
                adapter.wait(20)
            except subprocess.TimeoutExpired:
                adapter.kill()
                adapter.wait()
        shutil.rmtree(work, ignore_errors=True)

    print(f"\nregime: {'device-bound (O_DIRECT fio)' if args.direct else 'page cache'}, "
          f"LUN file in {args.dir}, {args.seconds:g} s per pattern, 4 KiB blocks")
    print(f"{'pattern':10} {'QD':>3} {'who':14} {'IOPS':>10} {'p50 us':>8} {'p99 us':>8} "
          f"{'vs fio-psync':>12} {'vs fio-io_uring':>15}")
    by = {(r["pattern"], r["qd"], r["who"]): r for r in results}
    for rw, qd in PATTERNS:
        for who in ("fio-psync", "fio-io_uring", "vfdirect"):
            r = by[(rw, qd, who)]
            ratios = ""
            if who == "vfdirect":
                a = r["iops"] / by[(rw, qd, "fio-psync")]["iops"]
                b = r["iops"] / by[(rw, qd, "fio-io_uring")]["iops"]
                r["ratio_psync"], r["ratio_io_uring"] = a, b
                ratios = f"{a:12.3f} {b:15.3f}"
            print(f"{rw:10} {qd:>3} {who:14} {r['iops']:10.0f} {r['p50_us']:8.1f} "
                  f"{r['p99_us']:8.1f} {ratios}")
    summary = {"regime": "direct" if args.direct else "cached", "dir": args.dir,
               "seconds": args.seconds, "block_size": BS, "results": results,
               "median_vf_ratio_io_uring": statistics.median(
                   r["ratio_io_uring"] for r in results if r["who"] == "vfdirect")}
    text = json.dumps(summary, indent=2)
    if args.json_out:
        Path(args.json_out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
