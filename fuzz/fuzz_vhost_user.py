"""Fuzz target ``vhost_user``: vhost-user messages to the real adapter's VF 0 socket.

Each input opens a fresh front end (guest memory with a canary past the region it may
grant), optionally negotiates and starts the device properly, then sends 1 to 6
messages: a known or random request code, fuzzed flags, payloads shaped like the
protocol's (u64, vring state, vring address, memory tables whose regions point inside,
across or past the memory file, raw bytes), a size field that may lie, and 0 to 3 file
descriptors (eventfds, /dev/null, the guest memory). Then a well-formed GET_QUEUE_NUM.
Invariants (a violation is a crash input):

* a reply is a well-formed vhost-user reply (version 1, REPLY flag, the request's code);
  otherwise the VF closes the connection or enters ERROR, and ``vf_reset`` brings it
  back; it never hangs (the VF settles once the front end is gone);
* the canary past the granted memory never changes; the sentinel VF stays CONNECTED.

Run: ``.venv/bin/python fuzz/fuzz_vhost_user.py -max_total_time=60 -seed=1 [corpus]``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Any

import atheris
import fuzzlib
from fuzzlib import Stats, Violation

# Coverage of the adapter (another process) cannot reach libFuzzer: only the vhost-user
# message definitions are instrumented.
with atheris.instrument_imports(include=["vfdirect.core.vhost"]):
    from vfdirect.core.vhost.messages import FrontendRequest, HeaderFlag

from live import FuzzVf
from vf_frontend_helpers import MEM_SIZE, USER_BASE, FrontEnd

TARGET = "vhost_user"
_HDR = struct.Struct("<III")
_CODES = [int(c) for c in FrontendRequest]
REPLY_WAIT_S = 0.2
PROBE_WAIT_S = 0.5


#: The payload shape each request takes (vhost-user.rst), as a kind of :func:`_payload`.
_SHAPES = {
    **{int(c): 0 for c in (FrontendRequest.GET_FEATURES, FrontendRequest.SET_OWNER,
                           FrontendRequest.RESET_OWNER, FrontendRequest.GET_PROTOCOL_FEATURES,
                           FrontendRequest.GET_QUEUE_NUM, FrontendRequest.RESET_DEVICE,
                           FrontendRequest.GET_MAX_MEM_SLOTS, FrontendRequest.GET_STATUS)},
    **{int(c): 1 for c in (FrontendRequest.SET_FEATURES, FrontendRequest.SET_PROTOCOL_FEATURES,
                           FrontendRequest.SET_VRING_KICK, FrontendRequest.SET_VRING_CALL,
                           FrontendRequest.SET_VRING_ERR, FrontendRequest.SET_STATUS)},
    **{int(c): 2 for c in (FrontendRequest.SET_VRING_NUM, FrontendRequest.SET_VRING_BASE,
                           FrontendRequest.GET_VRING_BASE, FrontendRequest.SET_VRING_ENABLE,
                           FrontendRequest.VRING_KICK)},
    int(FrontendRequest.SET_VRING_ADDR): 3,
    int(FrontendRequest.SET_MEM_TABLE): 4,
}


#: The descriptors each request takes: 1 an eventfd, 4 the guest memory (else none).
_FD_KINDS = {int(FrontendRequest.SET_VRING_KICK): 1, int(FrontendRequest.SET_VRING_CALL): 1,
             int(FrontendRequest.SET_VRING_ERR): 1, int(FrontendRequest.SET_MEM_TABLE): 4}


def _payload(fdp: Any, code: int) -> bytes:
    kind = fdp.ConsumeIntInRange(0, 5)
    if code in _SHAPES and fdp.ConsumeIntInRange(0, 2):  # mostly the request's own shape
        kind = _SHAPES[code]
    if kind == 0:
        return b""
    if kind == 1:
        return struct.pack("<Q", fdp.PickValueInList([0, 1, 0xFFFFFFFF, fdp.ConsumeInt(8)
                                                      & ((1 << 64) - 1)]))
    if kind == 2:  # vring state: index, num
        return struct.pack("<II", fdp.ConsumeIntInRange(0, 8), fdp.PickValueInList(
            [0, 1, 64, 65, 0x8000, fdp.ConsumeInt(4) & 0xFFFFFFFF]))
    if kind == 3:  # vring address: index, flags, desc, used, avail, log
        return struct.pack("<IIQQQQ", fdp.ConsumeIntInRange(0, 8), fdp.ConsumeIntInRange(0, 3),
                           *(USER_BASE + fdp.PickValueInList(
                               [0x10000, MEM_SIZE - 8, MEM_SIZE, fdp.ConsumeIntInRange(
                                   0, 1 << 40)]) for _ in range(4)))
    if kind == 4:  # memory table: regions inside, across or past the file
        n = fdp.ConsumeIntInRange(0, 9)
        regions = b"".join(struct.pack(
            "<QQQQ", fdp.PickValueInList([0, 1 << 20, fdp.ConsumeInt(8) & ((1 << 64) - 1)]),
            fdp.PickValueInList([MEM_SIZE, MEM_SIZE + (1 << 20), 4096, 0,
                                 fdp.ConsumeInt(8) & ((1 << 64) - 1)]),
            USER_BASE, fdp.PickValueInList([0, 4096, MEM_SIZE, fdp.ConsumeInt(8)
                                            & ((1 << 64) - 1)])) for _ in range(n))
        return struct.pack("<II", n, 0) + regions
    return fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 300))


def _fds(kind: int, fe: FrontEnd) -> list[int]:
    if kind == 1:
        return [os.eventfd(0, os.EFD_CLOEXEC)]
    if kind == 2:
        return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)]
    if kind == 3:
        return [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(3)]
    if kind == 4:
        return [os.dup(fe.shm.fd)]
    return []


def _read_replies(sock: socket.socket, buf: bytearray, wait: float, stats: Stats) -> str:
    """Replies that arrive within ``wait`` ('reply', 'closed' or 'none'); ``buf`` keeps
    a partial reply for the next call."""
    got = "none"
    while True:
        ready, _, _ = select.select([sock], [], [], wait)
        if not ready:
            return got
        try:
            data, fds, _, _ = socket.recv_fds(sock, 1 << 16, 8)
        except (ConnectionError, OSError):
            return "closed"
        for fd in fds:
            os.close(fd)
        if not data:
            return "closed"
        buf += data
        while len(buf) >= _HDR.size:
            code, flags, size = _HDR.unpack_from(buf)
            if flags & 0x3 != 1 or not flags & 0x4:
                stats.flush()
                raise Violation(f"a reply with flags {flags:#x} (code {code})")
            if len(buf) < _HDR.size + size:
                break
            if code not in _CODES:  # REPLY_ACK of an unknown request: its error (u64 != 0)
                if size != 8 or buf[_HDR.size:_HDR.size + 8] == bytes(8):
                    raise Violation(f"request code {code} is unknown, yet the reply is not "
                                    f"a failed REPLY_ACK: {bytes(buf[:40]).hex()}")
                stats.add("ack_errors")
            del buf[:_HDR.size + size]
            stats.add("replies")
            got = "reply"
        wait = 0.02


def setup() -> Callable[[bytes], None]:
    stats = Stats(TARGET)
    vf = FuzzVf(fuzzlib.config(), stats)

    def test_one(data: bytes) -> None:
        fdp = fuzzlib.provider(data)
        stats.add("inputs")
        fe = vf.front_end(setup=fdp.ConsumeBool())
        outcome = "none"
        buf = bytearray()
        try:
            fe.sock.settimeout(5.0)
            vf.sample_inflight()
            for _ in range(fdp.PickValueInList([1, 1, 2, 3, fdp.ConsumeIntInRange(1, 6)])):
                code = fdp.PickValueInList(_CODES) if fdp.ConsumeIntInRange(0, 4) else \
                    fdp.ConsumeInt(4) & 0xFFFFFFFF
                flags = fdp.PickValueInList([1, 1 | int(HeaderFlag.NEED_REPLY), 1, 1, 1,
                                             fdp.ConsumeIntInRange(0, 0xFF)])
                payload = _payload(fdp, code)
                delta = fdp.PickValueInList([0, 0, 0, fdp.ConsumeIntInRange(-8, 8)])
                size = max(0, len(payload) + delta)
                fds = _fds(fdp.ConsumeIntInRange(0, 4) if fdp.ConsumeIntInRange(0, 3) == 0
                           else _FD_KINDS.get(code, 0), fe)
                msg = _HDR.pack(code, flags, size) + payload
                stats.add("messages")
                try:
                    if fds:
                        socket.send_fds(fe.sock, [msg], fds)
                    else:
                        fe.sock.sendall(msg)
                except OSError:
                    outcome = "closed"
                    break
                finally:
                    for fd in fds:
                        os.close(fd)
                outcome = _read_replies(fe.sock, buf, REPLY_WAIT_S if flags & 0x8 else 0.0,
                                         stats)
                if outcome == "closed":
                    break
            if outcome != "closed":  # a well-formed request afterwards
                with contextlib.suppress(OSError):
                    fe.sock.sendall(_HDR.pack(int(FrontendRequest.GET_QUEUE_NUM), 1, 0))
                outcome = _read_replies(fe.sock, buf, PROBE_WAIT_S, stats)
        finally:
            vf.finish(fe)
        stats.add(f"outcome_{outcome}")
        stats.add("rejected" if outcome == "closed" else "processed")
        stats.tick()

    return test_one


if __name__ == "__main__":
    fuzzlib.main(TARGET, setup)
