"""QEMU VMs: a VM can be a ``qemu-system-x86_64`` process running a Linux kernel whose
virtio-scsi driver drives the VM's VF directly (``vfdirect vm create --runtime qemu``).

* Guest memory is a shared memory backend in the VM's directory
  (``-object memory-backend-file,...,mem-path=<vm dir>/memory,share=on``), so the VF can
  map it when QEMU hands it over vhost-user (its DMA window).
* The disk controller is the VF: ``-chardev socket,path=<VF socket>`` +
  ``-device vhost-user-scsi-pci``.
* The claim A flow is the Python VMs' (:meth:`HostService.vm_start`): the VF accepts a
  connection only from the pid ``vf_assign`` named, so the host starts a tiny launcher
  that stops itself (SIGSTOP); the host assigns the VF to its pid, loads the mapping,
  binds the vport and hands over the addresses (claim A8, here the kernel command line
  ``vfdirect.disks=T:L,...``); SIGCONT lets the launcher ``exec`` QEMU (same pid).
* KVM first, TCG if KVM does not boot the guest: once per kernel/initrd and host
  process, a probe boot under KVM (``vfdirect.probe=1``: the guest's init reports and
  powers off) must report within :data:`KVM_PROBE_TIMEOUT_S`; otherwise (or without
  /dev/kvm) the VM runs under TCG. ``$VFDIRECT_QEMU_ACCEL`` = kvm|tcg skips the probe.
  Which ran, and why, goes to the host log, the console and ``vm show``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from vfdirect.eventlog import log_event
from vfdirect.guestimage import (
    GuestImage,
    GuestImageError,
    check_image,
    ensure_image,
    guest_results,
)
from vfdirect.host.adapter_link import pid_alive
from vfdirect.host.vms import (
    QEMU_LAUNCH_TAG,
    VmProcess,
    VmProcessError,
    is_vm_process,
    qemu_name_tag,
)

RUNTIMES = ("python", "qemu")
QEMU_ENV = "VFDIRECT_QEMU"
ACCEL_ENV = "VFDIRECT_QEMU_ACCEL"
BOOT_TIMEOUT_ENV = "VFDIRECT_QEMU_BOOT_TIMEOUT"
#: A QEMU VM's default and smallest memory.
DEFAULT_MEMORY_BYTES = 256 << 20
MIN_MEMORY_BYTES = 64 << 20
#: How long a KVM guest may take to reach its init before KVM counts as not working.
KVM_PROBE_TIMEOUT_S = 20.0
#: How long until the guest's first console output (firmware) after QEMU's exec.
CONNECT_TIMEOUT_S = 60.0
ARGV_NAME = "qemu-argv.json"
PROBE_CONSOLE_NAME = "kvm-probe.log"
MONITOR_NAME = "monitor.sock"
#: The launcher: stop until the host assigned the VF to this pid, then become QEMU.
_LAUNCHER = ("import json, os, signal, sys\n"
             "os.kill(os.getpid(), signal.SIGSTOP)\n"
             "with open(sys.argv[1]) as f:\n"
             "    argv = json.load(f)\n"
             "os.execv(argv[0], argv)\n")


class QemuError(Exception):
    """A QEMU VM cannot be defined or run as asked; the message says why."""


def qemu_binary() -> str:
    """``$VFDIRECT_QEMU`` or ``qemu-system-x86_64`` on PATH."""
    name = os.environ.get(QEMU_ENV, "qemu-system-x86_64")
    found = shutil.which(name)
    if found is None:
        raise QemuError(f"{name} not found (install the Debian package qemu-system-x86)")
    return found


def runtime_spec(runtime: str, kernel: Path | None, initrd: Path | None) -> dict[str, Any]:
    """What a VM's spec file records for its runtime: ``{}`` for Python VMs; for QEMU
    VMs the kernel and initrd (default: the cached Debian kernel and the initramfs of
    ``scripts/mkinitramfs.sh``, built if missing). Raises :class:`QemuError` for a
    request that cannot be right, :class:`GuestImageError` if the image cannot be built."""
    if runtime not in RUNTIMES:
        raise QemuError(f"unknown runtime {runtime!r} (one of {', '.join(RUNTIMES)})")
    if runtime == "python":
        if kernel is not None or initrd is not None:
            raise QemuError("--kernel and --initrd are for --runtime qemu")
        return {}
    qemu_binary()
    if (kernel is None) != (initrd is None):
        raise QemuError("give both --kernel and --initrd, or neither (the default image)")
    if kernel is not None and initrd is not None:
        try:
            image = check_image(kernel, initrd)
        except GuestImageError as exc:
            raise QemuError(str(exc)) from None
    else:
        image = ensure_image()
    return {"runtime": "qemu", **image.dump()}


def check_memory(memory_bytes: int) -> None:
    if memory_bytes < MIN_MEMORY_BYTES:
        raise QemuError(f"a QEMU VM needs at least {MIN_MEMORY_BYTES >> 20} MiB of memory, "
                        f"not {memory_bytes} bytes")
    if memory_bytes % (1 << 20):
        raise QemuError(f"a QEMU VM's memory must be whole MiB, not {memory_bytes} bytes")


def kernel_cmdline(vm: str, addresses: list[tuple[int, int]], *,
                   fs: tuple[int, int] | None = None, probe: bool = False) -> str:
    """The guest kernel's command line; the virtual disk addresses ride on it (claim A8)."""
    disks = ",".join(f"{t}:{lun}" for t, lun in addresses) or "-"
    words = ["console=ttyS0", "quiet", "loglevel=3", "panic=-1", "scsi_mod.scan=sync",
             f"vfdirect.vm={vm}", f"vfdirect.disks={disks}"]
    if fs is not None:
        words.append(f"vfdirect.fs={fs[0]}:{fs[1]}")
    if probe:
        words.append("vfdirect.probe=1")
    return " ".join(words)


