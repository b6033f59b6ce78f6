"""Fuzz target ``virtqueue``: descriptor chains and virtio-scsi request headers placed in
the LIVE guest memory of a front end connected to the real adapter's VF 0, then kicked.

Each input makes a fresh front end (guest memory with a canary past the granted region),
writes a request header (valid LUN or raw LUN bytes, fuzzed tag/attributes, a known or
raw CDB), descriptors (a well-formed command chain with at most one field changed, or
random descriptors, possibly through an indirect table, with addresses inside the data
area, anywhere, across the end of the granted memory or anywhere in 64 bits), publishes
a head with a fuzzed avail step and kicks the request queue. Invariants (a violation is
a crash input):

* every published chain is answered with a used element (for a well-formed chain: a
  virtio-scsi response byte of the specification), or the VF enters ERROR with a reason
  and then comes back with ``vf_reset`` (the harness resets it); never a hang;
* the canary past the granted memory never changes; the sentinel VF stays CONNECTED
  (the rig checks its verify, the auditor, and the LUN bytes outside the extents).

Run: ``.venv/bin/python fuzz/fuzz_virtqueue.py -max_total_time=60 -seed=1 [corpus]``.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from typing import Any

import atheris
import fuzzlib
from fuzzlib import Stats, Violation

# Coverage of the adapter (another process) cannot reach libFuzzer: only the virtio-scsi
# codec the harness reads responses with is instrumented.
with atheris.instrument_imports(include=["vfdirect.core.virtio"]):
    from vfdirect.core.virtio.layout import DescFlag
    from vfdirect.core.virtio.scsi import ScsiResponseHeader, VirtioScsiResponse, encode_lun

from live import FuzzVf
from vf_frontend_helpers import DATA_BASE, MEM_SIZE, RESP_SIZE, FrontEnd, rw

from vfdirect.core.scsi import Status

TARGET = "virtqueue"
QUEUE = 2
QSIZE = 64
_DESC = struct.Struct("<QIHH")
HDR = DATA_BASE
RESP = DATA_BASE + 0x100
DATA = DATA_BASE + 0x200
INDIRECT = DATA_BASE + 0x2000
ANSWER_WAIT_S = 10.0
_RESPONSES = {int(r) for r in VirtioScsiResponse}


def _addr(fdp: Any) -> int:
    return fdp.PickValueInList([
        DATA_BASE + fdp.ConsumeIntInRange(0, 0x4000),
        fdp.ConsumeIntInRange(0, MEM_SIZE),
        MEM_SIZE - 64 + fdp.ConsumeIntInRange(0, 128),
        fdp.ConsumeIntInRange(0, (1 << 64) - 1)])


def _length(fdp: Any) -> int:
    return fdp.PickValueInList([0, 1, 51, 108, 512, 4096, fdp.ConsumeIntInRange(0, 300),
                                fdp.ConsumeIntInRange(0, (1 << 32) - 1)])


def _header(fdp: Any) -> bytes:
    lun = encode_lun(0, fdp.ConsumeIntInRange(0, 3)) if fdp.ConsumeIntInRange(0, 3) else \
        fdp.ConsumeBytes(8).ljust(8, b"\0")
    tag, attr, prio, crn = (fdp.ConsumeInt(8) & ((1 << 64) - 1), fdp.ConsumeIntInRange(0, 255),
                            fdp.ConsumeIntInRange(0, 255), fdp.ConsumeIntInRange(0, 255))
    kind = fdp.ConsumeIntInRange(0, 4)
    if kind == 0:
        cdb = rw(0x28, fdp.ConsumeIntInRange(0, 20000), fdp.ConsumeIntInRange(0, 16))
    elif kind == 1:
        cdb = rw(0x2A, fdp.ConsumeIntInRange(0, 20000), fdp.ConsumeIntInRange(0, 16))
    elif kind == 2:
        cdb = bytes([0x12, 0, 0, 0, 96, 0])
    else:
        cdb = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 32))
    return lun + struct.pack("<QBBB", tag, attr, prio, crn) + cdb.ljust(32, b"\0")[:32]


def _chain(fdp: Any) -> tuple[list[tuple[int, tuple[int, int, int, int]]], int, bool]:
    """Descriptors by slot, the head to publish, and whether the chain is well-formed
    (so that its response header lies at :data:`RESP`)."""
    if fdp.ConsumeIntInRange(0, 2) == 2:
        descs = []
        for _ in range(fdp.ConsumeIntInRange(1, 5)):
            descs.append((fdp.ConsumeIntInRange(0, QSIZE - 1),
                          (_addr(fdp), _length(fdp), fdp.ConsumeIntInRange(0, 7),
                           fdp.ConsumeIntInRange(0, 70))))
        head = fdp.PickValueInList([descs[0][0], fdp.ConsumeIntInRange(0, 0xFFFF)])
        return descs, head, False
    slots = [fdp.ConsumeIntInRange(0, QSIZE - 1)]
    while len(slots) < 4:
        s = (slots[-1] + 1 + fdp.ConsumeIntInRange(0, 3)) % QSIZE
        if s not in slots:
            slots.append(s)
    n, w = int(DescFlag.NEXT), int(DescFlag.WRITE)
    data_len = fdp.PickValueInList([0, 511, 512, 4096, 8192])
    out_len = fdp.PickValueInList([0, 0, 512, 4096])
    chain: list[list[int]] = [[HDR, 51, n, slots[1]]]
    if out_len:
        chain.append([DATA + 0x10000, out_len, n, slots[2]])
    chain.append([RESP, RESP_SIZE, w | (n if data_len else 0), slots[len(chain) + 1]])
    if data_len:
        chain.append([DATA, data_len, w, 0])
    well_formed = True
    if fdp.ConsumeBool():  # one field changed
        i, fld = fdp.ConsumeIntInRange(0, len(chain) - 1), fdp.ConsumeIntInRange(0, 3)
        chain[i][fld] = [_addr(fdp), _length(fdp), fdp.ConsumeIntInRange(0, 7),
                         fdp.ConsumeIntInRange(0, 70)][fld]
        well_formed = False
    descs = [(slots[i], (a, b, c, d)) for i, (a, b, c, d) in enumerate(chain)]
    return descs, slots[0], well_formed


def setup() -> Callable[[bytes], None]:
    stats = Stats(TARGET)
    vf = FuzzVf(fuzzlib.config(), stats)

    def test_one(data: bytes) -> None:
        fdp = fuzzlib.provider(data)
        header = _header(fdp)
        descs, head, well_formed = _chain(fdp)
        avail_step = fdp.PickValueInList([1, 1, 1, 0, fdp.ConsumeIntInRange(0, 0xFFFF)])
        indirect = fdp.ConsumeIntInRange(1, 8) if fdp.ConsumeIntInRange(0, 5) == 0 else None
        stats.add("inputs")
        fe = vf.front_end()
        try:
            _inject(fe, header, descs=descs, head=head, avail_step=avail_step,
                    indirect=indirect)
            vf.sample_inflight()
            if avail_step:
                _answer(vf, fe, head, well_formed and indirect is None, stats)
            else:
                stats.add("unpublished")
        finally:
            vf.finish(fe)
        stats.tick()

    return test_one


def _inject(fe: FrontEnd, header: bytes, *, descs: list[tuple[int, tuple[int, int, int, int]]],
            head: int, avail_step: int, indirect: int | None) -> None:
    """Raw descriptors and the request bytes written into request queue 2, ``head``
    published, bypassing the driver's own checks."""
    mem = fe.memory
    layout = fe.drivers[QUEUE].layout
    mem.write(HDR, header)
    mem.write(RESP, b"\xEE" * RESP_SIZE)
    for slot, (addr, length, flags, nxt) in descs:
        mem.write(layout.desc_addr + 16 * slot, _DESC.pack(addr, length, flags, nxt))
    if indirect is not None:
        table = b"".join(_DESC.pack(a, n, f & ~DescFlag.INDIRECT, x % indirect)
                         for _, (a, n, f, x) in descs[:indirect])
        mem.write(INDIRECT, table)
        mem.write(layout.desc_addr + 16 * (head % QSIZE),
                  _DESC.pack(INDIRECT, len(table), DescFlag.INDIRECT, 0))
    avail = layout.avail_addr
    idx = mem.load_u16(avail + 2)
    mem.store_u16(avail + 4 + 2 * (idx % QSIZE), head & 0xFFFF)
    mem.store_u16(avail + 2, (idx + avail_step) & 0xFFFF)
    fe.kick(QUEUE)


