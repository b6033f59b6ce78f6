"""The adapter daemon through real processes: the PF socket, its access control, the
claim A steps the PF performs, PF IO through the SCSI core and the fabric, the shared
fabric between two adapters, malformed requests, and clean shutdown."""

from __future__ import annotations

import json
import mmap
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_helpers import ARRAY_WWN, Daemon, make_san, vm_mapping

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.scsi import Status, decode_sense
from vfdirect.core.scsi.sense import ACCESS_DENIED_NO_ACCESS_RIGHTS
from vfdirect.core.wwn import Wwn
from vfdirect.storage import StorageArray
from vfdirect.storage.shared_fabric import SharedFabric

VPORT = Wwn.naa5(0x6101)
VPORT_NN = Wwn.naa5(0x6102)
VPORT_ALT = Wwn.naa5(0x6103)
TIMEOUT_S = 10.0


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture
def san(tmp_path: Path) -> StorageArray:
    return make_san(tmp_path / "san")


def start(daemons: list[Daemon], run_dir: Path, *args: str) -> Daemon:
    d = Daemon(run_dir, *args)
    daemons.append(d)
    return d.wait_ready()


def rw10(opcode: int, lba: int, blocks: int) -> bytes:
    return bytes([opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0])


def configure(pf: PfClient, san: StorageArray, *, bind: bool = True) -> dict[str, Any]:
    """Claim A, the adapter's side: array, VFs, vport, zoning and masking, VF 0 to vm0,
    bind, mapping. Returns the mapping sent."""
    pf.array_attach(san.directory)
    pf.vf_enable(4)
    pf.vport_create(VPORT, VPORT_NN, VPORT_ALT)  # claim A5
    pf.fabric_zone_create("vm0", [VPORT, VPORT_ALT, *san.target_ports])
    pf.fabric_mask_grant(VPORT, ARRAY_WWN, [0, 1])  # LUN 2 stays unmasked
    info = pf.vf_assign(0, "vm0", os.getpid())
    assert info["socket_path"].endswith("/vf0.sock")
    if bind:
        pf.vport_bind(VPORT, 0)  # claim A7
    doc, _ = vm_mapping(san)
    pf.mapping_load(0, doc)  # claim A4
    return doc


# -- the socket and who may use it ------------------------------------------------------


def test_pf_socket_is_0600_and_serves_its_hypervisor(tmp_path: Path,
                                                     daemons: list[Daemon]) -> None:
    d = start(daemons, tmp_path / "host1", "--hypervisor-pid", str(os.getpid()))
    assert stat.S_IMODE(d.sock.stat().st_mode) == 0o600
    assert stat.S_ISSOCK(d.sock.stat().st_mode)
    with PfClient(d.sock, timeout=TIMEOUT_S) as pf:
        ident = pf.adapter_identify()
    assert ident["max_vfs"] == 16 and "pf_io_submit" in ident["methods"]


@pytest.mark.parametrize("who", ["--hypervisor-pid", "--hypervisor-uid"])
def test_a_peer_that_is_not_the_hypervisor_is_refused(tmp_path: Path, daemons: list[Daemon],
                                                      who: str) -> None:
    other = "1" if who == "--hypervisor-pid" else str(os.geteuid() + 4242)
    d = start(daemons, tmp_path / "host1", who, other)
    with PfClient(d.sock, timeout=TIMEOUT_S) as pf, pytest.raises(PfError) as info:
        pf.adapter_identify()
    assert info.value.code is ErrorCode.PERMISSION_DENIED
    assert "is not the hypervisor's" in info.value.message
    refused = [e for e in d.events() if e["event"] == "pf_refused"]
    assert refused and refused[0]["pid"] == os.getpid() and refused[0]["reason"]
    assert d.proc.poll() is None  # still serving


# -- claim A through the PF ---------------------------------------------------------------


def test_claim_A4_mapping_reaches_vf_only_via_pf(tmp_path: Path, daemons: list[Daemon],
                                                 san: StorageArray) -> None:
    d = start(daemons, tmp_path / "host1")
    with PfClient(d.sock, timeout=TIMEOUT_S) as pf:
        sent = configure(pf, san)
        assert pf.mapping_get(0) == sent
        vf = pf.vf_get(0)
        assert (vf["state"], vf["mapping_luns"], vf["vm"]) == (
            "ASSIGNED", 3, {"name": "vm0", "pid": os.getpid()})
        assert pf.mapping_get(1) is None
        # the VF holds a copy: the adapter's dump carries it, as the VF's snapshot
        dump = pf.adapter_dump()
        assert dump["vfs"][0]["mapping"] == sent
        # a thin vdisk with holes never reaches a VF
        bad = json.loads(json.dumps(sent))
        bad["luns"][0]["layout"]["thin"] = True
        bad["luns"][0]["layout"]["placements"] = []
        with pytest.raises(PfError) as info:
            pf.mapping_load(0, bad)
        assert info.value.code is ErrorCode.INVALID_PARAMS
        assert "inflate it first" in info.value.message
        assert pf.mapping_get(0) == sent


