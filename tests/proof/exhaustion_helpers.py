"""Exhaustion (issue 8): hostile guests on a real adapter VF, and the rig around them.

Hostile guest (a vhost-user front end, one process, run by :func:`spawn_hostile`):

* ``flood``: every request queue at full depth all the time with the largest requests
  the VF allows (``seg_max`` data segments, a transfer of up to ``max_sectors``
  blocks; all requests alias one data buffer), READs and WRITEs, as fast as it can;
* ``never-collect``: fills every request queue, then never reaps a completion (its
  driver state, responses and data are never looked at again) while it keeps kicking
  and re-publishing the heads the device handed back in the used ring, the ring
  wrapping over and over: ``--requests`` submissions ask for many times the queue size;
* ``dup-head`` (protocol abuse): re-publishes heads that are still in flight;
* ``avail-jump`` (protocol abuse): moves ``avail.idx`` more than a queue ahead.

The rig (:class:`Rig`): a SAN in a directory, one adapter daemon with two VFs: VF 0 for
the hostile guest (its own vport and LUN), VF 1 for a victim VM (``vm-run``) on another
vport and LUN. Samplers read the adapter's RSS from ``/proc`` and its per-VF counters
over the PF socket.

    python exhaustion_helpers.py hostile --socket S --memory-file M --mode flood ...
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_HERE = Path(__file__).resolve()
for _sub in ("adapter", "vm"):
    _p = str(_HERE.parents[1] / _sub)
    if _p not in sys.path:
        sys.path.insert(0, _p)

from daemon_helpers import Daemon, entry  # noqa: E402
from vf_frontend_helpers import USER_BASE, FrontEnd  # noqa: E402

from vfdirect.adapter.pf_client import PfClient  # noqa: E402
from vfdirect.core.alloc import Datastore  # noqa: E402
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk  # noqa: E402
from vfdirect.core.ids import VdiskId  # noqa: E402
from vfdirect.core.vhost import Channel, MessageParser  # noqa: E402
from vfdirect.core.virtio import DriverLayout, RegionMemory, SplitQueueDriver  # noqa: E402
from vfdirect.core.virtio.scsi import ScsiRequestHeader, ScsiResponseHeader  # noqa: E402
from vfdirect.core.wwn import Wwn  # noqa: E402
from vfdirect.storage import StorageArray  # noqa: E402
from vfdirect.transport.shm import SharedMemory  # noqa: E402

WAIT_S = 15.0
ARRAY_WWN = Wwn.naa5(0xE8A0)
HOSTILE_VPORT, HOSTILE_NODE = Wwn.naa5(0xE8A1), Wwn.naa5(0xE8A2)
VICTIM_VPORT, VICTIM_NODE = Wwn.naa5(0xE8B1), Wwn.naa5(0xE8B2)
#: What the VF presents (``VscsiSettings``): data segments per command, blocks per command.
SEG_MAX = 126
MAX_SECTORS = 0xFFFF
BLOCK = 512

RING_BASE = 0x10000
READ10, WRITE10 = 0x28, 0x2A
MODES = ("flood", "never-collect", "dup-head", "avail-jump")


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def cdb10(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0])


# -- the hostile front end ---------------------------------------------------------------


class HostileFrontEnd(FrontEnd):
    """:class:`FrontEnd` (negotiation, memory table, vrings, kicks) with rings big enough
    for the longest chain the VF accepts (indirect tables of ``queue_size`` entries) and
    a data area of ``data_bytes`` after them."""

    def __init__(self, sock_path: Path | str, mem_path: Path, *, queue_size: int,
                 request_queues: int, data_bytes: int) -> None:
        self.nvrings = 2 + request_queues
        layouts: list[DriverLayout] = []
        base = RING_BASE
        for _ in range(self.nvrings):
            layout = DriverLayout.plan(base, queue_size, event_idx=True,
                                       max_indirect=queue_size)
            layouts.append(layout)
            base = _align(layout.end, 4096)
        self.scratch = _align(base, 1 << 20)  # headers and responses: 64 KiB per queue
        self.data_base = self.scratch + request_queues * 0x10000
        size = _align(self.data_base + data_bytes, 1 << 20)
        self.shm = SharedMemory.create(mem_path, size)
        self.memory = RegionMemory.from_table([(0, USER_BASE, self.shm.buffer)])
        self.drivers = [SplitQueueDriver.create(self.memory, layout) for layout in layouts]
        self.kicks = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in layouts]
        self.calls = [os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK) for _ in layouts]
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(WAIT_S)
        self.sock.connect(str(sock_path))
        self.parser = MessageParser(Channel.FRONTEND_REPLIES)
        self.negotiated = None
        self._tag = 0
        self._events = 0


@dataclass
class HostileResult:
    mode: str
    submitted: int = 0
    completed: int = 0
    kicks: int = 0
    bytes_requested: int = 0
    disconnected: bool = False
    seconds: float = 0.0
    queues: int = 0
    queue_size: int = 0
    segments: int = 0
    transfer_blocks: int = 0


class Hostile:
    """One hostile guest on one VF (see the module text)."""

    def __init__(self, fe: HostileFrontEnd, *, queues: int, queue_size: int, segments: int,
                 transfer_blocks: int, capacity_blocks: int, seed: int = 1) -> None:
        if not 1 <= segments <= min(SEG_MAX, queue_size - 2):
            raise ValueError(f"segments must be in 1..{min(SEG_MAX, queue_size - 2)}")
        if not segments <= transfer_blocks * BLOCK // 512:
            raise ValueError("each segment needs at least 512 bytes")
        self.fe = fe
        self.rqs = list(range(2, 2 + queues))
        self.size = queue_size
        self.blocks = transfer_blocks
        rng = random.Random(seed)
        span = max(1, capacity_blocks - transfer_blocks)
        nbytes = transfer_blocks * BLOCK
        step = nbytes // segments
        self.segs = [(fe.data_base + i * step, step if i < segments - 1
                      else nbytes - i * step) for i in range(segments)]
        # 16 READ and 16 WRITE headers per queue at random LBAs; responses per queue
        self.headers: dict[int, list[tuple[int, int, bool]]] = {}
        self.resp: dict[int, int] = {}
        for i, q in enumerate(self.rqs):
            area = fe.scratch + i * 0x10000
            out = []
            for k in range(32):
                write = k % 2 == 1
                lba = rng.randrange(span)
                raw = ScsiRequestHeader.build(0, 0, cdb10(WRITE10 if write else READ10, lba,
                                                          transfer_blocks)).encode()
                assert len(raw) <= 0x100
                fe.memory.write(area + 0x100 * k, raw)
                out.append((area + 0x100 * k, len(raw), write))
            self.headers[q] = out
            self.resp[q] = area + 0x4000
        self.result = HostileResult("", queues=queues, queue_size=queue_size,
                                    segments=len(self.segs), transfer_blocks=transfer_blocks)
        self._next = 0
        self.stop = False

    def _add(self, q: int) -> None:
        hdr, hlen, write = self.headers[q][self._next % 32]
        self._next += 1
        resp = (self.resp[q], ScsiResponseHeader.size())
        if write:
            readable, writable = [(hdr, hlen), *self.segs], [resp]
        else:
            readable, writable = [(hdr, hlen)], [resp, *self.segs]
        self.fe.drivers[q].add(readable, writable, self._next)
        self.result.submitted += 1
        self.result.bytes_requested += self.blocks * BLOCK

    def _kick(self, q: int) -> None:
        self.fe.kick(q)
        self.result.kicks += 1

    def _wait_calls(self, timeout: float) -> None:
        fds = [self.fe.calls[q] for q in self.rqs]
        ready, _, _ = select.select(fds, [], [], timeout)
        for fd in ready:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(fd)

    def _fill(self, budget: int | None) -> None:
        for q in self.rqs:
            d = self.fe.drivers[q]
            added = 0
            while d.num_free >= 1 and (budget is None or self.result.submitted < budget):
                self._add(q)
                added += 1
            if added and d.publish():
                self._kick(q)

    def flood(self, requests: int | None, deadline: float) -> None:
        """Full depth on every queue until ``requests`` were submitted (or the deadline),
        then collect what is left."""
        self._fill(requests)
        while not self.stop and time.monotonic() < deadline:
            progressed = False
            for q in self.rqs:
                d = self.fe.drivers[q]
                while d.pop_used() is not None:
                    self.result.completed += 1
                    progressed = True
            if requests is not None and self.result.submitted >= requests:
                if all(not self.fe.drivers[q].in_flight for q in self.rqs):
                    return
            else:
                self._fill(requests)
            if not progressed:
                self._wait_calls(0.05)
                self._check_alive()

    def never_collect(self, requests: int | None, deadline: float) -> None:
        """Fill every queue; then re-publish each head the device hands back, never
        reaping it (peeks the used ring's ids only), and kick on every round."""
        self._fill(None)
        mem = self.fe.memory
        avail = {q: self.fe.drivers[q].avail_idx for q in self.rqs}
        seen = dict.fromkeys(self.rqs, 0)
        while not self.stop and time.monotonic() < deadline and \
                (requests is None or self.result.submitted < requests):
            progressed = False
            for q in self.rqs:
                lay = self.fe.drivers[q].layout
                used = mem.load_u16(lay.used_addr + 2)
                n = 0
                while seen[q] != used:
                    head = mem.load_u32(lay.used_addr + 4 + 8 * (seen[q] % self.size))
                    mem.store_u16(lay.avail_addr + 4 + 2 * (avail[q] % self.size), head)
                    avail[q] = (avail[q] + 1) & 0xFFFF
                    seen[q] = (seen[q] + 1) & 0xFFFF
                    n += 1
                if n:
                    mem.store_u16(lay.avail_addr + 2, avail[q])
                    self.result.submitted += n
                    self.result.completed += n
                    self.result.bytes_requested += n * self.blocks * BLOCK
                    progressed = True
                self._kick(q)  # whether or not the device asked for it
            if not progressed:
                self._wait_calls(0.0005)
                self._check_alive()

    def dup_head(self) -> None:
        """One request on the first request queue whose head is published twice in the
        same available-index update: the second is a head in flight (with IO threads
        the first is still executing when the device pops the second)."""
        q = self.rqs[0]
        d = self.fe.drivers[q]
        mem = self.fe.memory
        lay = d.layout
        idx = d.avail_idx
        self._add(q)  # staged: the avail slot is written, avail.idx is not
        head = mem.load_u16(lay.avail_addr + 4 + 2 * (idx % self.size))
        mem.store_u16(lay.avail_addr + 4 + 2 * ((idx + 1) % self.size), head)
        mem.store_u16(lay.avail_addr + 2, (idx + 2) & 0xFFFF)
        self.result.submitted += 1
        self._kick(q)

    def avail_jump(self) -> None:
        q = self.rqs[0]
        lay = self.fe.drivers[q].layout
        idx = self.fe.drivers[q].avail_idx
        self.fe.memory.store_u16(lay.avail_addr + 2, (idx + self.size + 1) & 0xFFFF)
        self._kick(q)
        self.result.submitted += self.size + 1

    def _check_alive(self) -> bool:
        """Whether the VF closed the connection (it faulted): then stop."""
        ready, _, _ = select.select([self.fe.sock], [], [], 0)
        if ready:
            try:
                data = self.fe.sock.recv(1 << 12)
            except OSError:
                data = b""
            if not data:
                self.result.disconnected = True
                self.stop = True
                return True
        return False

    def wait_disconnect(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._check_alive():
                return True
            time.sleep(0.01)
        return False


def hostile_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="exhaustion_helpers.py hostile")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--memory-file", required=True, type=Path)
    ap.add_argument("--mode", choices=MODES, required=True)
    ap.add_argument("--queues", type=int, default=2)
    ap.add_argument("--queue-size", type=int, default=128)
    ap.add_argument("--segments", type=int, default=SEG_MAX)
    ap.add_argument("--transfer-blocks", type=int, default=MAX_SECTORS)
    ap.add_argument("--capacity-blocks", type=int, required=True)
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--seconds", type=float, default=600.0)
    args = ap.parse_args(argv)
    print(json.dumps({"ready": os.getpid()}), flush=True)
    if not sys.stdin.readline().startswith("go"):
        return 2
    fe = HostileFrontEnd(args.socket, args.memory_file, queue_size=args.queue_size,
                         request_queues=args.queues,
                         data_bytes=args.transfer_blocks * BLOCK)
    hostile = None
    try:
        fe.setup(events=0)
        hostile = Hostile(fe, queues=args.queues, queue_size=args.queue_size,
                          segments=args.segments, transfer_blocks=args.transfer_blocks,
                          capacity_blocks=args.capacity_blocks)
        hostile.result.mode = args.mode

        def on_term(*_: object) -> None:
            assert hostile is not None
            hostile.stop = True

        signal.signal(signal.SIGTERM, on_term)
        start = time.monotonic()
        deadline = start + args.seconds
        if args.mode == "flood":
            hostile.flood(args.requests, deadline)
        elif args.mode == "never-collect":
            hostile.never_collect(args.requests, deadline)
        elif args.mode == "dup-head":
            hostile.dup_head()
            hostile.wait_disconnect(WAIT_S)
        else:
            hostile.avail_jump()
            hostile.wait_disconnect(WAIT_S)
        hostile.result.seconds = round(time.monotonic() - start, 3)
        print(json.dumps(hostile.result.__dict__), flush=True)
        return 0
    finally:
        hostile = None
        fe.close()


@dataclass
class HostileProc:
    """A hostile guest process (always reaped by :meth:`stop`)."""

    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self, timeout: float) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in out.splitlines() if ln.startswith("{") and "mode" in ln]
        if self.proc.returncode != 0 or not lines:
            raise AssertionError(f"hostile guest exit {self.proc.returncode}: {err[-3000:]}")
        return dict(json.loads(lines[-1]))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT_S)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def spawn_hostile(pf: PfClient, rig: Rig, mode: str, mem_path: Path,
                  *extra: str) -> HostileProc:
    """Start a hostile guest, assign it VF 0 (vport bound, mapping loaded), let it go."""
    proc = subprocess.Popen(
        [sys.executable, str(_HERE), "hostile", "--socket", str(rig.vf_socket(0)),
         "--memory-file", str(mem_path), "--mode", mode,
         "--capacity-blocks", str(rig.hostile_blocks), *extra],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hp = HostileProc(proc)
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], WAIT_S)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith('{"ready"'):
            raise AssertionError(f"hostile guest did not start: {line!r}")
        rig.assign(pf, 0, "hostile", proc.pid)
        hp.go()
    except BaseException:
        hp.stop()
        raise
    return hp