def _answer(vf: FuzzVf, fe: FrontEnd, head: int, well_formed: bool, stats: Stats) -> None:
    """Wait for a used element or ERROR; check the response of a well-formed chain."""
    deadline = time.monotonic() + ANSWER_WAIT_S
    while True:
        if fe.used_idx(QUEUE) != 0:
            break
        if vf.state() == "ERROR":
            stats.add("rejected")
            stats.add("vf_error_answers")
            return
        if time.monotonic() > deadline:
            stats.add("hangs")
            stats.flush()
            raise Violation(f"a published chain (head {head}) got neither a used element "
                            f"nor ERROR in {ANSWER_WAIT_S:g} s")
        time.sleep(0.002)
    used = fe.drivers[QUEUE].layout.used_addr
    got = fe.memory.load_u32(used + 4)
    stats.add("used_answers")
    if got != head:
        raise Violation(f"used element for head {got}, published {head}")
    if not well_formed:
        stats.add("processed")
        return
    resp = ScsiResponseHeader.decode(fe.memory.read(RESP, RESP_SIZE))
    if resp.response not in _RESPONSES:
        raise Violation(f"response byte {resp.response} is not a virtio-scsi response")
    if resp.response == VirtioScsiResponse.OK:
        stats.add("processed")
        if resp.status == Status.CHECK_CONDITION:
            stats.add("check_conditions")
    else:
        stats.add("rejected")
        stats.add(f"response_{VirtioScsiResponse(resp.response).name.lower()}")


if __name__ == "__main__":
    fuzzlib.main(TARGET, setup)
