"""Helpers of the VM tests: memory files that are always removed, VM processes that are
always reaped, and their JSON events and result."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

WAIT_S = 20.0


class VmProc:
    """``python -m vfdirect.cli.vm_run`` in a subprocess; events (JSON) and the result in
    files."""

    def __init__(self, tmp: Path, name: str, *args: str) -> None:
        self.err_path = tmp / f"{name}.err"
        self.out_path = tmp / f"{name}.out"
        self._err = open(self.err_path, "wb")  # noqa: SIM115 (closed in stop())
        self._out = open(self.out_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vfdirect.cli.vm_run", "--log-format", "json", *args],
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.err_path.read_text().splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def wait_event(self, name: str, timeout: float = WAIT_S) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event["event"] == name:
                    return event
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise AssertionError(f"no {name} event (exit {self.proc.poll()}):\n"
                             f"{self.err_path.read_text()}")

    def result(self, timeout: float = 60.0) -> tuple[int, dict[str, Any]]:
        code = self.proc.wait(timeout)
        lines = [ln for ln in self.out_path.read_text().splitlines() if ln.startswith("{")]
        assert lines, f"no result (exit {code}):\n{self.err_path.read_text()}"
        return code, json.loads(lines[-1])

    def go(self) -> None:
        os.kill(self.proc.pid, signal.SIGUSR1)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(WAIT_S)

    def stop(self) -> int:
        """SIGTERM, bounded wait, then SIGKILL; always reaped."""
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    return self.proc.wait(WAIT_S)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
            return self.proc.wait(WAIT_S)
        finally:
            self._err.close()
            self._out.close()


def shm_path(tag: str) -> Path:
    return Path("/dev/shm") / f"vfd-test-{os.getpid()}-{tag}"


def unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
