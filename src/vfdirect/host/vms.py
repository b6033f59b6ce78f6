"""VM processes: each VM is a ``vfdirect vm-run`` process the host starts, in a session
of its own (it outlives a killed host), with its memory file and console log in
``<run dir>/vms/<name>/``.

The start handshake is the VM runtime's (``vm-run --paused``): the process maps its
memory and logs ``vm_paused`` with its pid; the host then assigns the VF to that pid,
loads the mapping, binds the vport and writes the firmware table into page 0 (claim A8);
SIGUSR1 lets the VM connect to its VF and scan.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vfdirect.core.guest.fwtable import FWTABLE_MAX_BYTES
from vfdirect.core.guest.layout import FWTABLE_ADDR
from vfdirect.host.adapter_link import pid_alive

CONSOLE_NAME = "console.log"
MEMORY_NAME = "memory"
#: The dirty map of guest writes (``vm-run --dirty-log``): one byte per 4 KiB page.
DIRTY_NAME = "dirty"
FWTABLE_JSON_NAME = "fwtable.json"
#: The host's VM spec (what the inventory has no column for: the workload, and its
#: ``workload_args``: extra ``vm-run`` options such as ``["--depth", "8"]``).
SPEC_NAME = "spec.json"
#: What ``vm-run --workload`` accepts.
WORKLOADS = ("idle", "selftest", "sequence", "verify", "load")
#: Longest console read the API returns.
CONSOLE_MAX_BYTES = 1 << 20


class VmProcessError(Exception):
    """A VM process did not start or answer in time; the message says why."""


def vm_dir(run_dir: Path, name: str) -> Path:
    return run_dir / "vms" / name


def console_events(path: Path) -> list[dict[str, Any]]:
    """The JSON events of a console log (other lines are skipped)."""
    out: list[dict[str, Any]] = []
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return out
    for line in text.splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict):
                    out.append(item)
    return out


#: A QEMU VM's launcher has this in its argv (host/qemu.py), QEMU :func:`qemu_name_tag`.
QEMU_LAUNCH_TAG = b"vfdirect-qemu-launch"


def qemu_name_tag(name: str) -> str:
    """QEMU's ``-name`` argument for VM ``name`` (how its process is recognised)."""
    return f"guest=vfdirect-vm:{name}"