def test_claim_A7_vport_bound_and_logged_in(tmp_path: Path, daemons: list[Daemon],
                                            san: StorageArray) -> None:
    d = start(daemons, tmp_path / "host1")
    with PfClient(d.sock, timeout=TIMEOUT_S) as pf:
        configure(pf, san)
        vport = pf.vf_get(0)["vport"]
        ident = pf.adapter_identify()
    assert vport == VPORT.canonical()
    # visible through the shared fabric, from this (third) process
    fabric = SharedFabric(san.directory.parent / "fabric")
    try:
        logins = {lg["wwpn"]: lg for lg in fabric.show()["logins"]}
    finally:
        fabric.close()
    lg = logins[VPORT.canonical()]
    assert lg["pid"] == d.proc.pid
    assert lg["parent"] == ident["physical_port"]["wwpn"]  # FDISC under the physical port


def test_pf_io_write_then_read_through_the_pf(tmp_path: Path, daemons: list[Daemon],
                                              san: StorageArray) -> None:
    d = start(daemons, tmp_path / "host1")
    fd = os.memfd_create("pf-io", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, 1 << 16)
        with mmap.mmap(fd, 1 << 16) as buf, PfClient(d.sock, timeout=TIMEOUT_S) as pf:
            doc = configure(pf, san)
            buffer_id, size = pf.pf_io_buffer_attach(fd)
            assert size == 1 << 16
            data = os.urandom(4096)
            buf[0:4096] = data
            # vd-b at (0, 1) spans LUNs 0 and 1: this write crosses from one to the other
            first, second = doc["luns"][1]["layout"]["placements"]
            assert (first["lun"], second["lun"], first["vlba"]) == (0, 1, 0)
            lba = first["count"] - 4
            w = pf.pf_io_submit(VPORT, 0, 1, rw10(0x2A, lba, 8), buffer=buffer_id,
                                sg=[(0, 1000), (1000, 3096)], direction="to_device")
            assert w == {"status": 0, "sense": "", "residual": 0, "data_len": 4096}
            r = pf.pf_io_submit(VPORT, 0, 1, rw10(0x28, lba, 8), buffer=buffer_id,
                                sg=[(8192, 4096)], direction="from_device")
            assert r["status"] == Status.GOOD and r["data_len"] == 4096
            assert buf[8192:8192 + 4096] == data
            # the blocks are on the physical LUNs where the first mapping says
            with open(san.lun_path(0), "rb") as lun0:
                lun0.seek((first["start"] + lba) * 512)
                assert lun0.read(2048) == data[:2048]
            with open(san.lun_path(1), "rb") as lun1:
                lun1.seek(second["start"] * 512)
                assert lun1.read(2048) == data[2048:]
            # vd-c lives on LUN 2, which is not masked to the vport: refused by the fabric
            r = pf.pf_io_submit(VPORT, 0, 2, rw10(0x28, 0, 1), buffer=buffer_id,
                                sg=[(0, 512)], direction="from_device")
            assert r["status"] == Status.CHECK_CONDITION
            assert decode_sense(bytes.fromhex(r["sense"])).sense == \
                ACCESS_DENIED_NO_ACCESS_RIGHTS
            # a hot revoke stops the very next IO
            pf.fabric_mask_revoke(VPORT, ARRAY_WWN, [0])
            r = pf.pf_io_submit(VPORT, 0, 0, rw10(0x28, 0, 1), buffer=buffer_id,
                                sg=[(0, 512)], direction="from_device")
            assert r["status"] == Status.CHECK_CONDITION
            assert pf.adapter_get_stats()["pf_io"]["commands"] == 4
            pf.pf_io_buffer_detach(buffer_id)
    finally:
        os.close(fd)


def test_duplicate_vport_login_across_two_adapter_processes(
    tmp_path: Path, daemons: list[Daemon], san: StorageArray
) -> None:
    a = start(daemons, tmp_path / "host1", "--array", str(san.directory))
    b = start(daemons, tmp_path / "host2", "--array", str(san.directory))
    with PfClient(a.sock, timeout=TIMEOUT_S) as pa, PfClient(b.sock, timeout=TIMEOUT_S) as pb:
        for pf in (pa, pb):
            pf.vport_create(VPORT, VPORT_NN, VPORT_ALT)
        assert pa.vport_login(VPORT)["logged_in"]
        with pytest.raises(PfError) as info:
            pb.vport_login(VPORT)
        assert info.value.code is ErrorCode.FABRIC_REFUSED
        assert info.value.message.startswith("DuplicatePortName")
        assert f"held by adapter pid {a.proc.pid}" in info.value.message
        # claim X3: the destination logs in the alternate WWPN before switch-over
        assert pb.vport_login(VPORT, alternate=True)["port_name"] == VPORT_ALT.canonical()
        ids = {lg["nport_id"] for lg in pb.fabric_show()["logins"]}
        assert len(ids) == 4  # two physical ports, two vports: unique N_Port IDs
    # the source adapter goes away: its logins go with it
    assert a.stop() == 0
    with PfClient(b.sock, timeout=TIMEOUT_S) as pb:
        pb.vport_logout(VPORT)
        assert pb.vport_login(VPORT)["port_name"] == VPORT.canonical()


