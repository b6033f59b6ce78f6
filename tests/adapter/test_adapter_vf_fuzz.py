"""Fuzzing the VF through real processes (bounded examples): random vhost-user messages
and random descriptor chains from a front end never crash the adapter; at worst the
offending VF enters ERROR (and only it: the sentinel VF keeps serving verified IO), and
``vf_reset`` clears it. The invariant of STYLE.md: a ring descriptor decodes, or yields
a VF error state, never a crash."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import Daemon, make_san
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from vf_frontend_helpers import DATA_BASE, FrontEnd, rw
from vf_test_helpers import assign_vf0, configure, mem_path, wait_for

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.scsi import Status
from vfdirect.core.vhost.messages import FrontendRequest, HeaderFlag
from vfdirect.core.virtio.layout import DescFlag
from vfdirect.core.virtio.scsi import ScsiRequestHeader, VirtioScsiResponse

TIMEOUT_S = 10.0
#: Examples per fuzz test; VFD_FUZZ_EXAMPLES=n runs n random (not derandomized) ones.
EXAMPLES = int(os.environ.get("VFD_FUZZ_EXAMPLES", "25"))
DERANDOMIZE = "VFD_FUZZ_EXAMPLES" not in os.environ
_DESC = struct.Struct("<QIHH")


class Rig:
    """One adapter with VF 0 (fuzzed) and the sentinel VF 1 connected."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.san = make_san(tmp / "san")
        self.daemon = Daemon(tmp / "host1").wait_ready()
        self.pf = PfClient(self.daemon.sock, timeout=TIMEOUT_S)
        self.vm0, _, _ = configure(self.pf, self.san)
        self.sentinel = FrontEnd(self.pf.vf_get(1)["socket_path"],
                                 mem_path(tmp, "sentinel")).setup()
        self.round = 0
        self.resets = 0
        wait_for("the sentinel to connect",
                 lambda: self.pf.vf_get(1)["state"] == "CONNECTED")
        self.baseline_fds = self.daemon.open_fds()

    def front_end(self, *, setup: bool = True) -> FrontEnd:
        self.round += 1
        fe = FrontEnd(self.pf.vf_get(0)["socket_path"], mem_path(self.tmp, f"r{self.round}"))
        if setup:
            try:
                fe.setup()
            except BaseException:
                fe.close()
                raise
        return fe

    def settle(self) -> None:
        """After an example: the adapter answers, VF 0 is usable again, the sentinel VF
        serves verified IO."""
        assert self.daemon.proc.poll() is None, "the adapter died"

        def vf0_settled() -> bool:
            # the VF thread is done with the front end, and the PF has heard of it
            io = self.pf.adapter_get_stats()["vfs"][0]["io"]
            state = self.pf.vf_get(0)["state"]
            if io["front_end_pid"] is not None:
                return False
            return bool(state == ("ERROR" if io["fault"] else "ASSIGNED"))

        wait_for("VF 0 to settle after its front end left", vf0_settled)
        vf = self.pf.vf_get(0)
        if vf["state"] == "ERROR":
            assert vf["error"]
            assert self.pf.vf_reset(0)["state"] == "IDLE"
            assign_vf0(self.pf, self.vm0, os.getpid())
            self.resets += 1
        assert self.pf.vf_get(1)["state"] == "CONNECTED"
        data = os.urandom(512)
        lba = self.round % 500
        w = self.sentinel.scsi(0, 0, rw(0x2A, lba, 1), data_out=data)
        r = self.sentinel.scsi(0, 0, rw(0x28, lba, 1), data_in=512)
        assert (w.status, r.status, r.data) == (Status.GOOD, Status.GOOD, data)

    def close(self) -> None:
        self.sentinel.close()
        self.pf.close()
        self.daemon.stop()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    try:
        yield r
    finally:
        r.close()
    bad = [e for e in r.daemon.events() if e["event"] in (
        "vf_internal_error", "pf_internal_error", "vf_unmap_deferred", "vf_thread_stuck")]
    assert not bad, bad


# -- random vhost-user messages ---------------------------------------------------------

_CODES = st.one_of(st.sampled_from([int(c) for c in FrontendRequest]), st.integers(0, 60),
                   st.integers(0, 0xFFFFFFFF))