def process_stopped(pid: int) -> bool:
    """Whether ``pid`` is in the stopped state (``T`` in /proc/<pid>/stat)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2:][:1] in ("T", "t")


def is_vm_process(pid: int, name: str) -> bool:
    """Whether ``pid`` is a live ``vm-run`` process of VM ``name`` (or its QEMU, or the
    launcher that becomes it)."""
    if not pid_alive(pid):
        return False
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if qemu_name_tag(name).encode() in argv:
        return True
    return (b"vfdirect.cli.vm_run" in argv or QEMU_LAUNCH_TAG in argv) and name.encode() in argv


class VmProcess:
    """One VM's process, started by this host or found running after a host restart."""

    def __init__(self, run_dir: Path, name: str) -> None:
        self.name = name
        self.dir = vm_dir(run_dir, name)
        self.proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None
        #: where this boot's lines start in the console log (it keeps earlier boots')
        self.boot_offset = 0

    @property
    def console(self) -> Path:
        return self.dir / CONSOLE_NAME

    @property
    def memory(self) -> Path:
        return self.dir / MEMORY_NAME

    @property
    def dirty_log(self) -> Path:
        """The dirty map of the guest's own writes into its memory (a
        :class:`~vfdirect.core.migration.dirty.PageMarks` byte map of
        ``PageMarks.size_for(memory size)`` bytes, created by ``vm-run``)."""
        return self.dir / DIRTY_NAME

    def spawn(self, *, memory_bytes: int, workload: str, start_timeout: float = 60.0,
              restart: bool = False, keep_memory: bool = False, incoming: bool = False,
              extra_args: Sequence[str] = ()) -> int:
        """Start ``vm-run --paused``; returns its pid once it logged ``vm_paused``.

        A cold boot deletes the memory file first (page 0 blank until the host writes
        it) unless ``keep_memory``; ``restart`` keeps it and passes ``--restart`` (the
        guest resumes on the memory found there, e.g. one copied by a migration).
        ``incoming`` (with ``restart``: a migration's destination) starts the process
        before its memory is complete: it logs ``vm_incoming`` (awaited here) and boots
        at :meth:`boot_incoming`. ``extra_args`` are appended to the command line."""
        if incoming and not restart:
            raise VmProcessError("an incoming VM process resumes: it needs restart=True")
        self.dir.mkdir(parents=True, exist_ok=True)
        if not (restart or keep_memory):
            with contextlib.suppress(FileNotFoundError):
                self.memory.unlink()
        offset = self.boot_offset = self.console_offset()
        args = [sys.executable, "-m", "vfdirect.cli.vm_run", "--memory-file", str(self.memory),
                "--memory-size", str(memory_bytes), "--paused", "--name", self.name,
                "--workload", workload, "--log-format", "json",
                "--start-timeout", str(start_timeout), "--dirty-log", str(self.dirty_log)]
        if restart:
            args.append("--restart")
        if incoming:
            args.append("--incoming")
        # workload options (``--depth 8 --read-pct 0``...) from the spec, if any: the
        # spec travels with a migration, so the destination runs the same workload
        workload_args = self.read_spec().get("workload_args")
        if isinstance(workload_args, list):
            args.extend(str(a) for a in workload_args)
        args.extend(extra_args)
        log = open(self.console, "ab")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        finally:
            log.close()
        self.pid = self.proc.pid
        self.wait_event("vm_incoming" if incoming else "vm_paused", after=offset,
                        timeout=20.0)
        return self.pid

    def boot_incoming(self, timeout: float = 20.0) -> dict[str, Any]:
        """An incoming VM process (``spawn(incoming=True)``): its memory file is
        complete; it boots on it (SIGUSR1) and pauses. Returns its ``vm_booted`` event;
        :meth:`go` then lets it connect."""
        if self.pid is None or not self.alive():
            raise VmProcessError(f"VM {self.name!r} has no process")
        os.kill(self.pid, signal.SIGUSR1)
        deadline = time.monotonic() + timeout
        while True:
            booted: dict[str, Any] | None = None
            for item in self._events_after(self.boot_offset):
                if item.get("event") == "vm_boot_failed":
                    raise VmProcessError(f"VM {self.name!r} cannot boot on its incoming "
                                         f"memory: {item.get('error')}")
                if item.get("event") == "vm_booted":
                    booted = item
                if item.get("event") == "vm_paused" and booted is not None:
                    return booted
            if self.proc is not None and self.proc.poll() is not None:
                raise VmProcessError(f"VM {self.name!r} exited with status "
                                     f"{self.proc.returncode}; see {self.console}")
            if time.monotonic() >= deadline:
                raise VmProcessError(f"VM {self.name!r}: not booted in {timeout:g} s")
            time.sleep(0.002)

    def prepare_memory(self, memory_bytes: int) -> None:
        """A fresh, zeroed memory file of ``memory_bytes`` (a migration's destination
        writes the received pages into it, then spawns with ``restart=True``); a stale
        dirty log is removed (``vm-run`` creates it)."""
        if memory_bytes <= 0:
            raise VmProcessError(f"memory size {memory_bytes} is not positive")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.remove_memory()
        fd = os.open(self.memory, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, memory_bytes)
        finally:
            os.close(fd)

    def remove_memory(self) -> None:
        """Delete the memory file and the dirty log (the VM process must be gone)."""
        for path in (self.memory, self.dirty_log):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def reap(self, timeout: float = 5.0) -> bool:
        """Wait (bounded) for the process to be gone, reaping our child; True if it is."""
        if self.proc is not None:
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        if self.pid is None:
            return True
        deadline = time.monotonic() + timeout
        while pid_alive(self.pid):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def wait_event(self, event: str, *, after: int = 0, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        pause = 0.002  # short at first: a migration's downtime waits on these events
        while True:
            for item in self._events_after(after):
                if item.get("event") == event:
                    return item
            if self.proc is not None and self.proc.poll() is not None:
                raise VmProcessError(f"VM {self.name!r} exited with status "
                                     f"{self.proc.returncode} before {event}; see "
                                     f"{self.console}")
            if time.monotonic() >= deadline:
                raise VmProcessError(f"VM {self.name!r}: no {event} in {timeout:g} s")
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _events_after(self, offset: int) -> list[dict[str, Any]]:
        try:
            with open(self.console, "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return []
        out = []
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    item = json.loads(line)
                    if isinstance(item, dict):
                        out.append(item)
        return out

    def read_spec(self) -> dict[str, Any]:
        """The VM's spec file (``{}`` if none or unreadable)."""
        try:
            spec = json.loads((self.dir / SPEC_NAME).read_text())
        except (OSError, ValueError):
            return {}
        return spec if isinstance(spec, dict) else {}

    def write_spec(self, spec: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / (SPEC_NAME + ".tmp")
        tmp.write_text(json.dumps(spec, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.dir / SPEC_NAME)

    def remove_spec(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.dir / SPEC_NAME).unlink()

    def console_offset(self) -> int:
        return self.console.stat().st_size if self.console.exists() else 0

    def write_fwtable(self, page: bytes, content: dict[str, Any]) -> None:
        """Claim A8: the firmware table into page 0 of the VM's memory (and a readable
        copy beside it)."""
        if len(page) > FWTABLE_MAX_BYTES:
            raise VmProcessError(f"firmware table of {len(page)} bytes exceeds a page")
        fd = os.open(self.memory, os.O_RDWR | os.O_CLOEXEC)
        try:
            # the VM maps the file shared: the page cache is what it sees (no fsync:
            # that would write a whole dirty memory file out to the disk)
            os.pwrite(fd, page.ljust(FWTABLE_MAX_BYTES, b"\0"), FWTABLE_ADDR)
        finally:
            os.close(fd)
        tmp = self.dir / (FWTABLE_JSON_NAME + ".tmp")
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.dir / FWTABLE_JSON_NAME)

    def go(self) -> None:
        assert self.pid is not None
        os.kill(self.pid, signal.SIGUSR1)

    def send_signal(self, sig: signal.Signals) -> None:
        """Signal the VM's process (SIGSTOP/SIGCONT: pause and resume its vCPU, i.e. the
        whole guest runtime, as a hypervisor stops a VM's vCPU threads)."""
        if self.pid is None or not self.alive():
            raise VmProcessError(f"VM {self.name!r} has no process")
        os.kill(self.pid, sig)

    def pause_at_safe_point(self, timeout: float = 2.0) -> bool:
        """Stop the VM where no store into its memory is under way (``vm-run`` stops
        itself at its next poll round on SIGUSR2): the way to pause before the last
        dirty-page round of a migration. True once stopped there; on timeout the VM is
        stopped with SIGSTOP anyway and False says the stop was asynchronous (then
        also re-send the pages of the previous round: see core/migration/dirty.py)."""
        if self.pid is None or not self.alive():
            raise VmProcessError(f"VM {self.name!r} has no process")
        os.kill(self.pid, signal.SIGUSR2)
        deadline = time.monotonic() + timeout
        while not process_stopped(self.pid):
            if time.monotonic() >= deadline:
                os.kill(self.pid, signal.SIGSTOP)
                return False
            time.sleep(0.002)
        return True

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and is_vm_process(self.pid, self.name)

    def stop(self, wait_s: float = 15.0) -> None:
        """SIGTERM, bounded wait, then SIGKILL; a child is reaped."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(wait_s)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(wait_s)
            return
        if self.pid is None or not is_vm_process(self.pid, self.name):
            return
        os.kill(self.pid, signal.SIGTERM)
        deadline = time.monotonic() + wait_s
        while pid_alive(self.pid):
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def read_console(self, tail: int = CONSOLE_MAX_BYTES) -> str:
        try:
            with open(self.console, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - tail))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""
