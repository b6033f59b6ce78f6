"""The shared fabric across real processes: one login per WWPN in the whole fabric, logins
that die with their process, hot grant/revoke seen on the next IO, bounded lock waits."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vfdirect.core.array import LunKey
from vfdirect.core.fabric import (
    DuplicatePortName,
    FabricConfigError,
    NotLoggedIn,
    NotMasked,
    NotZoned,
)
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn
from vfdirect.storage.shared_fabric import (
    GENERATION_NAME,
    LOCK_NAME,
    FabricBusy,
    SharedFabric,
)

WAIT_S = 10.0
ARRAY = Wwn.naa5(0x4000)
PORT = Wwn.naa5(0x1_0000_4000)
VPORT = Wwn.naa5(0x4101)
VNODE = Wwn.naa5(0x4102)

#: A child adapter: logs its physical port and the ports given on argv in, says "ready",
#: then obeys lines on stdin ("revoke", "grant", "exit").
CHILD = r"""
import sys
from vfdirect.core.wwn import Wwn
from vfdirect.storage.shared_fabric import SharedFabric
fabric = SharedFabric(sys.argv[1])
fabric.flogi(Wwn.parse(sys.argv[2]), Wwn.parse(sys.argv[3]))
for name in sys.argv[4:]:
    fabric.fdisc(Wwn.parse(name), Wwn.naa5(0x4102))
print("ready", flush=True)
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "grant":
        fabric.mask_grant(Wwn.parse(cmd[1]), Wwn.parse(cmd[2]), [int(cmd[3])])
    elif cmd[0] == "revoke":
        fabric.mask_revoke(Wwn.parse(cmd[1]), Wwn.parse(cmd[2]), [int(cmd[3])])
    elif cmd[0] == "exit":
        fabric.close()
        break
    print("done", flush=True)