_FLAGS = st.one_of(st.just(1), st.just(1 | HeaderFlag.NEED_REPLY), st.integers(0, 0xFF))
_PAYLOAD = st.one_of(st.binary(max_size=0), st.binary(min_size=8, max_size=8),
                     st.binary(min_size=40, max_size=40), st.binary(max_size=300),
                     st.builds(lambda n, a: struct.pack("<QQ", n, a),
                               st.integers(0, 260), st.integers(0, (1 << 64) - 1)))
_MESSAGE = st.tuples(_CODES, _FLAGS, _PAYLOAD, st.integers(0, 3),
                     st.one_of(st.none(), st.integers(-8, 8)))


def _raw_message(code: int, flags: int, payload: bytes, size_delta: int | None) -> bytes:
    size = len(payload) if size_delta is None else max(0, len(payload) + size_delta)
    return struct.pack("<III", code, flags, size) + payload


def _fds(kind: int) -> list[int]:
    if kind == 0:
        return []
    if kind == 1:
        return [os.eventfd(0, os.EFD_CLOEXEC)]
    if kind == 2:
        return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
    return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]


def test_fuzz_random_vhost_user_messages_fault_only_that_vf(rig: Rig) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow])
    @given(messages=st.lists(_MESSAGE, min_size=1, max_size=6), setup_first=st.booleans())
    def example(messages: list[tuple[int, int, bytes, int, int | None]],
                setup_first: bool) -> None:
        fe = rig.front_end(setup=setup_first)
        try:
            for code, flags, payload, fd_kind, delta in messages:
                fds = _fds(fd_kind)
                try:
                    data = _raw_message(code, flags, payload, delta)
                    if fds:
                        socket.send_fds(fe.sock, [data], fds)
                    else:
                        fe.sock.sendall(data)
                except OSError:
                    break  # the VF closed the connection
                finally:
                    for fd in fds:
                        os.close(fd)
            # a well-formed request afterwards: answered, or the connection is gone
            with contextlib.suppress(OSError, ConnectionError, TimeoutError, Exception):
                fe.sock.settimeout(2.0)
                fe.sock.sendall(_raw_message(int(FrontendRequest.GET_QUEUE_NUM), 1, b"",
                                             None))
                fe.sock.recv(1 << 16)
        finally:
            fe.close()
        rig.settle()

    example()
    assert rig.round >= EXAMPLES
    assert rig.daemon.open_fds() == rig.baseline_fds  # every fd a front end sent is closed
    print("vhost-user fuzz:", _summary(rig))


# -- random descriptor chains -----------------------------------------------------------

_ADDR = st.one_of(st.integers(DATA_BASE, DATA_BASE + 0x4000),  # inside, in the data area
                  st.integers(0, 1 << 23),  # anywhere in guest memory (rings too)
                  st.integers((8 << 20) - 64, (8 << 20) + 64),  # across the end
                  st.integers(0, (1 << 64) - 1))
_DESCRIPTOR = st.tuples(_ADDR, st.one_of(st.integers(0, 300), st.integers(0, (1 << 32) - 1)),
                        st.integers(0, 7), st.integers(0, 70))
_CDBS = st.one_of(st.just(rw(0x28, 0, 1)), st.just(rw(0x2A, 0, 1)),
                  st.just(bytes([0x12, 0, 0, 0, 96, 0])), st.binary(min_size=1, max_size=16))


@st.composite
def _chains(draw: st.DrawFn) -> tuple[list[tuple[int, tuple[int, int, int, int]]], int]:
    """Either random descriptors, or a well-formed command chain (request header, response,
    data-in) with at most one field changed: descriptors, and the head to publish."""
    if draw(st.booleans()):
        descs = draw(st.lists(st.tuples(st.integers(0, 63), _DESCRIPTOR), min_size=1,
                              max_size=5))
        return descs, draw(st.one_of(st.integers(0, 63), st.integers(64, 0xFFFF)))
    s0, s1, s2 = draw(st.lists(st.integers(0, 63), min_size=3, max_size=3, unique=True))
    n = DescFlag.NEXT
    w = DescFlag.WRITE
    chain = [[DATA_BASE, 51, int(n), s1], [DATA_BASE + 0x100, 108, int(w | n), s2],
             [DATA_BASE + 0x200, draw(st.sampled_from([0, 511, 512, 4096])), int(w), 0]]
    if draw(st.booleans()):
        i, field = draw(st.integers(0, 2)), draw(st.integers(0, 3))
        chain[i][field] = draw(_DESCRIPTOR)[field]
    slots = (s0, s1, s2)
    return [(slots[i], (a, b, c, d)) for i, (a, b, c, d) in enumerate(chain)], s0


