"""Helpers of the host daemon tests: a SAN in a temporary directory, host daemons
started through the CLI and always stopped, and every process they leave (adapter, VMs)
reaped even when a test kills the host with SIGKILL."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, make_url, text

from vfdirect.core.wwn import Wwn
from vfdirect.host.client import HostClient
from vfdirect.host.inventory import Inventory
from vfdirect.storage import StorageArray

#: Longest wait for a daemon or a CLI command.
WAIT_S = 60.0
ARRAY_WWN = Wwn.naa5(0x6000)
LUN_BLOCKS = 8192  # 4 MiB of 512-byte blocks, sparse
CHUNK = 64


def make_san(root: Path, luns: int = 2) -> StorageArray:
    array = StorageArray.create(root / "array0", ARRAY_WWN)
    for _ in range(luns):
        array.lun_create(LUN_BLOCKS, 512)
    return array


@contextlib.contextmanager
def pg_schema(server_url: str) -> Iterator[str]:
    """A URL of a new, empty schema on the PostgreSQL test server (dropped afterwards)."""
    schema = f"vfdhost_{secrets.token_hex(6)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = make_url(server_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


def cli(*args: str, run_dir: Path | None = None, check: bool = True,
        env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``vfdirect <args>`` (the host commands) in a subprocess, bounded; ``env_extra``
    is added to its environment (a started host daemon inherits it)."""
    env = dict(os.environ)
    env.update(env_extra or {})
    if run_dir is not None:
        env["VFDIRECT_RUN_DIR"] = str(run_dir)
    proc = subprocess.run([sys.executable, "-m", "vfdirect.cli.host", *args],
                          capture_output=True, text=True, timeout=WAIT_S, env=env,
                          stdin=subprocess.DEVNULL, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"vfdirect {' '.join(args)} -> {proc.returncode}\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


def cli_json(*args: str, run_dir: Path) -> Any:
    return json.loads(cli(*args, "--json", run_dir=run_dir).stdout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


def _ours(pid: int) -> bool:
    """Whether ``pid`` is still one of vfdirect's processes (not a reused pid)."""
    try:
        return b"vfdirect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _kill(pid: int) -> None:
    if not _alive(pid) or not _ours(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_gone(pid, 15.0):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        wait_gone(pid, 5.0)


class Host:
    """One host daemon (``vfdirect host start``) in ``run_dir``."""

    def __init__(self, run_dir: Path, name: str = "h1", *, arrays: tuple[Path, ...] = (),
                 extra: tuple[str, ...] = (), db: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.run_dir = run_dir
        #: added to the environment of ``host start`` (the daemon inherits it)
        self.env = dict(env or {})
        self.db_url = db
        self.name = name
        self.arrays = arrays
        self.extra = extra
        self.pids: set[int] = set()  # every process seen: reaped by cleanup()

    @property
    def db(self) -> str:
        return self.db_url or str(self.run_dir / "inventory.db")

    @property
    def sock(self) -> Path:
        return self.run_dir / "api.sock"

    def start(self) -> Host:
        args = ["host", "start", "--name", self.name, "--run-dir", str(self.run_dir),
                "--log-format", "json", "--vfs", "4", *self.extra]
        if self.db_url is not None:
            args += ["--db", self.db_url]
        for a in self.arrays:
            args += ["--array", str(a)]
        cli(*args, env_extra=self.env)
        self._note()
        return self

    def _note(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((self.run_dir / "host.json").read_text())
            self.pids.update({int(info["pid"]), int(info["adapter_pid"])})
        with contextlib.suppress(Exception), Inventory.open(self.db) as inv:
            self.pids.update(v.pid for v in inv.vm_list() if v.pid is not None)

    @property
    def pid(self) -> int:
        return int(json.loads((self.run_dir / "host.json").read_text())["pid"])

    @property
    def adapter_pid(self) -> int:
        return int(json.loads((self.run_dir / "host.json").read_text())["adapter_pid"])

    def client(self) -> HostClient:
        return HostClient(self.sock, timeout=WAIT_S)

    def api(self, method: str, path: str, body: Any = None) -> Any:
        with self.client() as c:
            if method == "GET":
                return c.get(path)
            if method == "DELETE":
                return c.delete(path)
            return c.post(path, body)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli(*args, run_dir=self.run_dir, check=check)

    def cli_json(self, *args: str) -> Any:
        return cli_json(*args, run_dir=self.run_dir)

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in (self.run_dir / "host.log").read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def kill9(self) -> None:
        pid = self.pid
        self._note()
        os.kill(pid, signal.SIGKILL)
        assert wait_gone(pid, 10.0)

    def cleanup(self) -> None:
        """Stop the host (API, else signals) and reap every process it left."""
        self._note()
        if self.sock.exists():
            with contextlib.suppress(Exception):
                self.cli("host", "stop", "--wait", "30", check=False)
        for pid in sorted(self.pids):
            _kill(pid)


# -- a VM's console (its JSON event lines) -------------------------------------------------


def console_events(h: Host, name: str) -> list[dict[str, Any]]:
    """The JSON lines of VM ``name``'s console on host ``h`` (a line being written is
    skipped)."""
    out: list[dict[str, Any]] = []
    path = h.run_dir / "vms" / name / "console.log"
    if not path.exists():
        return out
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def wait_verify_progress(h: Host, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
    """Progress lines of the VM's current process on ``h`` show more writes and reads."""
    deadline = time.monotonic() + timeout
    first = len(console_events(h, name))
    while True:
        new = [e for e in console_events(h, name)[first:]
               if e.get("event") == "verify_progress"]
        if len(new) >= 2 and new[-1]["writes"] > new[0]["writes"] and \
                new[-1]["verified"] > new[0]["verified"]:
            return new[-1]
        assert time.monotonic() < deadline, f"no verify progress of {name} on {h.name}"
        time.sleep(0.1)


def verify_result(h: Host, name: str) -> dict[str, Any]:
    """The last result line of the verify workload in VM ``name``'s console on ``h``."""
    results = [e for e in console_events(h, name) if e.get("workload") == "verify"
               and "ok" in e]
    assert results, f"no verify result in {name}'s console on {h.name}"
    return results[-1]