"""


class Child:
    """A child process speaking the line protocol above, every wait bounded."""

    def __init__(self, directory: Path, port_vsid: int, *ports: Wwn) -> None:
        args = [str(directory), Wwn.naa5(port_vsid).canonical(),
                Wwn.naa5(port_vsid | 1 << 35).canonical(), *(p.canonical() for p in ports)]
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        assert self.readline() == "ready", self.proc.stderr.read() if self.proc.stderr else ""

    def readline(self) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], WAIT_S)
        assert ready, "child did not answer in time"
        return self.proc.stdout.readline().strip()

    def send(self, line: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.readline()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(WAIT_S)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def fabric_dir(tmp_path: Path) -> Path:
    return tmp_path / "fabric"


@pytest.fixture
def fabric(fabric_dir: Path) -> Iterator[SharedFabric]:
    f = SharedFabric(fabric_dir, lock_timeout=2.0)
    f.flogi(PORT, Wwn.naa5(0x1_0000_4001))
    yield f
    f.close()


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


def test_a_second_login_of_a_wwpn_fails_at_once_in_another_process(
    fabric: SharedFabric, fabric_dir: Path, children: list[Child]
) -> None:
    children.append(child := Child(fabric_dir, 0x2_0000_0001, VPORT))
    start = time.monotonic()
    with pytest.raises(DuplicatePortName, match=f"held by adapter pid {child.proc.pid}"):
        fabric.fdisc(VPORT, VNODE)
    assert time.monotonic() - start < 1.0
    # the child's adapter dies without logging out: its login goes with it
    child.kill()
    login = fabric.fdisc(VPORT, VNODE)
    assert login.parent == PORT
    assert [r.pid for r in fabric.logins()] == [os.getpid(), os.getpid()]


def test_n_port_ids_are_unique_across_adapters(
    fabric: SharedFabric, fabric_dir: Path, children: list[Child]
) -> None:
    mine = [fabric.fdisc(Wwn.naa5(0x4200 + i), VNODE) for i in range(3)]
    children.append(Child(fabric_dir, 0x2_0000_0002, *(Wwn.naa5(0x4300 + i)
                                                        for i in range(3))))
    logins = fabric.show()["logins"]
    assert len(logins) == 8
    assert len({lg["nport_id"] for lg in logins}) == 8
    assert {lg.nport_id for lg in mine} <= {lg["nport_id"] for lg in logins}
    with pytest.raises(DuplicatePortName):
        fabric.fdisc(Wwn.naa5(0x4301), VNODE)


def test_hot_revoke_and_grant_by_another_adapter_take_effect_on_the_next_io(
    fabric: SharedFabric, fabric_dir: Path, children: list[Child]
) -> None:
    port = Wwn.naa5(0x1_0000_5000)
    fabric.target_ports_add(ARRAY, [port])
    fabric.zone_create("z", [VPORT, port])
    with pytest.raises(NotLoggedIn):
        fabric.authorize(VPORT, ARRAY, LunNumber(0))
    fabric.fdisc(VPORT, VNODE)
    with pytest.raises(NotMasked):
        fabric.authorize(VPORT, ARRAY, LunNumber(0))
    children.append(child := Child(fabric_dir, 0x2_0000_0003))
    assert child.send(f"grant {VPORT} {ARRAY} 0") == "done"
    fabric.authorize(VPORT, ARRAY, LunNumber(0))
    gen = fabric.generation
    assert gen % 2 == 0
    assert child.send(f"revoke {VPORT} {ARRAY} 0") == "done"
    assert fabric.generation == gen + 2
    with pytest.raises(NotMasked):
        fabric.authorize(VPORT, ARRAY, LunNumber(0))
    with pytest.raises(NotZoned):
        fabric.authorize(VPORT, Wwn.naa5(0x9999), LunNumber(0))
    assert not [p for p in fabric_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_writer_that_died_mid_change_leaves_readers_correct(
    fabric: SharedFabric, fabric_dir: Path
) -> None:
    port = Wwn.naa5(0x1_0000_5000)
    fabric.target_ports_add(ARRAY, [port])
    fabric.zone_create("z", [VPORT, port])
    fabric.fdisc(VPORT, VNODE)
    fabric.mask_grant(VPORT, ARRAY, [1])
    fabric.authorize(VPORT, ARRAY, LunNumber(1))
    # simulate a crash between the two bumps: counter odd, config already replaced
    other = SharedFabric(fabric_dir)
    try:
        gen = other.generation
        other._set_generation(gen + 1)
        config = other._read_config()
        config["masking"] = []
        (fabric_dir / "fabric.json").write_text(json.dumps(config))
        with pytest.raises(NotMasked):  # odd: reloaded on every IO, never stale
            fabric.authorize(VPORT, ARRAY, LunNumber(1))
        fabric.mask_grant(VPORT, ARRAY, [1])  # the next writer repairs the counter
        assert fabric.generation == gen + 4
        fabric.authorize(VPORT, ARRAY, LunNumber(1))
    finally:
        other.close()


def test_a_refused_change_writes_nothing(fabric: SharedFabric) -> None:
    fabric.zone_create("z", [VPORT])
    gen = fabric.generation
    with pytest.raises(FabricConfigError, match="already exists"):
        fabric.zone_create("z", [])
    fabric.mask_grant(VPORT, ARRAY, [0])
    assert fabric.mask_grant(VPORT, ARRAY, [0]) == ()  # no change, no bump
    assert fabric.generation == gen + 2
    assert fabric.show()["config"]["masking"] == [
        {"initiator": VPORT.canonical(), "array": ARRAY.canonical(), "luns": [0]}]
    assert LunKey(ARRAY, LunNumber(0)) in fabric._cache[1].masking.luns_of(VPORT)


def test_lock_waits_are_bounded(fabric_dir: Path) -> None:
    f = SharedFabric(fabric_dir, lock_timeout=0.2)
    fd = os.open(fabric_dir / LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: a stranger
        start = time.monotonic()
        with pytest.raises(FabricBusy, match=r"lock not obtained in 0\.2 s"):
            f.flogi(PORT, VNODE)
        assert time.monotonic() - start < 2.0
    finally:
        os.close(fd)
        f.close()
    assert (fabric_dir / GENERATION_NAME).stat().st_size == 8


def test_logout_and_close_release_the_names(fabric: SharedFabric, fabric_dir: Path) -> None:
    fabric.fdisc(VPORT, VNODE)
    fabric.logo(VPORT)
    other = SharedFabric(fabric_dir)
    try:
        other.flogi(Wwn.naa5(0x3_0000_0001), VNODE)
        other.fdisc(VPORT, VNODE)
        with pytest.raises(DuplicatePortName):
            fabric.fdisc(VPORT, VNODE)
    finally:
        other.close()
    fabric.fdisc(VPORT, VNODE)
    # LOGO of the physical port ends its NPIV logins (FC-LS implicit logout)
    fabric.logo(PORT)
    assert fabric.logins() == []
    with contextlib.suppress(FileNotFoundError):
        assert list((fabric_dir / "logins").iterdir()) == []
