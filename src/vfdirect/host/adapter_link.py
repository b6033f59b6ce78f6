"""The host's link to its adapter: start the adapter daemon (``vfdirect adapter run``,
started as ``python -m vfdirect.cli.adapter``) or attach to the one already serving the
run directory, and reach it only through :class:`PfClient`.

Rules of this module:

* the adapter runs in a session of its own, so a host killed with SIGKILL leaves it (and
  the VMs on its VFs) running; a restarted host attaches to it through ``pf.sock``;
* the PF socket admits the hypervisor by uid (``--hypervisor-uid``), not by pid: a pid
  policy would lock out the restarted host (a new pid) from the adapter it left running;
* every PF call goes through one lock: the API serves requests on several threads, and a
  PF connection carries one request at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.rpc import ErrorCode

PF_SOCKET_NAME = "pf.sock"
ADAPTER_LOCK_NAME = "adapter.lock"
ADAPTER_LOG_NAME = "adapter.log"

T = TypeVar("T")


class AdapterStartError(Exception):
    """The adapter could not be started or reached; the message says why."""


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a live (not zombie) process."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _lock_holder(run_dir: Path) -> int | None:
    try:
        text = (run_dir / ADAPTER_LOCK_NAME).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class AdapterLink:
    """One host's adapter: its process (started or found) and a locked PF connection."""

    def __init__(self, run_dir: Path, *, timeout: float = 30.0) -> None:
        self.run_dir = run_dir
        self.timeout = timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        self.attached = False  # True: found running, not started by this host
        self._pf: PfClient | None = None
        self._lock = threading.RLock()

    @property
    def socket_path(self) -> Path:
        return self.run_dir / PF_SOCKET_NAME

    # -- start or attach -------------------------------------------------------------

    def open(self, *, vfs: int, arrays: tuple[Path, ...], fabric_dir: Path | None,
             log_format: str, wait_s: float = 20.0) -> None:
        """Attach to the adapter serving the run directory, else start one."""
        holder = _lock_holder(self.run_dir)
        if holder is not None and pid_alive(holder) and self.socket_path.exists():
            self._connect(wait_s)
            self.pid, self.attached = holder, True
            return
        args = [sys.executable, "-m", "vfdirect.cli.adapter", "--run-dir", str(self.run_dir),
                "--vfs", str(vfs), "--hypervisor-uid", str(os.geteuid()),
                "--log-format", log_format]
        for a in arrays:
            args += ["--array", str(a)]
        if fabric_dir is not None:
            args += ["--fabric-dir", str(fabric_dir)]
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()  # a stale socket of a dead adapter
        log = open(self.run_dir / ADAPTER_LOG_NAME, "ab")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        finally:
            log.close()
        self.pid = self.proc.pid
        self._connect(wait_s)

    def _connect(self, wait_s: float) -> PfClient:
        deadline = time.monotonic() + wait_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AdapterStartError(
                    f"the adapter exited with status {self.proc.returncode}; see "
                    f"{self.run_dir / ADAPTER_LOG_NAME}")
            if self.socket_path.exists():
                try:
                    pf = PfClient(self.socket_path, timeout=self.timeout)
                    pf.adapter_identify()
                except (OSError, PfError) as exc:
                    last = exc
                else:
                    self._pf = pf
                    return pf
            time.sleep(0.05)
        raise AdapterStartError(f"the adapter at {self.socket_path} did not answer in "
                                f"{wait_s:g} s ({last})")

    # -- calls -----------------------------------------------------------------------

    def call(self, fn: Callable[[PfClient], T]) -> T:
        """Run ``fn`` with the PF connection, one caller at a time; reconnect once if the
        connection broke."""
        with self._lock:
            if self._pf is None:
                raise PfError(ErrorCode.INTERNAL_ERROR, "not connected to the adapter")
            try:
                return fn(self._pf)
            except PfError as exc:
                if exc.code is not ErrorCode.INTERNAL_ERROR or "channel" not in exc.message:
                    raise
            self._pf.close()
            self._pf = None
            return fn(self._connect(5.0))

    def identify(self) -> dict[str, Any]:
        return self.call(lambda pf: pf.adapter_identify())

    # -- stop ------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            if self._pf is not None:
                self._pf.close()
                self._pf = None

    def stop(self, wait_s: float = 15.0) -> None:
        """SIGTERM the adapter (ours or found), bounded wait, then SIGKILL."""
        self.close()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(wait_s)
            return
        if self.pid is None or not pid_alive(self.pid):
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while pid_alive(self.pid):
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
