"""NBD exports served by a real ``vm-run`` process over the adapter's real VF, checked
with standard clients (fio's nbd engine, qemu-io, qemu-img, nbdinfo from libnbd) and
with misbehaving raw clients: every byte goes through the guest's block layer and the
VF (the VF's IO counters move), bad clients are dropped alone, the VM keeps serving."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ARRAY_WWN, Daemon, vm_mapping
from vm_helpers import VmProc

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk
from vfdirect.core.nbd import CommandFlag, CommandType, Errno, Option, OptionReply
from vfdirect.core.nbd.constants import IHAVEOPT, NBDMAGIC, OPTION_REPLY_MAGIC
from vfdirect.core.nbd.handshake import encode_option
from vfdirect.core.nbd.transmission import encode_request
from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("vfdirect.adapter.vf") is None,
                       reason="the adapter's VF data path (vfdirect.adapter.vf) is missing"),
    pytest.mark.timeout(240),
]

VPORT = Wwn.naa5(0x6401)
VPORT_NN = Wwn.naa5(0x6402)
TIMEOUT_S = 20.0
SDB_BYTES = 10000 * 512


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"client tools missing: {', '.join(missing)}")


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for Unix sockets (108-byte limit)."""
    path = Path(tempfile.mkdtemp(prefix="vfnbd-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def start_vm(tmp: Path, san: StorageArray, adapter: Daemon, pf: PfClient, memfile: Path,
             vms: list[VmProc], exports: list[dict[str, Any]]) -> tuple[VmProc, Path]:
    pf.array_attach(san.directory)
    pf.vf_enable(2)
    pf.vport_create(VPORT, VPORT_NN)
    pf.fabric_zone_create("vm0", [VPORT, *san.target_ports])
    pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0, 1])  # LUN 2 (sdc) is refused by the fabric
    doc, _ = vm_mapping(san)
    sock = str(adapter.run_dir / "vf0.sock")
    table = FirmwareTable("vm0", "vm0-uuid", sock, tuple(
        FwDisk(VPORT, e["target"], e["lun"], e["vdisk_id"], e["capacity_blocks"],
               e["block_size"], e["serial"], Wwn.parse(e["wwn"])) for e in doc["luns"]))
    (tmp / "fw.json").write_text(json.dumps(table.dump()))
    exports_file = tmp / "exports.json"
    exports_file.write_text(json.dumps({"exports": exports}))
    vm = VmProc(tmp, "vm", "--memory-file", str(memfile), "--memory-size", "8MiB",
                "--fwtable", str(tmp / "fw.json"), "--workload", "idle", "--paused",
                "--exports-file", str(exports_file))
    vms.append(vm)
    vm.wait_event("vm_paused")
    assert pf.vf_assign(0, "vm0", vm.pid)["socket_path"] == sock
    pf.vport_bind(VPORT, 0)
    pf.mapping_load(0, doc)
    vm.go()
    vm.wait_event("nbd_exports")
    return vm, exports_file


def vf_io(pf: PfClient) -> dict[str, Any]:
    return dict(pf.adapter_get_stats()["vfs"][0]["io"] or {})


def fio_json(text: str) -> dict[str, Any]:
    """fio's JSON report (the nbd engine prints a line before it)."""
    result: dict[str, Any] = json.loads(text[text.index("{"):])
    return result


def run(*args: str, timeout: float = 120.0) -> str:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{args[0]} failed ({done.returncode}):\n{done.stdout}\n" \
                                 f"{done.stderr}"
    return done.stdout


# -- a raw client -----------------------------------------------------------------------------