def qemu_argv(*, binary: str, name: str, accel: str, memory_bytes: int,
              memory_path: Path | None, vf_socket: str | None, image: GuestImage,
              cmdline: str, console: Path, monitor: Path | None = None) -> list[str]:
    """QEMU's command line: a small PC, shared memory backend, the VF as its virtio-scsi
    controller (vhost-user-scsi-pci), serial console appended to ``console``."""
    if accel not in ("kvm", "tcg"):
        raise QemuError(f"unknown accelerator {accel!r}")
    mib = memory_bytes >> 20
    argv = [binary, "-name", qemu_name_tag(name), "-nodefaults", "-no-user-config",
            "-nographic", "-no-reboot", "-accel", accel,
            "-cpu", "host" if accel == "kvm" else "max", "-smp", "1", "-m", f"{mib}M",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            "-chardev", f"file,id=console,path={console},append=on", "-serial",
            "chardev:console"]
    if memory_path is not None:
        argv += ["-object", f"memory-backend-file,id=mem,size={mib}M,"
                 f"mem-path={memory_path},share=on", "-machine", "pc,memory-backend=mem"]
    if vf_socket is not None:
        argv += ["-chardev", f"socket,id=vf,path={vf_socket}",
                 "-device", "vhost-user-scsi-pci,chardev=vf,num_queues=1"]
    if monitor is not None:
        argv += ["-monitor", f"unix:{monitor},server=on,wait=off"]
    return argv


_accel_lock = threading.Lock()
_accel_cache: dict[tuple[str, str, str], tuple[str, str]] = {}


def choose_accel(binary: str, image: GuestImage, work_dir: Path,
                 timeout: float = KVM_PROBE_TIMEOUT_S) -> tuple[str, str]:
    """``(accel, why)``: ``kvm`` if a probe boot under KVM reaches the guest's init within
    ``timeout``, else ``tcg`` (cached per binary and image in this process)."""
    forced = os.environ.get(ACCEL_ENV, "auto")
    if forced in ("kvm", "tcg"):
        return forced, f"${ACCEL_ENV}={forced}"
    if forced != "auto":
        raise QemuError(f"${ACCEL_ENV} is {forced!r}, not auto, kvm or tcg")
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "tcg", "/dev/kvm is not usable"
    key = (binary, str(image.kernel), str(image.initrd))
    with _accel_lock:
        if key in _accel_cache:
            return _accel_cache[key]
        chosen = _probe_kvm(binary, image, work_dir, timeout)
        _accel_cache[key] = chosen
        return chosen


