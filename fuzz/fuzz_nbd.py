"""Fuzz target ``nbd``: bytes to the NBD export of a real VM (``vm-run``, idle workload,
exports over its VF 0), whose other export must keep serving.

Each input is one client connection to the fuzzed export (``sda``): raw bytes in place
of a handshake; or the greeting, fuzzed client flags and fuzzed options (real option
codes or not, names, lengths that lie); or a proper handshake (NBD_OPT_GO) followed by
fuzzed requests (real command types or not, flags, offsets and lengths inside, across,
past the disk or unaligned, payloads, trailing garbage). Invariants (a violation is a
crash input):

* the server speaks the protocol: its greeting, option replies (OPTION_REPLY_MAGIC, a
  reply type of the specification) and simple replies (SIMPLE_REPLY_MAGIC, an errno of
  the protocol, the cookie of a request sent, READ data only on success); a client it
  cannot follow is dropped (the connection closed), never left hanging;
* the VM stays alive, and its other export (``sdb``) serves a write and its read-back
  (checked every 25 inputs; the rig checks it again, with the sentinel VM on VF 1, the
  auditor and the LUN bytes outside the vdisks' extents).

Run: ``.venv/bin/python fuzz/fuzz_nbd.py -max_total_time=60 -seed=1 [corpus]``.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris
import fuzzlib
from fuzzlib import Stats, Violation

# The server runs in the VM's process: only the client-side codec is instrumented.
with atheris.instrument_imports(include=["vfdirect.core.nbd"]):
    from vfdirect.core.nbd import CommandType, Errno, Option, OptionReply
    from vfdirect.core.nbd.constants import (
        IHAVEOPT,
        NBDMAGIC,
        OPTION_REPLY_MAGIC,
        SIMPLE_REPLY_MAGIC,
    )
    from vfdirect.core.nbd.handshake import encode_option
    from vfdirect.core.nbd.transmission import encode_request

from test_vm_nbd import Raw

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.nbd import CommandFlag

TARGET = "nbd"
DISK_BYTES = 256 * 512  # sda: vd-a
IDLE_S = 0.3
CHECK_EVERY = 25
_ERRNOS = {int(e) for e in Errno}
_REPLY_TYPES = {int(r) for r in OptionReply}
_OPTIONS = [int(o) for o in Option]
_TYPES = [int(t) for t in CommandType]


class Conn:
    """One client connection with bounded reads."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(10.0)
        self.sock.connect(path)
        self.buf = bytearray()
        self.closed = False

    def fill(self, n: int, idle: float = IDLE_S) -> bool:
        """Read until ``n`` bytes are buffered; False on EOF or ``idle`` s of silence."""
        while len(self.buf) < n and not self.closed:
            ready, _, _ = select.select([self.sock], [], [], idle)
            if not ready:
                return False
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return False
            self.buf += data
        return len(self.buf) >= n

    def take(self, n: int) -> bytes:
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def send(self, data: bytes) -> bool:
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _greeting(conn: Conn) -> None:
    if not conn.fill(18, 5.0):
        raise Violation("no NBD greeting within 5 s")
    magic, opt, _flags = struct.unpack(">QQH", conn.take(18))
    if (magic, opt) != (NBDMAGIC, IHAVEOPT):
        raise Violation(f"a bad greeting {magic:#x} {opt:#x}")


def _option_replies(conn: Conn, stats: Stats) -> str:
    """Option replies until silence or EOF: 'ack' when one ACKs NBD_OPT_GO/INFO."""
    while conn.fill(20):
        magic, _opt, kind, length = struct.unpack(">QIII", conn.take(20))
        if magic != OPTION_REPLY_MAGIC:
            raise Violation(f"an option reply with magic {magic:#x}")
        if kind not in _REPLY_TYPES:
            raise Violation(f"option reply type {kind:#x} is not of the protocol")
        if length > 1 << 20:
            raise Violation(f"an option reply of {length} bytes")
        if not conn.fill(length):
            return "closed"
        conn.take(length)
        stats.add("option_replies")
        stats.add("option_errors" if kind & (1 << 31) else "option_ok")
    return "closed" if conn.closed else "idle"