class Raw:
    """A hand-driven client: handshake with NBD_OPT_GO, then raw requests."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT_S)
        self.sock.connect(str(path))

    def recv(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError(f"closed after {len(out)} of {n} bytes")
            out += chunk
        return out

    def greet(self) -> None:
        magic, opt, flags = struct.unpack(">QQH", self.recv(18))
        assert (magic, opt, flags) == (NBDMAGIC, IHAVEOPT, 3)
        self.sock.sendall(struct.pack(">I", 3))

    def option(self, option: int, data: bytes = b"") -> list[tuple[int, bytes]]:
        self.sock.sendall(encode_option(option, data))
        replies = []
        while True:
            magic, opt, kind, length = struct.unpack(">QIII", self.recv(20))
            assert magic == OPTION_REPLY_MAGIC and opt == option
            replies.append((kind, self.recv(length)))
            if kind != OptionReply.INFO and kind != OptionReply.SERVER:
                return replies

    def go(self, name: str) -> int:
        raw = name.encode()
        replies = self.option(Option.GO, struct.pack(">I", len(raw)) + raw + b"\0\0")
        assert replies[-1][0] == OptionReply.ACK, replies
        info = next(d for k, d in replies if k == OptionReply.INFO and d[:2] == b"\0\0")
        return int(struct.unpack(">Q", info[2:10])[0])

    def request(self, kind: int, cookie: int, offset: int, length: int, *, flags: int = 0,
                payload: bytes = b"", read: int = 0) -> tuple[int, bytes]:
        self.sock.sendall(encode_request(kind, cookie, offset, length, flags=flags,
                                         payload=payload))
        magic, error, got = struct.unpack(">IIQ", self.recv(16))
        assert magic == 0x67446698 and got == cookie
        return error, self.recv(read) if read and not error else b""

    def close(self) -> None:
        self.sock.close()


# -- tests ------------------------------------------------------------------------------------


def test_standard_clients_through_the_vf(tmp_path: Path, san: StorageArray, adapter: Daemon,
                                         memfile: Path, vms: list[VmProc],
                                         sockdir: Path) -> None:
    need("fio", "qemu-io", "qemu-img", "nbdinfo")
    sdb = sockdir / "sdb.sock"
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        vm, _ = start_vm(tmp_path, san, adapter, pf, memfile, vms,
                         [{"disk": "sdb", "unix": str(sdb)},
                          {"disk": "0:0", "unix": str(sockdir / "a.sock")}])
        uri = f"nbd+unix:///sdb?socket={sdb}"
        # nbdinfo: the export as the VM's block layer sees it
        info = json.loads(run("nbdinfo", "--json", uri))
        export = info["exports"][0]
        assert export["export-size"] == SDB_BYTES
        assert export["block_size_minimum"] == 512
        assert export["can_flush"] and export["can_fua"] and not export["is_read_only"]
        listing = run("nbdinfo", "--list", f"nbd+unix://?socket={sockdir / 'a.sock'}")
        assert "sda" in listing
        before = vf_io(pf)
        # qemu-io: a pattern written then read back
        out = run("qemu-io", "-f", "raw", uri, "-c", "write -P 0xab 0 1M",
                  "-c", "read -P 0xab 0 1M", "-c", "write -f -P 0x5c 1M 64k",
                  "-c", "read -P 0x5c 1M 64k", "-c", "flush")
        assert "Pattern verification failed" not in out
        after = vf_io(pf)
        assert after["writes"] > before["writes"] and after["reads"] > before["reads"]
        # qemu-img: a local image converted into the export, then compared
        image = tmp_path / "src.raw"
        image.write_bytes(os.urandom(SDB_BYTES))
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), uri)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), uri)
        # fio over libnbd: two clients at once on disjoint regions, each a crc32c-verified
        # write pass; then verify-only passes; then a corruption the verify must catch
        def fio(offset: str, *extra: str) -> list[str]:
            return ["fio", "--name=nbd", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
                    "--bs=4k", f"--offset={offset}", "--size=1M", "--iodepth=8",
                    "--verify=crc32c", "--do_verify=1", "--randrepeat=1",
                    "--verify_state_save=0", "--output-format=json", *extra]

        procs = [subprocess.Popen(fio(offset), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for offset in ("0", "2M")]
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            job = fio_json(out)["jobs"][0]
            assert job["error"] == 0 and job["write"]["io_bytes"] == 1 << 20
        for offset in ("0", "2M"):
            job = fio_json(run(*fio(offset, "--verify_only")))["jobs"][0]
            assert job["error"] == 0 and job["read"]["io_bytes"] == 1 << 20
        run("qemu-io", "-f", "raw", uri, "-c", "write -P 0x00 2M 4k")
        corrupted = subprocess.run(fio("2M", "--verify_only"), capture_output=True, text=True,
                                   timeout=120, check=False)
        assert corrupted.returncode != 0 and "verify" in corrupted.stderr + corrupted.stdout
        # the data really is on the disk: the VM's own block layer served it all
        assert vm.proc.poll() is None
        assert vf_io(pf)["writes"] >= after["writes"] + (SDB_BYTES + (2 << 20)) // 65536
        assert vf_io(pf)["reads"] >= after["reads"] + (SDB_BYTES + (2 << 20)) // 65536


def test_bad_clients_are_dropped_alone(tmp_path: Path, san: StorageArray, adapter: Daemon,
                                       memfile: Path, vms: list[VmProc],
                                       sockdir: Path) -> None:
    path = sockdir / "x.sock"
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        vm, _ = start_vm(tmp_path, san, adapter, pf, memfile, vms,
                         [{"disk": "sda", "unix": str(path)},
                          {"disk": "sdb", "unix": str(path)},
                          {"disk": "sdc", "unix": str(path)}])
        good = Raw(path)
        good.greet()
        # options: unknown -> ERR_UNSUP, structured replies refused, LIST, INFO of nothing
        assert good.option(99)[0][0] == OptionReply.ERR_UNSUP
        assert good.option(Option.STRUCTURED_REPLY)[0][0] == OptionReply.ERR_UNSUP
        names = [d[4:].decode() for k, d in good.option(Option.LIST) if k == OptionReply.SERVER]
        assert names == ["sda", "sdb", "sdc"]
        assert good.option(Option.LIST, b"x")[0][0] == OptionReply.ERR_INVALID
        missing = good.option(Option.INFO, struct.pack(">I", 4) + b"nope\0\0")
        assert missing[0][0] == OptionReply.ERR_UNKNOWN
        assert good.go("sda") == 256 * 512
        payload = os.urandom(4096)
        assert good.request(CommandType.WRITE, 1, 8192, 4096, payload=payload,
                            flags=CommandFlag.FUA) == (0, b"")
        assert good.request(CommandType.READ, 2, 8192, 4096, read=4096) == (0, payload)
        # beyond the end, unaligned, unknown command: errors, the stream stays in step
        assert good.request(CommandType.READ, 3, 256 * 512, 512)[0] == Errno.EINVAL
        assert good.request(CommandType.WRITE, 4, 255 * 512, 1024,
                            payload=bytes(1024))[0] == Errno.ENOSPC
        assert good.request(CommandType.READ, 5, 100, 512)[0] == Errno.EINVAL
        assert good.request(CommandType.CACHE, 6, 0, 512)[0] == Errno.EINVAL
        # garbage instead of a handshake, then a client gone mid-request
        garbage = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        garbage.connect(str(path))
        garbage.sendall(os.urandom(64) + b"\xff" * 64)
        garbage.settimeout(TIMEOUT_S)
        with contextlib.suppress(OSError):
            while garbage.recv(4096):
                pass  # the server closes it
        garbage.close()
        half = Raw(path)
        half.greet()
        half.go("sdb")
        half.sock.sendall(encode_request(CommandType.WRITE, 9, 0, 65536) + bytes(1000))
        half.close()
        busy = Raw(path)
        busy.greet()
        busy.go("sdb")
        busy.sock.sendall(b"".join(encode_request(CommandType.READ, c, c * 65536, 65536)
                                   for c in range(8)))
        busy.close()  # gone with reads in flight
        # a disk the fabric refuses: SCSI CHECK CONDITION becomes EIO
        refused = Raw(path)
        refused.greet()
        refused.go("sdc")
        assert refused.request(CommandType.READ, 1, 0, 512)[0] == Errno.EIO
        refused.close()
        # the good client is still served, and new clients too
        assert good.request(CommandType.READ, 7, 8192, 4096, read=4096) == (0, payload)
        assert good.request(CommandType.FLUSH, 8, 0, 0) == (0, b"")
        good.sock.sendall(encode_request(CommandType.DISC, 9, 0, 0))
        good.sock.settimeout(TIMEOUT_S)
        assert good.sock.recv(16) == b""  # the server closed after NBD_CMD_DISC
        good.close()
        again = Raw(path)
        again.greet()
        again.go("sda")
        assert again.request(CommandType.READ, 1, 8192, 4096, read=4096) == (0, payload)
        again.close()
        assert vm.proc.poll() is None
        reasons = [e.get("reason", "") for e in vm.events() if e["event"] == "nbd_client_closed"]
        assert any(r.startswith("protocol error") for r in reasons), reasons
        assert any("mid-request" in r for r in reasons), reasons


def test_sighup_reloads_exports_and_tcp(tmp_path: Path, san: StorageArray, adapter: Daemon,
                                        memfile: Path, vms: list[VmProc],
                                        sockdir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    first = sockdir / "first.sock"
    with PfClient(adapter.sock, timeout=TIMEOUT_S) as pf:
        vm, exports_file = start_vm(tmp_path, san, adapter, pf, memfile, vms,
                                    [{"disk": "sda", "unix": str(first)}])
        assert first.exists()
        exports_file.write_text(json.dumps({"exports": [{"disk": "0:1", "port": port}]}))
        count = len([e for e in vm.events() if e["event"] == "nbd_exports"])
        os.kill(vm.pid, signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT_S
        while len([e for e in vm.events() if e["event"] == "nbd_exports"]) == count:
            assert time.monotonic() < deadline, "no nbd_exports after SIGHUP"
            time.sleep(0.02)
        assert not first.exists()  # the Unix socket of the removed export is gone
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S) as s:
            client = Raw.__new__(Raw)
            client.sock = s
            client.greet()
            assert client.go("sdb") == SDB_BYTES  # 0:1 is sdb; served under its disk name
            assert client.request(CommandType.WRITE, 1, 0, 512, payload=b"\x11" * 512)[0] == 0
            assert client.request(CommandType.WRITE_ZEROES, 2, 0, 512 * 300)[0] == 0
            assert client.request(CommandType.READ, 3, 0, 512, read=512) == (0, bytes(512))
        # an address another process holds: reported, then retried until it is free
        held = sockdir / "held.sock"
        holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        holder.bind(str(held))
        holder.listen(1)
        exports_file.write_text(json.dumps({"exports": [{"disk": "0:1", "port": port},
                                                        {"disk": "sda", "unix": str(held)}]}))
        count = len([e for e in vm.events() if e["event"] == "nbd_exports"])
        os.kill(vm.pid, signal.SIGHUP)
        deadline = time.monotonic() + TIMEOUT_S
        while len(reported := [e for e in vm.events() if e["event"] == "nbd_exports"]) == count:
            assert time.monotonic() < deadline, "no nbd_exports after SIGHUP"
            time.sleep(0.02)
        assert "another process" in reported[-1]["exports"][1]["error"]
        holder.close()  # its socket file stays behind, stale
        deadline = time.monotonic() + TIMEOUT_S
        while "error" in [e for e in vm.events() if e["event"] == "nbd_exports"][-1][
                "exports"][1]:
            assert time.monotonic() < deadline, "the held address was not retried"
            time.sleep(0.05)
        retried = Raw(held)
        retried.greet()
        assert retried.go("") == 256 * 512  # the default export of a one-disk address
        retried.close()
        # an invalid file keeps what is served
        exports_file.write_text("{not json")
        os.kill(vm.pid, signal.SIGHUP)
        vm.wait_event("nbd_exports_invalid")
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT_S):
            pass
        assert vm.stop() == 0