# -- robustness ---------------------------------------------------------------------------


def _raw(sock_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(TIMEOUT_S)
    s.connect(str(sock_path))
    return s


def _reply(s: socket.socket) -> dict[str, Any]:
    data, fds, _, _ = socket.recv_fds(s, 1 << 20, 4)
    for fd in fds:
        os.close(fd)
    return dict(json.loads(data))


def test_malformed_requests_get_specific_errors_and_the_daemon_keeps_serving(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    d = start(daemons, tmp_path / "host1")
    s = _raw(d.sock)
    try:
        cases: list[tuple[bytes, int, str]] = [
            (b"{not json", ErrorCode.PARSE_ERROR, "not a JSON message"),
            (b"[]", ErrorCode.INVALID_REQUEST, "batches are not accepted"),
            (b'{"jsonrpc":"2.0","method":"vf_frobnicate","id":1}', ErrorCode.METHOD_NOT_FOUND,
             "no method 'vf_frobnicate'"),
            (b'{"jsonrpc":"2.0","method":"vf_get","params":{"vf":"x"},"id":2}',
             ErrorCode.INVALID_PARAMS, "vf_get: parameter 'vf' must be an integer"),
            (b'{"jsonrpc":"2.0","method":"vf_get","params":{"vf":99},"id":3}',
             ErrorCode.NOT_FOUND, "no VF 99"),
            (b'{"jsonrpc":"2.0","method":"vf_quiesce","params":{"vf":0},"id":4}',
             ErrorCode.WRONG_STATE, "VF 0 is DISABLED; vf_quiesce needs CONNECTED"),
            (b"\xff\xfe", ErrorCode.PARSE_ERROR, "not a JSON message"),
        ]
        for packet, code, text in cases:
            s.send(packet)
            err = _reply(s)["error"]
            assert err["code"] == code, (packet, err)
            assert text in err["message"], (packet, err)
        # descriptors sent with a method that takes none: refused, and closed by the PF
        before = d.open_fds()
        fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(3)]
        try:
            socket.send_fds(s, [b'{"jsonrpc":"2.0","method":"vf_get","params":{"vf":0},'
                                b'"id":5}'], fds)
            err = _reply(s)["error"]
            assert err["code"] == ErrorCode.BAD_FDS
            assert err["message"] == ("vf_get takes 0 file descriptor(s), the request "
                                      "carried 3")
            many = [os.open(os.devnull, os.O_RDONLY) for _ in range(20)]
            try:
                socket.send_fds(s, [b'{"jsonrpc":"2.0","method":"pf_io_buffer_attach",'
                                    b'"id":6}'], many)
                assert _reply(s)["error"]["code"] == ErrorCode.BAD_FDS
            finally:
                for fd in many:
                    os.close(fd)
        finally:
            for fd in fds:
                os.close(fd)
        assert d.open_fds() == before
        # a notification gets no reply; the next request is answered
        s.send(b'{"jsonrpc":"2.0","method":"vf_list"}')
        s.send(b'{"jsonrpc":"2.0","method":"adapter_identify","id":7}')
        assert _reply(s)["id"] == 7
    finally:
        s.close()
    with PfClient(d.sock, timeout=TIMEOUT_S) as pf:
        stats = pf.adapter_get_stats()
    assert stats["internal_errors"] == 0
    assert stats["errors"]["BAD_FDS"] == 1  # the MSG_CTRUNC refusal is the channel's own
    assert stats["errors"]["INVALID_PARAMS"] == 1


def test_sigterm_shuts_down_cleanly(tmp_path: Path, daemons: list[Daemon],
                                    san: StorageArray) -> None:
    d = start(daemons, tmp_path / "host1", "--array", str(san.directory))
    with PfClient(d.sock, timeout=TIMEOUT_S) as pf:
        pf.vport_create(VPORT, VPORT_NN)
        pf.vport_login(VPORT)
    # one adapter per run directory
    second = Daemon(tmp_path / "host1")
    daemons.append(second)
    assert second.wait_exit() == 1
    assert "another adapter" in second.events()[-1]["error"]
    assert d.stop() == 0
    assert not d.sock.exists()
    events = [e["event"] for e in d.events()]
    assert events[0] == "adapter_ready" and events[-1] == "adapter_stopped"
    fabric = SharedFabric(san.directory.parent / "fabric")
    try:
        assert fabric.show()["logins"] == []  # logged out, login files released
    finally:
        fabric.close()