def _requests(fdp: Any, conn: Conn, stats: Stats) -> None:
    """Fuzzed requests after a proper NBD_OPT_GO; check every reply."""
    pending: dict[int, tuple[int, int]] = {}
    stream = bytearray()
    truncated = False
    for cookie in range(1, fdp.ConsumeIntInRange(1, 8) + 1):
        kind = fdp.PickValueInList(_TYPES) if fdp.ConsumeIntInRange(0, 7) else \
            fdp.ConsumeIntInRange(0, 0xFFFF)
        if kind == CommandType.DISC:
            kind = CommandType.FLUSH  # (a DISC ends the stream: sent last, below)
        flags = fdp.PickValueInList([0, 0, int(CommandFlag.FUA), fdp.ConsumeIntInRange(
            0, 0xFFFF)])
        offset = fdp.PickValueInList([0, 4096, DISK_BYTES - 512, DISK_BYTES, 100,
                                      fdp.ConsumeInt(8) & ((1 << 64) - 1)])
        length = fdp.PickValueInList([512, 4096, 0, 1000, 1 << 20, fdp.ConsumeInt(4)
                                      & 0xFFFFFFFF])
        payload = b""
        if kind == CommandType.WRITE:
            if length > 1 << 16:
                length = 4096
            if fdp.ConsumeIntInRange(0, 9) == 0:  # a client gone mid-request
                payload = fdp.ConsumeBytes(length // 2)
                truncated = True
            else:
                payload = fdp.ConsumeBytes(length).ljust(length, b"\x5a")
        stream += encode_request(kind, cookie, offset, length, flags=flags, payload=payload)
        pending[cookie] = (kind, length)
        if truncated:
            break
    if not truncated and fdp.ConsumeIntInRange(0, 5) == 0:
        stream += fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 64))  # trailing garbage
    stats.add("requests", len(pending))
    if not conn.send(bytes(stream)) or truncated:
        stats.add("dropped_clients" if truncated else "send_failed")
        return
    while pending and conn.fill(16, 5.0):
        magic, error, cookie = struct.unpack(">IIQ", conn.take(16))
        if magic != SIMPLE_REPLY_MAGIC:
            raise Violation(f"a reply with magic {magic:#x}")
        if error not in _ERRNOS:
            raise Violation(f"errno {error} is not of the protocol")
        if cookie not in pending:
            raise Violation(f"a reply to cookie {cookie}, never sent (or answered twice)")
        kind, length = pending.pop(cookie)
        if error:
            stats.add("rejected")
            stats.add(f"errno_{Errno(error).name.lower()}")
        else:
            stats.add("processed")
            if kind == CommandType.READ and not conn.fill(length, 5.0):
                break
            if kind == CommandType.READ:
                conn.take(length)
    if pending:
        if not conn.closed:
            stats.flush()
            raise Violation(f"requests {sorted(pending)} neither answered nor the client "
                            f"dropped within 5 s")
        stats.add("dropped_clients")


def setup() -> Callable[[bytes], None]:
    stats = Stats(TARGET)
    cfg = fuzzlib.config()
    nbd = cfg["nbd"]
    vm_pid = int(nbd["vm_pid"])
    pf = PfClient(cfg["pf"], timeout=30.0)

    def sample_inflight() -> None:
        """Requests the sentinel VF has in flight as this input goes in."""
        n = int(pf.vf_get(int(cfg["sentinel_vf"])).get("outstanding") or 0)
        stats.add("inflight_sum", n)
        stats.peak("inflight_max", n)

    def other_export_serves() -> None:
        client = Raw(Path(nbd["other"]))
        try:
            client.greet()
            client.go(nbd["other_export"])
            data = os.urandom(4096)
            w = client.request(CommandType.WRITE, 1, 8192, 4096, payload=data)
            r = client.request(CommandType.READ, 2, 8192, 4096, read=4096)
        finally:
            client.close()
        if w[0] != 0 or r != (0, data):
            raise Violation("the VM's other export does not serve")
        stats.add("other_export_checks")

    def test_one(data: bytes) -> None:
        fdp = fuzzlib.provider(data)
        stats.add("inputs")
        mode = fdp.ConsumeIntInRange(0, 3)
        conn = Conn(nbd["fuzz"])
        sample_inflight()
        try:
            if mode == 0:  # raw bytes in place of a handshake
                _greeting(conn)
                conn.send(fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 400)))
                conn.fill(1 << 30)  # the server answers, drops us or waits: all bounded
                stats.add("raw_streams")
                stats.add("rejected" if conn.closed else "processed")
            elif mode == 1:  # fuzzed options
                _greeting(conn)
                conn.send(struct.pack(">I", fdp.PickValueInList([3, 1, 0, fdp.ConsumeInt(4)
                                                                  & 0xFFFFFFFF])))
                opts = bytearray()
                for _ in range(fdp.ConsumeIntInRange(1, 4)):
                    code = fdp.PickValueInList(_OPTIONS) if fdp.ConsumeIntInRange(0, 5) else \
                        fdp.ConsumeInt(4) & 0xFFFFFFFF
                    if code == Option.EXPORT_NAME:
                        code = Option.LIST  # (its reply has no option-reply framing)
                    name = fdp.PickValueInList([b"sda", b"sdb", b"", b"nope",
                                                fdp.ConsumeBytes(20)])
                    body = fdp.PickValueInList([
                        struct.pack(">I", len(name)) + name + b"\0\0",
                        struct.pack(">I", len(name) + 9) + name, b"",
                        fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 80))])
                    opts += encode_option(code, body)
                conn.send(bytes(opts))
                outcome = _option_replies(conn, stats)
                stats.add(f"options_{outcome}")
                stats.add("rejected" if outcome == "closed" else "processed")
            else:  # a proper handshake, then fuzzed requests
                client = Raw.__new__(Raw)
                client.sock = conn.sock
                try:
                    client.greet()
                    size = client.go("sda")
                except AssertionError as exc:
                    raise Violation(f"a proper handshake failed: {exc}") from exc
                if size != DISK_BYTES:
                    raise Violation(f"sda is {size} bytes, not {DISK_BYTES}")
                _requests(fdp, conn, stats)
        except (AssertionError, ConnectionError, OSError) as exc:
            if isinstance(exc, Violation):
                raise
            stats.add("dropped_clients")
        finally:
            conn.close()
        if stats.counts["inputs"] % CHECK_EVERY == 0:
            try:
                os.kill(vm_pid, 0)
            except ProcessLookupError:
                raise Violation("the NBD VM died") from None
            other_export_serves()
        stats.tick()

    return test_one


if __name__ == "__main__":
    fuzzlib.main(TARGET, setup)
