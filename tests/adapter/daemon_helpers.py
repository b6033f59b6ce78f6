"""Helpers of the adapter daemon tests: a SAN in a temporary directory, mapping tables
built with the datastore allocator, and adapter processes that are always reaped."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from vfdirect.core.alloc import Datastore, VdiskLayout
from vfdirect.core.array import LunKey
from vfdirect.core.ids import VdiskId
from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray

#: Longest wait for a daemon to start or stop.
WAIT_S = 15.0
ARRAY_WWN = Wwn.naa5(0x6000)
LUN_BLOCKS = 8192  # 4 MiB of 512-byte blocks, sparse
CHUNK = 64


_serial = itertools.count()


class Daemon:
    """``python -m vfdirect.cli.adapter`` in a subprocess, logs (JSON) in a file."""

    def __init__(self, run_dir: Path, *args: str) -> None:
        self.run_dir = run_dir
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        self.log_path = run_dir.parent / f"{run_dir.name}-{next(_serial)}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfdirect.cli.adapter", "--run-dir", str(run_dir),
             "--log-format", "json", *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
        )

    @property
    def sock(self) -> Path:
        return self.run_dir / "pf.sock"

    def wait_ready(self) -> Daemon:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"adapter exited {self.proc.returncode}: "
                                     f"{self.log_path.read_text()}")
            if any(e["event"] == "adapter_ready" for e in self.events()):
                return self
            time.sleep(0.02)
        raise AssertionError("adapter did not become ready in time")

    def wait_exit(self) -> int:
        return self.proc.wait(WAIT_S)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self) -> int:
        """SIGTERM, bounded wait, then SIGKILL; always reaped."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(WAIT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.proc.wait(WAIT_S)
        finally:
            self._log.close()


def make_san(root: Path) -> StorageArray:
    array = StorageArray.create(root / "array0", ARRAY_WWN)
    for _ in range(3):
        array.lun_create(LUN_BLOCKS, 512)
    return array


def datastore(array: StorageArray, luns: tuple[int, ...] = (0, 1)) -> Datastore:
    ds = Datastore("ds0", 512, chunk_blocks=CHUNK)
    for n in luns:
        ds.lun_add(array.lun_get(n), fresh=True)
    return ds


def entry(target: int, lun: int, layout: VdiskLayout) -> dict[str, Any]:
    n = target * 1000 + lun
    return {
        "target": target, "lun": lun, "vdisk_id": layout.vdisk_id,
        "block_size": layout.block_size, "capacity_blocks": layout.capacity_blocks,
        "serial": f"VFD{n:08d}", "wwn": Wwn.naa5(0x7_0000 + n).canonical(),
        "layout": layout.dump(),
    }


def vm_mapping(array: StorageArray) -> tuple[dict[str, Any], dict[str, VdiskLayout]]:
    """The mapping info of one VM: vd-a at (0, 0) and vd-b at (0, 1) on LUNs 0 and 1,
    and vd-c at (0, 2) on LUN 2 (which the tests leave unmasked)."""
    ds = datastore(array)
    a = ds.vdisk_create(VdiskId("vd-a"), 256)
    b = ds.vdisk_create(VdiskId("vd-b"), 10000)  # more than a LUN: spans LUNs 0 and 1
    ds2 = datastore(array, (2,))
    c = ds2.vdisk_create(VdiskId("vd-c"), 128)
    doc = {"format": "vfdirect.vf-mapping", "version": 1,
           "luns": [entry(0, 0, a), entry(0, 1, b), entry(0, 2, c)]}
    return doc, {"vd-a": a, "vd-b": b, "vd-c": c}


def lun_of(key: LunKey, array: StorageArray) -> Path:
    return array.lun_path(key.lun)
