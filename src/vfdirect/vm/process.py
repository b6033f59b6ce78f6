"""The VM process: boot (or resume) the guest on its memory file, connect to its VF, scan,
run a workload, shut down cleanly on SIGTERM.

Start-up handshake with the hypervisor (``vf_assign`` needs the VM's pid, and the VF
accepts the memory only from that pid):

1. the hypervisor starts ``vfdirect vm-run ... --paused``; the process maps its memory,
   writes ``--fwtable`` into page 0 if the memory is new, lays out (or, with
   ``--restart``, attaches to) the guest state, logs ``vm_paused`` with its pid, and
   waits for SIGUSR1 (bounded by ``--start-timeout``);
2. the hypervisor assigns the VF to that pid (``vf_assign``), binds the vport, loads the
   mapping, may (re)write page 0, and sends SIGUSR1;
3. the VM re-reads page 0 (the firmware table: claim A8), connects to the VF socket
   (``--socket``, else the table's ``vf_socket``), retrying until ``--connect-timeout``
   while the socket is absent or refuses, logs ``vm_connected`` and scans.

Live migration (SYSTEM.md 5): with ``--dirty-log`` every store of the guest runtime into
guest memory is marked in that byte map (see :mod:`vfdirect.vm.guest`), so the
hypervisor can pre-copy the memory file while the VM runs; a process started with
``--restart`` on a copy of the memory file (another host, another VF) carries on where
the stopped one was, and logs ``vm_stall`` with the IO stall across the restart.

``--incoming`` (with ``--restart --paused``; a migration's destination): the process
starts before its memory has arrived, logs ``vm_incoming`` and waits for a first
SIGUSR1 (the memory file is complete); then it boots on it as above (``vm_paused``) and
waits for the second SIGUSR1.

SIGUSR2 asks the process to stop itself (SIGSTOP) at its next safe point, where no store
into guest memory is under way (``vm_pause_point`` is logged first; at most one poll
round away: 50 ms for verify and load, 200 ms idle); SIGCONT continues it.

Without ``--paused`` step 3 follows step 1 at once (the retries cover a VF assigned a
little later). SIGTERM or SIGINT: stop submitting, wait (bounded) for what is in flight,
close the connection, unmap; exit 0. The workload's one-line JSON result goes to stdout;
events go to stderr.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from vfdirect.core.guest.fwtable import FirmwareTable
from vfdirect.core.guest.journal import vm_id_number
from vfdirect.core.guest.layout import LayoutParams
from vfdirect.vm.block import BlockLayer
from vfdirect.vm.frontend import ConnectError, Disconnected, VhostUserFrontend
from vfdirect.vm.guest import BootError, Guest, boot_guest
from vfdirect.vm.log import log_event, setup_logging
from vfdirect.vm.nbd import serve_exports
from vfdirect.vm.scsi import DEFAULT_SPIN_S, ScsiHost
from vfdirect.vm.verify import Load, Verify, read_journal_file
from vfdirect.vm.workload import Sequence, check_disks, selftest, settle_orphan

__all__ = ["EXIT_FAILED", "EXIT_OK", "VmOptions", "run_vm"]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_ERROR = 2
WORKLOADS = ("idle", "selftest", "sequence", "verify", "load")


@dataclass
class VmOptions:
    memory_file: Path
    memory_size: int | None = None
    socket: str | None = None
    fwtable: bytes | None = None
    workload: str = "idle"
    restart: bool = False
    paused: bool = False
    start_timeout: float = 60.0
    connect_timeout: float = 30.0
    command_timeout: float = 30.0
    spin_us: float = DEFAULT_SPIN_S * 1e6
    #: sequence: writes (default 1000); verify, load: IOs (default: until SIGTERM)
    count: int | None = None
    depth: int = 8
    interval_ms: float = 0.0
    read_pct: float = 50.0
    bs: int = 1
    window: int = 256
    progress_ms: float = 1000.0
    name: str | None = None
    log_format: str = "text"
    params: LayoutParams = field(default_factory=LayoutParams)
    #: the dirty map of the guest's writes (live migration), created if missing
    dirty_log: Path | None = None
    #: a migration's destination: wait for SIGUSR1 (the memory is complete) before boot
    incoming: bool = False
    #: NBD exports to serve (idle workload), re-read on SIGHUP (see vfdirect.vm.nbd)
    exports_file: Path | None = None
    #: verify, durability: share of FUA writes, writes between two flushes (0: none)
    fua_pct: float = 0.0
    flush_every: int = 0
    #: verify: the memory file of the VM running at a power cut, to recover from
    recover_from: Path | None = None


class _Signals:
    def __init__(self) -> None:
        self.stop = False
        self.go = False
        self.hup = False
        self.pause = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._stop)
        signal.signal(signal.SIGUSR1, self._go)
        signal.signal(signal.SIGUSR2, self._pause)

    def _pause(self, signum: int, frame: FrameType | None) -> None:
        self.pause = True

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = True

    def _go(self, signum: int, frame: FrameType | None) -> None:
        self.go = True

    def install_hup(self) -> None:
        signal.signal(signal.SIGHUP, self._hup)

    def _hup(self, signum: int, frame: FrameType | None) -> None:
        self.hup = True

    def take_hup(self) -> bool:
        hup, self.hup = self.hup, False
        return hup


def _pause_point(signals: _Signals, log: logging.Logger) -> None:
    """A pause requested by SIGUSR2 happens here, where no store into guest memory (nor
    its dirty-log marks) is under way: the process stops itself (SIGSTOP) and goes on
    at SIGCONT. A migration stops the VM this way before its last dirty-page round:
    an asynchronous SIGSTOP could land between a store and its second mark after the
    hypervisor cleared the first one (see core/migration/dirty.py)."""
    if not signals.pause:
        return
    signals.pause = False
    log_event(log, "vm_pause_point", pid=os.getpid())
    os.kill(os.getpid(), signal.SIGSTOP)
    log_event(log, "vm_continued", pid=os.getpid())


def _result(data: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(data, separators=(",", ":"), default=str) + "\n")
    sys.stdout.flush()


def run_vm(options: VmOptions) -> int:
    """Run one VM process; returns the exit status."""
    log = setup_logging(options.log_format)
    signals = _Signals()
    signals.install()
    if options.exports_file is not None:
        signals.install_hup()  # SIGHUP: re-read the NBD exports
    if options.incoming:
        # a migration's destination: started before its memory arrives; SIGUSR1 says
        # the memory file is complete (a second SIGUSR1 later lets it connect)
        log_event(log, "vm_incoming", pid=os.getpid(), memory_file=str(options.memory_file))
        deadline = time.monotonic() + options.start_timeout
        while not signals.go and not signals.stop:
            if time.monotonic() >= deadline:
                log_event(log, "vm_start_timeout", level=logging.ERROR,
                          reason="the incoming memory was not declared complete")
                return EXIT_ERROR
            time.sleep(0.005)
        if signals.stop:
            log_event(log, "vm_stopped", reason="signal while waiting for the memory")
            return EXIT_OK
        signals.go = False
    try:
        guest = boot_guest(options.memory_file, memory_size=options.memory_size,
                           params=options.params, fwtable=options.fwtable,
                           restart=options.restart, dirty_log=options.dirty_log)
    except BootError as exc:
        log_event(log, "vm_boot_failed", level=logging.ERROR, error=str(exc))
        return EXIT_ERROR
    try:
        return _run(options, guest, signals, log)
    finally:
        guest.close()


def _run(options: VmOptions, guest: Guest, signals: _Signals, log: logging.Logger) -> int:
    driver = guest.driver
    log_event(log, "vm_booted", pid=os.getpid(), memory_file=str(options.memory_file),
              restart=options.restart,
              dirty_log=None if options.dirty_log is None else str(options.dirty_log),
              boot_count=guest.boot_count, created=guest.created,
              recovered=len(driver.recovered), unsent=len(driver.unsent),
              layout=guest.layout.describe())
    if options.fwtable is not None and not guest.fwtable_written:
        log_event(log, "fwtable_kept", level=logging.WARNING,
                  reason="the memory is not new: page 0 is used as found")
    if guest.fwtable_error is not None:
        log_event(log, "fwtable_invalid", level=logging.WARNING,
                  error=str(guest.fwtable_error), reason=guest.fwtable_error.reason.name)
    if options.paused:
        log_event(log, "vm_paused", pid=os.getpid())
        deadline = time.monotonic() + options.start_timeout
        while not signals.go and not signals.stop:
            _pause_point(signals, log)
            if time.monotonic() >= deadline:
                log_event(log, "vm_start_timeout", level=logging.ERROR)
                return EXIT_ERROR
            time.sleep(0.01)
        if signals.stop:
            log_event(log, "vm_stopped", reason="signal while paused")
            return EXIT_OK
        guest.read_fwtable()  # the hypervisor may have written page 0 meanwhile
    table = guest.fwtable
    socket_path = options.socket or (table.vf_socket if table is not None else None)
    if not socket_path:
        log_event(log, "vm_no_vf", level=logging.ERROR,
                  error="no --socket and no vf_socket in the firmware table")
        return EXIT_ERROR
    # Cookies of commands the device already has (before the first poll consumes them).
    in_device = set(driver.recovered.values())
    in_flight = len(driver.recovered)
    frontend = VhostUserFrontend(socket_path)

    def stopping() -> bool:
        return signals.stop

    try:
        frontend.connect(guest, deadline=time.monotonic() + options.connect_timeout,
                         cancel=stopping)
    except ConnectError as exc:
        log_event(log, "vm_connect_failed", level=logging.ERROR, error=str(exc))
        return EXIT_ERROR
    try:
        negotiated = frontend.negotiated
        log_event(log, "vm_connected", socket=socket_path,
                  features=hex(negotiated.features) if negotiated else None,
                  protocol_features=hex(negotiated.protocol_features) if negotiated else None,
                  request_queues=frontend.request_queues, bases=frontend.bases,
                  config=None if frontend.config is None else frontend.config.__repr__())
        host = ScsiHost(guest, frontend, spin_s=options.spin_us / 1e6,
                        command_timeout=options.command_timeout, logger=log)
        host.on_orphan = lambda completion: settle_orphan(guest.journal, completion)
        host.safe_point = lambda: _pause_point(signals, log)

        def reconnect() -> None:
            frontend.connect(guest, deadline=time.monotonic() + options.connect_timeout,
                             cancel=stopping)

        host.reconnect = reconnect
        try:
            return _workload(options, guest, host, table, in_device=in_device,
                             in_flight=in_flight, signals=signals, log=log)
        except (ConnectError, Disconnected) as exc:
            log_event(log, "vm_vf_lost", level=logging.ERROR, error=str(exc))
            return EXIT_ERROR
    finally:
        frontend.close()
        log_event(log, "vm_stopped", kicks=frontend.kicks_sent, sleeps=frontend.sleeps)


def _workload(options: VmOptions, guest: Guest, host: ScsiHost, table: FirmwareTable | None,
              *, in_device: set[int], signals: _Signals, log: logging.Logger,
              in_flight: int = 0) -> int:
    layer = BlockLayer(host, table, logger=log)
    layer.scan()
    disks = check_disks(layer)
    log_event(log, "vm_scanned", **disks)
    vm_name = options.name or (table.vm_name if table is not None else
                               options.memory_file.name)
    vm = vm_id_number(table.vm_id if table is not None else vm_name)
    if options.workload == "selftest":
        result = selftest(layer, vm=vm, generation=guest.boot_count)
    elif options.workload == "sequence":
        result = Sequence(layer, guest.journal, vm=vm, count=options.count or 1000,
                          depth=options.depth, interval=options.interval_ms / 1000,
                          in_device=in_device, should_stop=lambda: signals.stop).run()
    elif options.workload == "verify":
        recover = None
        if options.recover_from is not None:
            try:
                recover = read_journal_file(options.recover_from)
            except (OSError, ValueError) as exc:
                log_event(log, "verify_recover_failed", level=logging.ERROR, error=str(exc))
                return EXIT_ERROR
        result = Verify(layer, guest.journal, vm=vm, depth=options.depth,
                        in_device=in_device, should_stop=lambda: signals.stop,
                        count=options.count, read_pct=options.read_pct,
                        window=options.window, progress=options.progress_ms / 1000,
                        fua_pct=options.fua_pct, flush_every=options.flush_every,
                        recover=recover).run()
    elif options.workload == "load":
        result = Load(layer, depth=options.depth, read_pct=options.read_pct, bs=options.bs,
                      should_stop=lambda: signals.stop, count=options.count,
                      progress=options.progress_ms / 1000).run()
    else:
        _result({"workload": "idle", "ok": True, **disks})
        if options.exports_file is not None:
            serve_exports(layer, options.exports_file, should_stop=lambda: signals.stop,
                          take_reload=signals.take_hup, logger=log)
        while not signals.stop:
            layer.poll(0.2)
        _drain(layer)
        return EXIT_OK
    result.update({"vm": vm_name, "boot_count": guest.boot_count,
                   "completed": host.completed,
                   # requests the previous process left in the device, completed here
                   "in_flight_at_start": in_flight,
                   "recovered_completions": host.orphans,
                   "unsent_at_start": len(guest.driver.unsent)})
    _drain(layer)
    _result(result)
    return EXIT_OK if result.get("ok") else EXIT_FAILED


def _drain(layer: BlockLayer, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(Exception):
        while (layer.busy or layer.host.outstanding) and time.monotonic() < deadline:
            layer.poll(0.05)
