"""Setup shared by the VF tests: an adapter daemon with a SAN, two VMs' mappings (VF 0
under VPORT, the sentinel VF 1 under VPORT2), and bounded polling of VF states."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon_helpers import ARRAY_WWN, CHUNK, entry

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.alloc import Datastore, VdiskLayout
from vfdirect.core.ids import VdiskId
from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray

VPORT = Wwn.naa5(0x6201)
VPORT_NN = Wwn.naa5(0x6202)
VPORT2 = Wwn.naa5(0x6211)
VPORT2_NN = Wwn.naa5(0x6212)
TIMEOUT_S = 10.0


@dataclass
class Layouts:
    a: VdiskLayout  # VF 0, (0, 0): 256 blocks on LUN 0
    b: VdiskLayout  # VF 0, (0, 1): 10000 blocks over LUNs 0 and 1
    c: VdiskLayout  # VF 0, (0, 2): on LUN 2, never masked
    s: VdiskLayout  # VF 1 (sentinel), (0, 0)


def mappings(array: StorageArray) -> tuple[dict[str, Any], dict[str, Any], Layouts]:
    ds = Datastore("ds0", 512, chunk_blocks=CHUNK)
    for n in (0, 1):
        ds.lun_add(array.lun_get(n), fresh=True)
    a = ds.vdisk_create(VdiskId("vd-a"), 256)
    b = ds.vdisk_create(VdiskId("vd-b"), 10000)
    s = ds.vdisk_create(VdiskId("vd-s"), 512)
    ds2 = Datastore("ds2", 512, chunk_blocks=CHUNK)
    ds2.lun_add(array.lun_get(2), fresh=True)
    c = ds2.vdisk_create(VdiskId("vd-c"), 128)
    vm0 = {"format": "vfdirect.vf-mapping", "version": 1,
           "luns": [entry(0, 0, a), entry(0, 1, b), entry(0, 2, c)]}
    vm1 = {"format": "vfdirect.vf-mapping", "version": 1, "luns": [entry(0, 0, s)]}
    return vm0, vm1, Layouts(a, b, c, s)


def configure(pf: PfClient, san: StorageArray, *, pid: int | None = None,
              sentinel: bool = True) -> tuple[dict[str, Any], dict[str, Any], Layouts]:
    """Claim A through the PF: VF 0 to vm0 (LUNs 0, 1 masked to VPORT; LUN 2 not), and
    the sentinel VF 1 to vm1 under VPORT2."""
    pid = os.getpid() if pid is None else pid
    vm0, vm1, layouts = mappings(san)
    pf.array_attach(san.directory)
    pf.vf_enable(4)
    pf.vport_create(VPORT, VPORT_NN)
    pf.vport_create(VPORT2, VPORT2_NN)
    pf.fabric_zone_create("vms", [VPORT, VPORT2, *san.target_ports])
    pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0, 1])
    pf.fabric_mask_grant(VPORT2, ARRAY_WWN, [0, 1])
    assign_vf0(pf, vm0, pid)
    if sentinel:
        pf.vf_assign(1, "vm1", pid)
        pf.vport_bind(VPORT2, 1)
        pf.mapping_load(1, vm1)
    return vm0, vm1, layouts


def assign_vf0(pf: PfClient, vm0: dict[str, Any], pid: int) -> str:
    info = pf.vf_assign(0, "vm0", pid)
    pf.vport_bind(VPORT, 0)
    pf.mapping_load(0, vm0)
    return str(info["socket_path"])


def wait_for(what: str, check: Callable[[], bool], timeout: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def wait_state(pf: PfClient, vf: int, state: str, timeout: float = TIMEOUT_S) -> dict[str, Any]:
    last: dict[str, Any] = {}

    def check() -> bool:
        nonlocal last
        last = pf.vf_get(vf)
        return bool(last["state"] == state)

    try:
        wait_for(f"VF {vf} to be {state}", check, timeout)
    except AssertionError:
        raise AssertionError(f"VF {vf} is {last.get('state')} ({last.get('error')}), "
                             f"not {state}") from None
    return last


def mem_path(tmp: Path, name: str) -> Path:
    """Guest memory files in /dev/shm (removed by the front end's close)."""
    return Path("/dev/shm") / f"vfd-test-{os.getpid()}-{tmp.name}-{name}.mem"


def lun_bytes(array: StorageArray, lun: int, lba: int, count: int) -> bytes:
    with open(array.lun_path(lun), "rb") as f:
        f.seek(lba * 512)
        return f.read(count * 512)


def thread_cpu_ticks(pid: int, tid: int) -> int:
    """utime + stime of one thread, in clock ticks (/proc/<pid>/task/<tid>/stat)."""
    raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[11]) + int(fields[12])