# -- the rig -------------------------------------------------------------------------------


class Rig:
    """A SAN and an adapter with VF 0 (hostile) and VF 1 (victim) configured."""

    def __init__(self, root: Path, *, io_threads: int, hostile_blocks: int,
                 victim_blocks: int = 8192, lun_dir: Path | None = None) -> None:
        self.root = root
        self.hostile_blocks = hostile_blocks
        self.array = StorageArray.create((lun_dir or root) / "array", ARRAY_WWN)
        self.array.lun_create(hostile_blocks + 64, BLOCK)
        self.array.lun_create(victim_blocks + 64, BLOCK)
        self.daemon = Daemon(root / "host", "--io-threads", str(io_threads))
        self.docs: dict[int, dict[str, Any]] = {}
        self.vports = {0: HOSTILE_VPORT, 1: VICTIM_VPORT}

    def start(self) -> Rig:
        self.daemon.wait_ready()
        with PfClient(self.daemon.sock, timeout=WAIT_S) as pf:
            pf.array_attach(self.array.directory)
            pf.vf_enable(2)
            for vf, (port, node) in {0: (HOSTILE_VPORT, HOSTILE_NODE),
                                     1: (VICTIM_VPORT, VICTIM_NODE)}.items():
                pf.vport_create(port, node)
                pf.fabric_zone_create(f"z{vf}", [port, *self.array.target_ports])
                pf.fabric_mask_grant(port, ARRAY_WWN, [vf])
                ds = Datastore(f"ds{vf}", BLOCK)
                ds.lun_add(self.array.lun_get(vf), fresh=True)
                blocks = self.hostile_blocks if vf == 0 else ds.usage().free_blocks
                layout = ds.vdisk_create(VdiskId(f"vd-{vf}"), blocks)
                self.docs[vf] = {"format": "vfdirect.vf-mapping", "version": 1,
                                 "luns": [entry(0, 0, layout)]}
        return self

    @property
    def pid(self) -> int:
        return self.daemon.proc.pid

    def vf_socket(self, vf: int) -> Path:
        return self.daemon.run_dir / f"vf{vf}.sock"

    def assign(self, pf: PfClient, vf: int, name: str, pid: int) -> None:
        if pf.vf_get(vf)["vm"] is not None:
            pf.vf_unassign(vf)
        pf.vf_assign(vf, name, pid)
        if pf.vf_get(vf)["vport"] is None:
            pf.vport_bind(self.vports[vf], vf)
        pf.mapping_load(vf, self.docs[vf])

    def fwtable(self, vf: int, name: str) -> FirmwareTable:
        return FirmwareTable(name, f"{name}-uuid", str(self.vf_socket(vf)), tuple(
            FwDisk(self.vports[vf], e["target"], e["lun"], e["vdisk_id"],
                   e["capacity_blocks"], e["block_size"], e["serial"], Wwn.parse(e["wwn"]))
            for e in self.docs[vf]["luns"]))

    def write_fwtable(self, vf: int, name: str) -> Path:
        path = self.root / f"{name}-fw.json"
        path.write_text(json.dumps(self.fwtable(vf, name).dump()))
        return path

    def stop(self) -> None:
        self.daemon.stop()


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon, RssShmem of ``pid`` (KiB) from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(rest.split()[0])
    return out


def vf_outstanding(pf: PfClient) -> dict[int, int]:
    return {int(v["vf"]): int(v["outstanding"]) for v in pf.adapter_get_stats()["vfs"]}


def main() -> int:
    if len(sys.argv) >= 2 and sys.argv[1] == "hostile":
        return hostile_main(sys.argv[2:])
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