def test_fuzz_random_descriptor_chains_fault_only_that_vf(rig: Rig) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=DERANDOMIZE,
              suppress_health_check=[HealthCheck.too_slow])
    @given(chain=_chains(),
           avail_step=st.one_of(st.just(1), st.just(1), st.integers(0, 0xFFFF)),
           target=st.integers(0, 3), lun=st.integers(0, 3), cdb=_CDBS,
           indirect=st.one_of(st.none(), st.none(), st.integers(1, 8)))
    def example(chain: tuple[list[tuple[int, tuple[int, int, int, int]]], int],
                avail_step: int, target: int, lun: int, cdb: bytes,
                indirect: int | None) -> None:
        descs, head = chain
        fe = rig.front_end()
        try:
            _inject(fe, descs, head, avail_step, target, lun, cdb, indirect)
            if avail_step:  # (0 publishes nothing: there is nothing to answer)
                _wait_answer_or_error(rig, fe)
        finally:
            fe.close()
        rig.settle()

    example()
    assert rig.round >= EXAMPLES
    assert rig.daemon.open_fds() == rig.baseline_fds
    print("descriptor fuzz:", _summary(rig))


def _summary(rig: Rig) -> dict[str, int]:
    counts: dict[str, int] = {}
    for e in rig.daemon.events():
        if e["event"] in ("vf_fault", "vf_vhost_refused", "vf_disconnect", "vf_connect"):
            counts[e["event"]] = counts.get(e["event"], 0) + 1
    counts["resets"] = rig.resets
    return counts


def _inject(fe: FrontEnd, descs: list[tuple[int, tuple[int, int, int, int]]], head: int,
            avail_step: int, target: int, lun: int, cdb: bytes, indirect: int | None) -> None:
    """Write raw descriptors (and plausible request bytes for them to point at) into
    request queue 2 and publish ``head``, bypassing the driver's own checks."""
    mem = fe.memory
    layout = fe.drivers[2].layout
    mem.write(DATA_BASE, ScsiRequestHeader.build(target, lun, cdb[:32]).encode())
    for slot, (addr, length, flags, nxt) in descs:
        mem.write(layout.desc_addr + 16 * slot, _DESC.pack(addr, length, flags, nxt))
    if indirect is not None:
        # an indirect table at DATA_BASE + 0x2000 made of the same descriptors
        table = b"".join(_DESC.pack(a, n, f & ~DescFlag.INDIRECT, x % indirect)
                         for _, (a, n, f, x) in descs[:indirect])
        mem.write(DATA_BASE + 0x2000, table)
        mem.write(layout.desc_addr + 16 * (head % 64),
                  _DESC.pack(DATA_BASE + 0x2000, len(table), DescFlag.INDIRECT, 0))
    avail = layout.avail_addr
    idx = mem.load_u16(avail + 2)
    mem.store_u16(avail + 4 + 2 * (idx % 64), head)
    mem.store_u16(avail + 2, (idx + avail_step) & 0xFFFF)
    fe.kick(2)


def _wait_answer_or_error(rig: Rig, fe: FrontEnd) -> None:
    used = fe.drivers[2].layout.used_addr + 2

    def done() -> bool:
        return fe.used_idx(2) != 0 or rig.pf.vf_get(0)["state"] == "ERROR" \
            or fe.memory.load_u16(used) != 0

    wait_for("the VF to answer the chain or enter ERROR", done)


def test_fuzz_rig_counts(rig: Rig) -> None:
    """The rig itself: a well-formed front end serves, and the sentinel is verified."""
    fe = rig.front_end()
    try:
        c = fe.scsi(0, 0, rw(0x28, 0, 1), data_in=512)
        assert (c.response, c.status) == (VirtioScsiResponse.OK, Status.GOOD)
    finally:
        fe.close()
    rig.settle()
    info: dict[str, Any] = rig.pf.vf_get(0)
    assert info["state"] == "ASSIGNED"