def _probe_kvm(binary: str, image: GuestImage, work_dir: Path,
               timeout: float) -> tuple[str, str]:
    work_dir.mkdir(parents=True, exist_ok=True)
    console = work_dir / PROBE_CONSOLE_NAME
    with contextlib.suppress(FileNotFoundError):
        console.unlink()
    argv = qemu_argv(binary=binary, name="kvm-probe", accel="kvm", memory_bytes=128 << 20,
                     memory_path=None, vf_socket=None, image=image,
                     cmdline=kernel_cmdline("kvm-probe", [], probe=True), console=console)
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    try:
        while True:
            text = console.read_text(errors="replace") if console.exists() else ""
            if guest_results(text):
                return "kvm", f"KVM probe boot reached the guest in " \
                              f"{time.monotonic() - started:.1f} s"
            if proc.poll() is not None:
                err = (proc.stderr.read().decode(errors="replace") if proc.stderr else "")
                last = (err.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
                return "tcg", f"KVM probe failed: {last}"
            if time.monotonic() - started >= timeout:
                return "tcg", f"KVM probe boot: no guest output in {timeout:g} s (hung)"
            time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10.0)
        if proc.stderr is not None:
            proc.stderr.close()


def boot_timeout() -> float:
    """How long a QEMU guest may take to report (``$VFDIRECT_QEMU_BOOT_TIMEOUT``, 180 s)."""
    try:
        return float(os.environ.get(BOOT_TIMEOUT_ENV, "180"))
    except ValueError:
        return 180.0


def _proc_state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def _is_qemu_image(pid: int) -> bool:
    try:
        return os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith("qemu-system")
    except OSError:
        return False


class QemuVmProcess(VmProcess):
    """A QEMU VM's process (launcher, then QEMU), with the methods the host uses on
    :class:`~vfdirect.host.vms.VmProcess`."""

    def __init__(self, run_dir: Path, name: str, logger: logging.Logger | None = None) -> None:
        super().__init__(run_dir, name)
        self.log = logger or logging.getLogger("vfdirect.host.qemu")
        self._fwtable: dict[str, Any] | None = None
        self.accel: str | None = None
        self.accel_reason: str | None = None
        self._memory_bytes = DEFAULT_MEMORY_BYTES
        self._exec_offset = 0

    @property
    def image(self) -> GuestImage:
        spec = self.read_spec()
        kernel, initrd = spec.get("kernel"), spec.get("initrd")
        if not isinstance(kernel, str) or not isinstance(initrd, str):
            raise VmProcessError(f"VM {self.name!r}: its spec names no kernel and initrd")
        return GuestImage(Path(kernel), Path(initrd))

    def _note(self, event: str, **fields: Any) -> None:
        """A JSON line into the console (as the Python VMs' events) and the host log."""
        with open(self.console, "a") as f:
            f.write(json.dumps({"event": event, "vm": self.name, **fields}) + "\n")
        log_event(self.log, event, vm=self.name, **fields)

    def spawn(self, *, memory_bytes: int, workload: str = "idle", start_timeout: float = 60.0,
              **options: Any) -> int:
        """Start the launcher; returns its pid once it has stopped itself. ``workload``
        (a Python VM's) does not apply; other options (restart, keep_memory, ...) are
        refused: a QEMU VM boots cold."""
        del workload
        if any(options.values()):
            raise VmProcessError(f"VM {self.name!r} is a QEMU VM: "
                                 f"{', '.join(k for k, v in options.items() if v)} "
                                 "not supported")
        try:
            check_memory(memory_bytes)
            binary = qemu_binary()
            image = self.image
            image = check_image(image.kernel, image.initrd)
        except (QemuError, GuestImageError) as exc:
            raise VmProcessError(f"VM {self.name!r}: {exc}") from None
        self._memory_bytes = memory_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in (self.memory, self.dir / ARGV_NAME):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        self._fwtable = None
        self.boot_offset = self.console_offset()
        try:
            self.accel, self.accel_reason = choose_accel(binary, image, self.dir)
        except QemuError as exc:
            raise VmProcessError(f"VM {self.name!r}: {exc}") from None
        spec = self.read_spec()
        spec.update({"accel": self.accel, "accel_reason": self.accel_reason})
        self.write_spec(spec)
        self._note("qemu_accel", accel=self.accel, reason=self.accel_reason)
        args = [sys.executable, "-I", "-S", "-c", _LAUNCHER, str(self.dir / ARGV_NAME),
                QEMU_LAUNCH_TAG.decode(), self.name]
        log = open(self.console, "ab")  # noqa: SIM115 (the child owns it)
        try:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True)
        finally:
            log.close()
        self.pid = self.proc.pid
        deadline = time.monotonic() + min(start_timeout, 20.0)
        while _proc_state(self.pid) != "T":
            if self.proc.poll() is not None:
                raise VmProcessError(f"VM {self.name!r}: the QEMU launcher exited with "
                                     f"status {self.proc.returncode}; see {self.console}")
            if time.monotonic() >= deadline:
                raise VmProcessError(f"VM {self.name!r}: the QEMU launcher did not stop")
            time.sleep(0.01)
        self._note("vm_paused", pid=self.pid, runtime="qemu")
        return self.pid

    def write_fwtable(self, page: bytes, content: dict[str, Any]) -> None:
        """Claim A8 for a QEMU VM: the addresses go on the kernel command line (page 0 of
        a PC's memory belongs to its firmware); the readable copy is kept as for any VM."""
        del page
        self._fwtable = dict(content)
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / "fwtable.json.tmp"
        tmp.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
        tmp.replace(self.dir / "fwtable.json")

    def addresses(self) -> list[tuple[int, int]]:
        disks = (self._fwtable or {}).get("disks") or []
        return [(int(d["target"]), int(d["lun"])) for d in disks]

    def argv(self) -> list[str]:
        """QEMU's command line for this boot (after :meth:`write_fwtable`)."""
        if self._fwtable is None:
            raise VmProcessError(f"VM {self.name!r}: no firmware table yet")
        sock = self._fwtable.get("vf_socket")
        if not isinstance(sock, str) or not sock:
            raise VmProcessError(f"VM {self.name!r}: the firmware table names no VF socket")
        monitor = self.dir / MONITOR_NAME
        with contextlib.suppress(FileNotFoundError):
            monitor.unlink()
        return qemu_argv(
            binary=qemu_binary(), name=self.name, accel=self.accel or "tcg",
            memory_bytes=self._memory_bytes, memory_path=self.memory, vf_socket=sock,
            image=self.image, cmdline=kernel_cmdline(self.name, self.addresses()),
            console=self.console,
            # a Unix socket path has at most 107 bytes
            monitor=monitor if len(str(monitor)) < 100 else None)

    def go(self) -> None:
        """Let the launcher become QEMU (the VF is assigned to its pid by now)."""
        assert self.pid is not None
        try:
            argv = self.argv()
        except QemuError as exc:
            raise VmProcessError(f"VM {self.name!r}: {exc}") from None
        tmp = self.dir / (ARGV_NAME + ".tmp")
        tmp.write_text(json.dumps(argv))
        tmp.replace(self.dir / ARGV_NAME)
        self._note("qemu_exec", pid=self.pid, accel=self.accel, argv=argv)
        self._exec_offset = self.console_offset()
        os.kill(self.pid, signal.SIGCONT)

    def wait_event(self, event: str, *, after: int = 0, timeout: float = 20.0) -> dict[str, Any]:
        """``vm_connected``: QEMU runs (exec'd) and has written to the console (QEMU
        connects to the VF while it realises its devices, before it prints anything of
        the guest's and before the guest's first instruction; a failed connection makes
        it exit, which is reported)."""
        if event != "vm_connected":
            return super().wait_event(event, after=after, timeout=timeout)
        deadline = time.monotonic() + max(timeout, CONNECT_TIMEOUT_S)
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise VmProcessError(f"VM {self.name!r}: QEMU exited with status "
                                     f"{self.proc.returncode}: {self._last_error()}")
            if (self.pid is not None and _is_qemu_image(self.pid)
                    and self.console_offset() > self._exec_offset):
                item = {"event": "vm_connected", "pid": self.pid, "accel": self.accel}
                self._note("vm_connected", pid=self.pid, accel=self.accel, runtime="qemu")
                return item
            if time.monotonic() >= deadline:
                raise VmProcessError(f"VM {self.name!r}: QEMU showed no output in "
                                     f"{max(timeout, CONNECT_TIMEOUT_S):g} s")
            time.sleep(0.05)

    def _last_error(self) -> str:
        lines = [line for line in self.read_console(4096).splitlines()
                 if "qemu-system" in line or "error" in line.lower()]
        return lines[-1].strip() if lines else f"see {self.console}"

    def wait_result(self, *, after: int | None = None,
                    timeout: float | None = None) -> dict[str, Any]:
        """The guest's ``VFDIRECT-RESULT`` of this boot (its init powers off after it)."""
        start = self.boot_offset if after is None else after
        limit = boot_timeout() if timeout is None else timeout
        deadline = time.monotonic() + limit
        while True:
            results = guest_results(self._console_after(start))
            if results:
                return results[-1]
            if self.proc is not None and self.proc.poll() is not None:
                # the serial file may get its last line just as QEMU exits
                results = guest_results(self._console_after(start))
                if results:
                    return results[-1]
                raise VmProcessError(f"VM {self.name!r}: QEMU exited with status "
                                     f"{self.proc.returncode} before the guest reported")
            if time.monotonic() >= deadline:
                raise VmProcessError(f"VM {self.name!r}: no guest result in {limit:g} s")
            time.sleep(0.1)

    def _console_after(self, offset: int) -> str:
        try:
            with open(self.console, "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return self.pid is not None and is_vm_process(self.pid, self.name)

    def stop(self, wait_s: float = 15.0) -> None:
        """SIGTERM (QEMU shuts down; a stopped launcher is continued into it), bounded
        wait, then SIGKILL; a child is reaped."""
        pid = self.pid
        if pid is None:
            return
        if self.proc is None and not is_vm_process(pid, self.name):
            return
        if not pid_alive(pid) and self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            os.kill(pid, signal.SIGCONT)
        if self.proc is not None:
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(wait_s)
            return
        deadline = time.monotonic() + wait_s
        while pid_alive(pid):
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)

    def runtime_info(self) -> dict[str, Any]:
        """What ``vm show`` tells of the QEMU VM: image, accelerator and why, the
        addresses on its command line, its last guest result."""
        spec = self.read_spec()
        results = guest_results(self.read_console())
        return {"runtime": "qemu", "kernel": spec.get("kernel"), "initrd": spec.get("initrd"),
                "accel": spec.get("accel"), "accel_reason": spec.get("accel_reason"),
                "addresses": [f"{t}:{lun}" for t, lun in self.addresses()] or None,
                "last_result": results[-1] if results else None}


def vm_process(run_dir: Path, name: str, logger: logging.Logger | None = None) -> VmProcess:
    """The process object of VM ``name``: a :class:`QemuVmProcess` if its spec says
    ``runtime: qemu``, else a Python VM's :class:`VmProcess`."""
    probe = VmProcess(run_dir, name)
    if probe.read_spec().get("runtime") == "qemu":
        return QemuVmProcess(run_dir, name, logger)
    return probe


__all__ = ["ACCEL_ENV", "DEFAULT_MEMORY_BYTES", "RUNTIMES", "QemuError", "QemuVmProcess",
           "boot_timeout", "check_memory", "choose_accel", "kernel_cmdline", "qemu_argv",
           "qemu_binary", "runtime_spec", "vm_process"]
