"""Live migration of a running VM between two hosts (SYSTEM.md section 5; claims B1-B7,
X1-X5): the shell that sequences the phases.

Source side (:class:`SourceMigration`, a thread of the source host):

1. prepare: ask the destination host (its API) to take the VM: it checks it reaches the
   VM's LUNs, reserves a VF, creates the vport and logs in its free port name (X3), and
   opens a TCP listener for the migration stream;
2. B1 ``vf_quiesce``; B2 ``vf_drain`` with a deadline (X2: what is still outstanding is
   handed over and the mediated path completes it); B3/B4 ``vf_state_save``: the queue
   state and the VF's fds come to this process, the VF's DMA window is revoked;
3. B5/B6: the mediated path (:class:`~vfdirect.host.mediated.MediatedPath`) serves the
   VM's virtqueues from the saved positions through ``pf_io_submit``, marking every page
   it writes (X5);
4. pre-copy rounds of the memory file: round 0 sends everything (zero pages as ZERO
   sections), then the pages the guest (its dirty map) or the mediated path marked;
5. stop-and-copy: SIGSTOP the VM, stop the mediated path (it finishes what it fetched),
   send the last dirty pages and the STATE section (queue state, VM spec), END;
6. the destination starts the VM process on the received memory, assigns a VF, loads the
   mapping, binds the vport, writes page 0 and answers READY; the commit point is the
   inventory moving the VM to the destination; COMMIT lets the destination resume the VM
   (it answers DONE); the source then releases its VF, logs the vport out and kills its
   paused VM process.

Any failure before the commit point aborts (X1): the mediated path stops, the source VF
gets the (advanced) queue state back (``vf_state_restore``, ``vf_resume``), the VM is
continued; the destination throws away what it made. After the commit point the VM is on
the destination whatever happens to the connection: a destination that lost the COMMIT
message finds the commit in the inventory. The VM is never served by two hosts: the
source VM is paused and its mediated path stopped before READY is even asked for.

The commit point is one decision in the inventory for both hosts: the source's
``migration_commit`` and the destination's ``migration_give_up`` (a destination that
loses the connection after READY, or restarts, calls it at once) decide on the same
locked row; whichever comes first wins, the other finds it. A destination VM process
that dies after the commit point is replaced by one resumed on the (complete) received
memory, else the VM is left in ERROR on the destination. A destination host killed
mid-migration cleans up at its restart (:func:`reclaim_incoming`, called by the
reconciliation): it decides the migration first (as above), then kills the VM process it
had started, releases the VF and logs out the vport of a VM that stayed on its source,
and adopts the booted VM process of one that was committed to it.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import secrets
import select
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.migration.dirty import PAGE_SIZE, PageMarks, page_runs
from vfdirect.core.migration.policy import PrecopyPolicy
from vfdirect.core.migration.record import MigrationReport, Outcome, Phase
from vfdirect.core.migration.stream import (
    Section,
    SectionType,
    StreamDecoder,
    StreamEncoder,
    StreamError,
)
from vfdirect.host import exports as nbd_exports
from vfdirect.host.inventory import InventoryError, MigrationOutcome, VmState
from vfdirect.host.log import log_event
from vfdirect.host.mediated import MediatedPath
from vfdirect.host.vms import (
    VmProcess,
    VmProcessError,
    console_events,
    is_vm_process,
    vm_dir,
)

if TYPE_CHECKING:
    from vfdirect.host.service import HostService

__all__ = ["Channel", "IncomingMigration", "MigrateOptions", "MigrationFailed", "Progress",
           "SourceMigration", "fence", "reclaim_incoming"]

#: Pages per PAGES section (1 MiB of 4 KiB pages).
CHUNK_PAGES = 256
_ZERO_CHUNK = bytes(CHUNK_PAGES * PAGE_SIZE)
_fence_lock = threading.Lock()


def fence() -> None:
    """A full memory barrier (a lock round trip is a locked instruction on x86)."""
    with _fence_lock:
        pass


class MigrationFailed(Exception):
    """The migration cannot go on; the message says why (before commit: aborted)."""


#: Fault injection for the fault-matrix tests (never set in production): a comma list of
#: ``side:point:action`` where side is ``source`` or ``destination``, point one of the
#: names passed to :func:`fault_point` (``after_prepare``, ``after_quiesce``, ...), and
#: action ``fail`` (raise), ``close`` (cut the migration connection), ``kill-host``
#: (this host process dies with SIGKILL), ``kill-vm`` (the VM's process on this host
#: dies), ``hold=PATH`` (wait, at most 60 s, while PATH exists; ``PATH.reached`` is
#: created when the wait begins) or ``delay=MS``. ``@FILE`` instead of a list reads the
#: list from FILE at every point (a test changes the faults of running hosts).
FAULT_ENV = "VFDIRECT_MIGRATION_FAULTS"


def fault_point(side: str, point: str, *, channel: Channel | None = None,
                vm: VmProcess | None = None) -> None:
    """Fire the faults ``VFDIRECT_MIGRATION_FAULTS`` asks for at this point."""
    spec = os.environ.get(FAULT_ENV)
    if spec and spec.startswith("@"):
        try:
            spec = Path(spec[1:]).read_text()
        except OSError:
            return
    if not spec:
        return
    for item in spec.split(","):
        parts = item.strip().split(":", 2)
        if len(parts) != 3 or parts[0] != side or parts[1] != point:
            continue
        action = parts[2]
        if action == "fail":
            raise MigrationFailed(f"injected fault at {side}:{point}")
        if action == "close" and channel is not None:
            with contextlib.suppress(OSError):
                channel.sock.shutdown(socket.SHUT_RDWR)
        elif action == "kill-host":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "kill-vm" and vm is not None and vm.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(vm.pid, signal.SIGKILL)
        elif action.startswith("hold="):
            hold = Path(action[5:])
            if hold.exists():
                with contextlib.suppress(OSError):
                    hold.with_name(hold.name + ".reached").touch()
            deadline = time.monotonic() + 60.0
            while hold.exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        elif action.startswith("delay="):
            time.sleep(int(action[6:]) / 1000)


@dataclass(frozen=True)
class MigrateOptions:
    max_downtime_ms: int = 300
    drain_timeout_ms: int = 1000
    max_rounds: int = 30
    #: bounds every wait on the other host
    timeout_s: float = 60.0


# -- the connection ---------------------------------------------------------------------


class Channel:
    """One TCP connection carrying the migration stream, with a bounded receive."""

    def __init__(self, sock: socket.socket, role: str, timeout: float) -> None:
        self.sock = sock
        #: bounds a send that makes no progress (see :meth:`_sendall`)
        self.send_timeout = timeout
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.encoder = StreamEncoder()
        self.decoder = StreamDecoder(role)
        self._pending: list[Section] = []
        self.bytes_sent = 0
        self.sock.sendall(self.encoder.preamble())

    def send(self, data: bytes) -> None:
        self._sendall(data)
        self.bytes_sent += len(data)

    def _sendall(self, data: bytes) -> None:
        """Send everything; a peer that closed its end (it does not read any more, its
        window may stay shut) fails the send at once instead of after the timeout."""
        view = memoryview(data)
        stalled = 0.0
        while view:
            _, writable, _ = select.select([], [self.sock], [], 0.25)
            if writable:
                try:
                    sent = self.sock.send(view[:1 << 20])
                except TimeoutError:
                    sent = 0
                except OSError as exc:
                    raise MigrationFailed(f"migration connection: {exc}") from None
                view = view[sent:]
                stalled = 0.0
                continue
            readable, _, _ = select.select([self.sock], [], [], 0)
            if readable:
                try:
                    peek = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
                except BlockingIOError:
                    peek = b"?"
                except OSError as exc:
                    raise MigrationFailed(f"migration connection: {exc}") from None
                if not peek:
                    raise MigrationFailed("the other host closed the migration connection")
            stalled += 0.25
            if stalled >= self.send_timeout:
                raise MigrationFailed("the other host did not take the stream in time")

    def send_json(self, kind: SectionType, obj: dict[str, Any]) -> None:
        self.send(self.encoder.json(kind, obj))

    def send_pages(self, first: int, data: bytes) -> None:
        header = self.encoder.pages_header(first, len(data) // PAGE_SIZE, data)
        self._sendall(header)
        self._sendall(data)
        self.bytes_sent += len(header) + len(data)

    def send_zero(self, first: int, count: int) -> None:
        self.send(self.encoder.zero_pages(first, count))

    def receive(self, timeout: float | None = None) -> Section:
        """The next section (``MigrationFailed`` on EOF, timeout or a bad stream)."""
        if timeout is not None:
            self.sock.settimeout(timeout)
        while not self._pending:
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                raise MigrationFailed("the other host did not answer in time") from None
            except OSError as exc:
                raise MigrationFailed(f"migration connection: {exc}") from None
            if not data:
                raise MigrationFailed("the other host closed the migration connection")
            try:
                self._pending.extend(self.decoder.feed(data))
            except StreamError as exc:
                raise MigrationFailed(f"bad migration stream: {exc}") from None
        return self._pending.pop(0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def _now() -> int:
    """Report times: wall clock, so that the dashboard can lay the phases over the
    guest's IO rate (which the VM stamps with the wall clock too)."""
    return time.time_ns()


# -- source ----------------------------------------------------------------------------


@dataclass
class Progress:
    """What ``vm migrate`` shows while it runs (read by the API, written by the thread)."""

    phase: str = "prepare"
    round: int = 0
    bytes_sent: int = 0
    pages_sent: int = 0
    dirty_pages: int = 0
    dirty_rate_pps: float = 0.0
    outstanding: int = 0
    mediated_requests: int = 0
    done: bool = False
    outcome: str = "running"
    error: str | None = None
    report: dict[str, Any] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


class SourceMigration:
    """One outgoing migration, run on a thread of the source host."""

    def __init__(self, service: HostService, ident: str, vm: str, destination: str,
                 options: MigrateOptions) -> None:
        self.service = service
        self.ident = ident
        self.vm = vm
        self.destination = destination
        self.options = options
        self.log = service.log
        self.report = MigrationReport()
        self.progress = Progress()
        self.thread = threading.Thread(target=self._main, name=f"migrate-{vm}", daemon=True)
        # what the abort path must undo
        self._vf: int | None = None
        self._wwpn: str | None = None
        self._quiesced = False
        self._saved: tuple[dict[str, Any], list[int]] | None = None
        self._mediated: MediatedPath | None = None
        self._paused = False
        self._channel: Channel | None = None
        self._committed = False
        #: the queue state the VF handed over (B3/B4), shown by ``adapter show``
        self.handed_over_state: dict[str, Any] | None = None
        self.handed_over_vf: int | None = None
        self._memory: mmap.mmap | None = None
        self._resend = False
        self._released = False
        self._deferred: list[tuple[Phase, dict[str, Any]]] = []
        self._last_runs: list[tuple[int, int]] = []
        self._guest_marks: PageMarks | None = None

    # -- bookkeeping -----------------------------------------------------------------

    def _enter(self, phase: Phase) -> None:
        self.report.enter(phase, _now())
        self.progress.phase = phase.value
        log_event(self.log, "migration_phase", migration=self.ident, vm=self.vm,
                  vf=self._vf, vport=self._wwpn, phase=phase.value, state="enter")

    def _leave(self, phase: Phase, **detail: Any) -> None:
        self.report.leave(phase, _now())
        if self._paused and not self._released:
            # the VM is stopped: no database round trip now, the rows follow the commit
            self._deferred.append((phase, detail))
            return
        self._persist(phase, detail)

    def _persist(self, phase: Phase, detail: dict[str, Any]) -> None:
        log_event(self.log, "migration_phase", migration=self.ident, vm=self.vm,
                  vf=self._vf, vport=self._wwpn, phase=phase.value, state="leave", **detail)
        with contextlib.suppress(InventoryError):
            self.service.inv.event_append(
                f"migration_{phase.value}", claim=_PHASE_CLAIM.get(phase),
                host=self.service.name, vm=self.vm, vport=self._wwpn, migration=self.ident,
                detail={"vf": self._vf, **detail})
        self._save_report()

    def _flush_deferred(self) -> None:
        self._released = True
        deferred, self._deferred = self._deferred, []
        for phase, detail in deferred:
            self._persist(phase, detail)

    def _save_report(self, outcome: MigrationOutcome | None = None) -> None:
        self.progress.report = {**self.report.to_dict(),
                                "summary": [list(r) for r in self.report.summary_rows()]}
        with contextlib.suppress(InventoryError):
            self.service.inv.migration_update(self.ident, phases=self.progress.report,
                                              outcome=outcome)

    def _pf(self, what: str, fn: Callable[[PfClient], Any]) -> Any:
        try:
            return self.service.adapter.call(fn)
        except PfError as exc:
            raise MigrationFailed(f"{what}: {exc.message}") from None

    # -- run -------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            error = str(exc) or type(exc).__name__
            self.report.error = error
            self.progress.error = error
            if self._committed:
                log_event(self.log, "migration_cleanup_failed", level=logging.ERROR,
                          migration=self.ident, vm=self.vm, error=error)
                self._finish(MigrationOutcome.COMMITTED)
            else:
                log_event(self.log, "migration_abort", level=logging.WARNING,
                          migration=self.ident, vm=self.vm, error=error)
                outcome = self._abort(error)
                self._finish(outcome)
        else:
            self._finish(MigrationOutcome.COMMITTED)

    def _finish(self, outcome: MigrationOutcome) -> None:
        self.report.finish(Outcome(outcome.value))
        self.progress.outcome = outcome.value
        self._save_report(outcome)
        self.progress.done = True
        log_event(self.log, "migration_done", migration=self.ident, vm=self.vm,
                  outcome=outcome.value, error=self.report.error)

    def _run(self) -> None:
        svc = self.service
        view = svc.inv.vm_get(self.vm)
        if view.vf is None or view.vport is None:
            raise MigrationFailed(f"VM {self.vm!r} has no VF or no vport")
        vf = self._vf = int(view.vf)
        wwpn = self._wwpn = view.vport.canonical()
        proc = svc.vm_process(self.vm)
        if proc.pid is None:
            proc.pid = view.pid
        # -- prepare: the destination takes the VM in
        self._enter(Phase.PREPARE)
        dest = svc.inv.host_get(self.destination)
        if dest.api_address is None:
            raise MigrationFailed(f"host {self.destination!r} has no API address")
        port_name = self._port_name(wwpn)
        answer = svc.peer(dest.api_address).post("/v1/migrations/incoming", {
            "migration": self.ident, "vm": self.vm, "source": svc.name,
            "source_port_name": port_name})
        sock = socket.create_connection((answer["address"], int(answer["port"])),
                                        timeout=self.options.timeout_s)
        channel = self._channel = Channel(sock, "destination-to-source",
                                          self.options.timeout_s)
        channel.send_json(SectionType.HELLO, {
            "migration": self.ident, "vm": self.vm, "memory_size": view.memory_bytes,
            "page_size": PAGE_SIZE, "token": answer["token"], "source": svc.name,
            "spec": proc.read_spec()})
        self._leave(Phase.PREPARE, destination=self.destination,
                    destination_vf=answer.get("vf"))
        fault_point("source", "after_prepare", channel=channel, vm=proc)
        # -- B1: quiesce
        self._enter(Phase.QUIESCE)
        outstanding = int(self._pf("vf_quiesce", lambda pf: pf.vf_quiesce(vf)))
        self._quiesced = True
        self.report.outstanding_at_quiesce = outstanding
        self.progress.outstanding = outstanding
        self._leave(Phase.QUIESCE, outstanding=outstanding)
        fault_point("source", "after_quiesce", channel=channel, vm=proc)
        # -- B2: drain (X2: a missed deadline hands the rest over)
        self._enter(Phase.DRAIN)
        drained, heads = self._pf("vf_drain", lambda pf: pf.vf_drain(
            vf, self.options.drain_timeout_ms))
        self.report.drained = bool(drained)
        self.report.handed_over_heads = len(heads)
        self._leave(Phase.DRAIN, drained=drained, heads=len(heads))
        fault_point("source", "after_drain", channel=channel, vm=proc)
        # -- B3/B4: the queue state comes to the hypervisor, the DMA window is revoked
        self._enter(Phase.HANDOFF)
        record, fds = self._pf("vf_state_save", lambda pf: pf.vf_state_save(vf))
        self._saved = (record, list(fds))
        self.handed_over_state, self.handed_over_vf = record, vf
        waiting = _guest_in_flight(record, proc.memory)
        self.report.guest_in_flight_at_handoff = waiting
        self.progress.outstanding = waiting
        self._leave(Phase.HANDOFF, queues=len(record.get("queues", [])), fds=len(fds),
                    guest_in_flight=waiting)
        with contextlib.suppress(InventoryError):
            svc.inv.migration_update(self.ident, detail={"saved_state": record})
        # -- B5/B6: the mediated path
        self._enter(Phase.MEDIATED)
        pf_conn = PfClient(svc.adapter.socket_path, timeout=30.0)
        try:
            mediated = MediatedPath(record, fds, pf_conn, wwpn=wwpn, logger=self.log,
                                    owns_pf=True)
        except BaseException:
            pf_conn.close()
            raise
        self._saved = None  # the mediated path owns the fds now
        self._mediated = mediated
        mediated.start()
        fault_point("source", "after_handoff", channel=channel, vm=proc)
        with contextlib.ExitStack() as maps:
            memory = maps.enter_context(_mapped(proc.memory, view.memory_bytes))
            dmap = maps.enter_context(_mapped(proc.dirty_log,
                                              PageMarks.size_for(view.memory_bytes),
                                              write=True))
            guest = PageMarks(memoryview(dmap), view.memory_bytes)
            maps.callback(guest.release)
            self._memory, self._guest_marks = memory, guest
            try:
                # -- pre-copy
                self._precopy(channel, mediated)
                # -- stop and copy
                self._enter(Phase.STOP_COPY)
                # the VM stops itself where no store of it is half done (a SIGSTOP
                # could split a store from its dirty mark: then the pages of the last
                # round go again)
                self._paused = True
                if not proc.pause_at_safe_point(timeout=2.0):
                    self._resend = True
                paused_at = _now()
                state, state_fds = mediated.stop(self.options.timeout_s)
                self._leave(Phase.MEDIATED, requests=mediated.stats().get("requests"))
                self.report.mediated_requests = int(mediated.stats().get("requests", 0))
                fault_point("source", "after_pause", channel=channel, vm=proc)
                self._send_dirty(channel, final=True)
                channel.send_json(SectionType.STATE, {
                    "queue_state": state, "spec": proc.read_spec(),
                    "vcpu": {"paused_at_ns": time.time_ns(),
                             "memory_bytes": view.memory_bytes, "port_name": port_name}})
                channel.send_json(SectionType.END, {"pages": self.progress.pages_sent,
                                                    "bytes": channel.bytes_sent})
            finally:
                # unmapping a large memory costs milliseconds: after END is on its way
                self._memory = self._guest_marks = None
        self.progress.bytes_sent = self.report.bytes_sent = channel.bytes_sent
        fault_point("source", "after_end", channel=channel, vm=proc)
        # -- B7: the destination starts the VM
        self._enter(Phase.DESTINATION)
        reply = channel.receive(self.options.timeout_s)
        if reply.type is SectionType.ERROR:
            raise MigrationFailed(f"destination: {reply.json.get('message')}")
        if reply.type is not SectionType.READY:
            raise MigrationFailed(f"destination answered {reply.type.name}, not READY")
        fault_point("source", "after_ready", channel=channel, vm=proc)
        # -- commit point: the inventory says the VM is on the destination
        self._enter(Phase.COMMIT)
        if not svc.inv.migration_commit(self.ident, self.vm, self.destination):
            raise MigrationFailed("the destination gave the migration up before the commit")
        self._committed = True
        fault_point("source", "after_commit", channel=channel, vm=proc)
        with contextlib.suppress(OSError, MigrationFailed):
            channel.send_json(SectionType.COMMIT, {"migration": self.ident})
        with contextlib.suppress(MigrationFailed):
            channel.receive(self.options.timeout_s)  # DONE: the VM runs there
        self._leave(Phase.DESTINATION)
        self.report.downtime_ns = _now() - paused_at
        self._leave(Phase.STOP_COPY, downtime_ms=self.report.downtime_ns / 1e6)
        self._release_source(proc, vf, wwpn, state_fds)
        self._flush_deferred()
        self._leave(Phase.COMMIT)
        self._await_stall()

    def _await_stall(self, timeout: float = 5.0) -> None:
        """The destination records the guest's worst IO stall once the VM logged it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(InventoryError):
                stall = self.service.inv.migration_get(self.ident).detail.get(
                    "worst_stall_ms")
                if stall is not None:
                    self.report.note_stall(float(stall))
                    return
            time.sleep(0.05)

    def _port_name(self, wwpn: str) -> str:
        """The port name the source adapter has this vport logged in with."""
        dump = self._pf("adapter_dump", lambda pf: pf.adapter_dump())
        for vp in dump.get("vports", []):
            if vp.get("wwpn") == wwpn:
                login = vp.get("login") or {}
                return str(login.get("port_name") or wwpn)
        return wwpn

    # -- pre-copy --------------------------------------------------------------------

    def _precopy(self, channel: Channel, mediated: MediatedPath) -> None:
        assert self._memory is not None and self._guest_marks is not None
        memory, guest = self._memory, self._guest_marks
        self._enter(Phase.PRECOPY)
        policy = PrecopyPolicy(self.options.max_downtime_ms, max_rounds=self.options.max_rounds)
        round_no = 0
        try:
            guest.collect(fence)  # from here on every guest write is in the map
            mediated.collect_dirty()
            begin = start = _now()
            pages = self._send_all(channel, memory)
            self._round(round_no, pages, start)
            while True:
                round_no += 1
                elapsed = max(_now() - begin, 1) / 1e9
                bandwidth = channel.bytes_sent / elapsed
                start = _now()
                sent = self._send_dirty(channel)
                self._round(round_no, sent, start)
                fault_point("source", "precopy_round", channel=channel)
                if policy.next_step(round_no, sent, PAGE_SIZE, bandwidth) == "stop_and_copy":
                    break
            # the destination applies what it got and readies its VM process before the
            # VM stops here (its backlog would be downtime); then one more dirty round
            channel.send_json(SectionType.ROUND, {"sync": round_no})
            echo = channel.receive(self.options.timeout_s)
            if echo.type is SectionType.ERROR:
                raise MigrationFailed(f"destination: {echo.json.get('message')}")
            if echo.type is not SectionType.ROUND:
                raise MigrationFailed(f"destination answered {echo.type.name}, not ROUND")
            round_no += 1
            start = _now()
            self._round(round_no, self._send_dirty(channel), start)
        finally:
            self._leave(Phase.PRECOPY, rounds=round_no + 1)

    def _round(self, round_no: int, pages: int, start: int) -> None:
        duration = _now() - start
        self.report.add_round(round=round_no, pages=pages, bytes=pages * PAGE_SIZE,
                              dirty_pages=pages, duration_ns=duration)
        self.progress.round = round_no
        self.progress.dirty_pages = pages
        self.progress.dirty_rate_pps = pages / max(duration / 1e9, 1e-6)
        self.progress.bytes_sent = self._channel.bytes_sent if self._channel else 0
        if self._mediated is not None:
            stats = self._mediated.stats()
            self.progress.mediated_requests = int(stats.get("requests", 0))
            self.progress.outstanding = int(stats.get("outstanding", 0))
        if not self._paused:
            self._save_report()

    def _send_all(self, channel: Channel, memory: mmap.mmap) -> int:
        total = len(memory) // PAGE_SIZE
        self._last_runs = [(0, total)]
        sent = 0
        for first in range(0, total, CHUNK_PAGES):
            count = min(CHUNK_PAGES, total - first)
            data = memory[first * PAGE_SIZE:(first + count) * PAGE_SIZE]
            if data == _ZERO_CHUNK[:len(data)]:
                channel.send_zero(first, count)
            else:
                channel.send_pages(first, data)
            sent += count
            self.progress.pages_sent += count
            self.progress.bytes_sent = channel.bytes_sent
        return sent

    def _send_dirty(self, channel: Channel, *, final: bool = False) -> int:
        memory, guest = self._memory, self._guest_marks
        assert memory is not None and guest is not None
        runs = _merge_runs(guest.collect(fence), self._mediated.collect_dirty()
                           if self._mediated is not None else [],
                           self._last_runs if final and self._resend else [])
        self._last_runs = runs
        sent = 0
        for first, count in runs:
            for at in range(first, first + count, CHUNK_PAGES):
                n = min(CHUNK_PAGES, first + count - at)
                channel.send_pages(at, memory[at * PAGE_SIZE:(at + n) * PAGE_SIZE])
                sent += n
        self.progress.pages_sent += sent
        self.progress.bytes_sent = channel.bytes_sent
        if final:
            self.report.add_round(pages=sent, bytes=sent * PAGE_SIZE, dirty_pages=sent,
                                  duration_ns=0, final=True)
        return sent

    # -- commit and abort --------------------------------------------------------------

    def _release_source(self, proc: VmProcess, vf: int, wwpn: str,
                        state_fds: list[int]) -> None:
        """After the commit point: the source lets go of everything of the VM."""
        svc = self.service
        with contextlib.suppress(ProcessLookupError, VmProcessError, OSError):
            proc.send_signal(signal.SIGKILL)
        proc.reap(5.0)
        self._close_mediated()
        with contextlib.suppress(MigrationFailed):
            self._pf("vf_reset", lambda pf: pf.vf_reset(vf))
        with contextlib.suppress(InventoryError):
            svc.inv.vf_release(svc.name, vf)
        with contextlib.suppress(MigrationFailed):
            self._pf("vport_logout", lambda pf: pf.vport_logout(wwpn))
        with contextlib.suppress(MigrationFailed):
            self._pf("vport_delete", lambda pf: pf.vport_delete(wwpn))
        proc.remove_memory()
        if self._channel is not None:
            self._channel.close()
        log_event(self.log, "migration_source_released", migration=self.ident, vm=self.vm,
                  vf=vf, vport=wwpn)

    def _close_mediated(self) -> None:
        if self._mediated is not None:
            with contextlib.suppress(Exception):
                self._mediated.close()
            self._mediated = None

    def _abort(self, why: str) -> MigrationOutcome:
        """X1: the VM continues on the source VF with nothing lost."""
        with contextlib.suppress(Exception):
            self._flush_deferred()
        self.report.enter(Phase.ABORT, _now())
        self.progress.phase = Phase.ABORT.value
        svc = self.service
        if self._channel is not None:
            # a peer that does not read must not hold the abort up
            self._channel.send_timeout = min(self._channel.send_timeout, 2.0)
            with contextlib.suppress(OSError, MigrationFailed):
                self._channel.send_json(SectionType.ABORT, {"reason": why[:500]})
            self._channel.close()
        outcome = MigrationOutcome.ABORTED
        try:
            vf = self._vf
            state: tuple[dict[str, Any], list[int]] | None = self._saved
            if self._mediated is not None:
                state = self._mediated.stop(self.options.timeout_s)
            if vf is not None and state is not None:
                record, fds = state
                self._pf("vf_state_restore", lambda pf: pf.vf_state_restore(vf, record, fds))
            if vf is not None and (self._quiesced or state is not None):
                self._pf("vf_resume", lambda pf: pf.vf_resume(vf))
        except Exception as exc:
            outcome = MigrationOutcome.FAILED
            self.report.error = f"{why}; the abort failed too: {exc}"
            log_event(self.log, "migration_abort_failed", level=logging.ERROR,
                      migration=self.ident, vm=self.vm, error=str(exc))
        finally:
            if self._saved is not None:
                for fd in self._saved[1]:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                self._saved = None
            self._close_mediated()
            if self._paused:
                proc = svc.vm_process(self.vm)
                with contextlib.suppress(VmProcessError, OSError):
                    proc.send_signal(signal.SIGCONT)
            with contextlib.suppress(InventoryError):
                svc.inv.vm_set_state(self.vm, VmState.RUNNING
                                     if outcome is MigrationOutcome.ABORTED else VmState.ERROR)
            self.report.leave(Phase.ABORT, _now())
        return outcome


_PHASE_CLAIM = {Phase.QUIESCE: "B1", Phase.DRAIN: "B2", Phase.HANDOFF: "B4",
                Phase.MEDIATED: "B6", Phase.DESTINATION: "B7", Phase.ABORT: "X1"}


def _guest_in_flight(record: dict[str, Any], memory: Path) -> int:
    """Requests the guest has made available and not yet seen used, over the request
    queues (vring 2 on), read from guest memory: the IO in flight at the hand-off."""
    regions = record.get("regions", [])
    total = 0
    fd = os.open(memory, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for q in record.get("queues", []):
            if int(q["index"]) < 2:
                continue
            state = q["state"]
            gpa = int(state["avail_addr"]) + 2
            for r in regions:
                if int(r["gpa"]) <= gpa < int(r["gpa"]) + int(r["size"]):
                    raw = os.pread(fd, 2, gpa - int(r["gpa"]) + int(r["mmap_offset"]))
                    avail = int.from_bytes(raw, "little")
                    total += (avail - int(state["used_idx"])) & 0xFFFF
                    break
    finally:
        os.close(fd)
    return total


def _merge_runs(*lists: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The union of several lists of ``(first page, count)`` runs, as runs."""
    return list(page_runs([p for runs in lists for first, count in runs
                           for p in range(first, first + count)]))


@contextlib.contextmanager
def _mapped(path: Path, size: int, *, write: bool = False) -> Iterator[mmap.mmap]:
    fd = os.open(path, (os.O_RDWR if write else os.O_RDONLY) | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_size < size:
            raise MigrationFailed(f"{path} is smaller than {size} bytes")
        mm = mmap.mmap(fd, size, mmap.MAP_SHARED,
                       mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))
    finally:
        os.close(fd)
    try:
        yield mm
    finally:
        with contextlib.suppress(BufferError):
            mm.close()


# -- destination -----------------------------------------------------------------------


class IncomingMigration:
    """One incoming migration, on the destination host: prepared by the API call, then
    a thread receives the stream, starts the VM and waits for the commit."""

    def __init__(self, service: HostService, ident: str, vm: str, *, source: str,
                 source_port_name: str, options: MigrateOptions) -> None:
        self.service = service
        self.ident = ident
        self.vm = vm
        self.source = source
        self.options = options
        self.log = service.log
        self.token = secrets.token_hex(16)
        self.listener: socket.socket | None = None
        self.vf: int | None = None
        self.proc: VmProcess | None = None
        self.wwpn: str | None = None
        self.source_port_name = source_port_name
        self._logged_in = False
        self._vf_reserved = False
        self._committed = False
        self.thread = threading.Thread(target=self._main, name=f"incoming-{vm}", daemon=True)
        self.done = threading.Event()
        self.error: str | None = None

    def prepare(self, bind_address: str) -> dict[str, Any]:
        """Check, reserve, log the vport in (X3), listen. Undone on any failure."""
        svc = self.service
        try:
            view = svc.inv.vm_get(self.vm)
            if view.host != self.source:
                raise MigrationFailed(f"VM {self.vm!r} is on host {view.host!r}, "
                                      f"not {self.source!r}")
            if view.vport is None:
                raise MigrationFailed(f"VM {self.vm!r} has no vport")
            svc.check_luns_reachable(self.vm)
            self.vf = svc.reserve_vf(self.vm)
            self._vf_reserved = True
            port = svc.inv.vport_get(view.vport)
            self.wwpn = wwpn = port.wwpn.canonical()
            alternate = self.source_port_name == wwpn
            if alternate and port.alternate_wwpn is None:
                raise MigrationFailed(f"vport {wwpn} has no alternate WWPN to log in "
                                      f"with at the destination")
            svc.ensure_vport(port)
            svc.pf_call("vport_login", lambda pf: pf.vport_login(wwpn, alternate=alternate))
            self._logged_in = True
            svc.event("vport_login", "X3", vm=self.vm, vport=wwpn, alternate=alternate,
                      migration=self.ident)
            self.listener = socket.create_server((bind_address, 0))
            self.listener.settimeout(self.options.timeout_s)
        except BaseException:
            self._cleanup()
            raise
        self.thread.start()
        return {"address": bind_address, "port": self.listener.getsockname()[1],
                "token": self.token, "vf": self.vf}

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:
            self.error = str(exc) or type(exc).__name__
            if self._committed:
                self._fail_committed(self.error)
            else:
                log_event(self.log, "migration_incoming_failed", level=logging.WARNING,
                          migration=self.ident, vm=self.vm, error=self.error)
                self._cleanup()
        finally:
            if self.listener is not None:
                self.listener.close()
            self.done.set()

    def _run(self) -> None:
        assert self.listener is not None and self.vf is not None and self.wwpn is not None
        try:
            conn, _ = self.listener.accept()
        except TimeoutError:
            raise MigrationFailed("the source did not connect") from None
        channel = Channel(conn, "source-to-destination", self.options.timeout_s)
        try:
            self._receive(channel)
        finally:
            channel.close()

    def _receive(self, channel: Channel) -> None:
        svc = self.service
        assert self.vf is not None and self.wwpn is not None
        hello = channel.receive()
        if hello.type is not SectionType.HELLO:
            raise MigrationFailed("the stream does not start with HELLO")
        info = hello.json
        if info.get("token") != self.token or info.get("vm") != self.vm:
            raise MigrationFailed("the stream is not the one this host prepared for")
        memory_bytes = int(info["memory_size"])
        if memory_bytes != svc.inv.vm_get(self.vm).memory_bytes:
            raise MigrationFailed("the memory size differs from the inventory's")
        proc = self.proc = svc.vm_process(self.vm)
        proc.prepare_memory(memory_bytes)
        spec = info.get("spec")
        if isinstance(spec, dict):
            proc.write_spec(spec)
        # B7, first half: the VM process starts now (a Python start-up takes longer than
        # the downtime budget) and waits for its memory; its VF is assigned to it, the
        # mapping loaded and the vport bound while the pages arrive
        vf, wwpn = self.vf, self.wwpn
        ready: dict[str, Any] = {}

        def start_vm() -> None:
            try:
                pid = proc.spawn(memory_bytes=memory_bytes, workload=svc.vm_workload(self.vm),
                                 restart=True, incoming=True,
                                 extra_args=nbd_exports.spawn_args(proc))
                ready["pid"] = pid
                svc.pf_call("vf_assign", lambda pf: pf.vf_assign(vf, self.vm, pid))
                svc.load_mapping(self.vm, vf)
                svc.pf_call("vport_bind", lambda pf: pf.vport_bind(wwpn, vf))
                fault_point("destination", "after_spawn", channel=channel, vm=proc)
            except BaseException as exc:
                ready["error"] = exc

        starter = threading.Thread(target=start_vm, name=f"incoming-vm-{self.vm}",
                                   daemon=True)
        starter.start()

        def vm_started() -> int:
            starter.join(self.options.timeout_s)
            if starter.is_alive():
                raise MigrationFailed("the VM process did not start in time")
            error = ready.get("error")
            if error is not None:
                raise MigrationFailed(f"starting the VM: {error}") from None
            return int(ready["pid"])

        state: dict[str, Any] | None = None
        fresh = True  # ZERO sections of round 0 land on the new, all-zero file
        with _mapped(proc.memory, memory_bytes, write=True) as memory:
            while True:
                section = channel.receive()
                if section.type is SectionType.PAGES:
                    start = section.first_page * PAGE_SIZE
                    end = start + section.count * PAGE_SIZE
                    if section.data is not None and len(section.data):
                        memory[start:end] = section.data
                    elif fresh is False:
                        memory[start:end] = bytes(end - start)
                    # ZERO pages on the fresh (all-zero) file: nothing to write
                elif section.type is SectionType.ROUND:
                    # the source stops its VM next: be ready for it
                    vm_started()
                    fresh = False
                    channel.send_json(SectionType.ROUND, section.json)
                elif section.type is SectionType.STATE:
                    state = section.json
                elif section.type is SectionType.END:
                    break
                elif section.type is SectionType.ABORT:
                    raise MigrationFailed(f"the source aborted: {section.json.get('reason')}")
        if state is None:
            raise MigrationFailed("the stream ended without the VM's state")
        pid = vm_started()
        # B7, second half: page 0 names this host's VF; the guest boots on its memory
        svc.write_fwtable(self.vm, vf)
        fault_point("destination", "after_pages", channel=channel, vm=proc)
        proc.boot_incoming(timeout=self.options.timeout_s)
        fault_point("destination", "after_boot", channel=channel, vm=proc)
        if not proc.alive():  # READY promises a booted VM process
            raise MigrationFailed(f"VM {self.vm!r}: its process died after it booted")
        channel.send_json(SectionType.READY, {"pid": pid, "vf": vf})
        # wait for the commit; a lost COMMIT is found in the inventory
        try:
            section = channel.receive(self.options.timeout_s)
            committed = section.type is SectionType.COMMIT
            lost = False
        except MigrationFailed:
            committed, lost = False, True
        if lost:
            committed = self._await_decision()
        if not committed:
            raise MigrationFailed("the source did not commit")
        self._committed = True  # from here on the VM is this host's, whatever happens
        fault_point("destination", "after_commit", channel=channel, vm=proc)
        proc.go()
        proc.wait_event("vm_connected", after=proc.boot_offset, timeout=30.0)
        with contextlib.suppress(OSError, MigrationFailed):
            channel.send_json(SectionType.DONE, {"pid": pid, "vf": vf})
        self._logged_in = self._vf_reserved = False  # the VM owns them now
        svc.inv.vm_set_state(self.vm, VmState.RUNNING, pid=pid)
        svc.event("vm_migrated_in", "B7", vm=self.vm, vport=wwpn, vf=vf,
                  migration=self.ident, pid=pid)
        # the worst IO stall the guest saw: its first completion here against its last
        # one on the source (the VM logs it); into the record
        with contextlib.suppress(VmProcessError, InventoryError):
            event = proc.wait_event("vm_stall", after=proc.boot_offset, timeout=10.0)
            svc.inv.migration_update(self.ident,
                                     detail={"worst_stall_ms": event.get("stall_ms")})

    def _await_decision(self) -> bool:
        """The connection went after READY, before COMMIT came: the source may have
        committed (the COMMIT was lost) or may still be about to (it has READY in hand).
        The inventory decides, at once and for both: this host gives the migration up
        unless the source's commit came first (:meth:`Inventory.migration_give_up`);
        a source that commits later is refused and aborts, its VM back on its VF. The
        decision is retried while the inventory is unreachable, within the timeout."""
        svc = self.service
        deadline = time.monotonic() + self.options.timeout_s
        while True:
            try:
                return svc.inv.migration_give_up(self.ident)
            except InventoryError as exc:
                if time.monotonic() >= deadline:
                    raise MigrationFailed(f"no decision from the inventory: {exc}") from exc
            time.sleep(0.05)

    def _fail_committed(self, error: str) -> None:
        """After the commit point the VM is this host's (the source let go of it). Its
        VM process failing before it resumed the guest (it died, say) loses nothing of
        the guest: its memory is complete here. A new VM process resumes the guest on it
        once (``vm-run --restart``, as a destination does; the failure is in the
        record and the events); if that fails too the VM stays here in ERROR (no
        process, its VF released, its vport kept logged in), restartable with
        ``vm start``."""
        svc = self.service
        log_event(self.log, "migration_incoming_failed_after_commit", level=logging.ERROR,
                  migration=self.ident, vm=self.vm, error=error)
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stop(wait_s=5.0)
        with contextlib.suppress(InventoryError):
            svc.inv.migration_update(self.ident, detail={"destination_error": error[:500]})
        if self.proc is not None and self.vf is not None and self.wwpn is not None:
            try:
                pid = self._resume_on_memory(self.proc, self.vf, self.wwpn)
            except Exception as exc:
                error = f"{error}; resuming on its memory failed: {exc}"
                log_event(self.log, "migration_resume_failed", level=logging.ERROR,
                          migration=self.ident, vm=self.vm, error=str(exc))
                with contextlib.suppress(Exception):
                    self.proc.stop(wait_s=5.0)
            else:
                svc.event("vm_migrated_in", "B7", vm=self.vm, vport=self.wwpn, vf=self.vf,
                          migration=self.ident, pid=pid, restarted_after=error[:500])
                return
        if self.vf is not None:
            vf = self.vf
            with contextlib.suppress(Exception):
                svc.pf_call("vf_reset", lambda pf: pf.vf_reset(vf))
            with contextlib.suppress(InventoryError):
                svc.inv.vf_release(svc.name, vf)
        with contextlib.suppress(InventoryError):
            svc.inv.vm_set_state(self.vm, VmState.ERROR)
        with contextlib.suppress(InventoryError):
            svc.inv.migration_update(self.ident, detail={"destination_error": error[:500]})
        svc.event("vm_migrated_in_failed", "B7", vm=self.vm, vport=self.wwpn,
                  migration=self.ident, error=error[:500])

    def _resume_on_memory(self, proc: VmProcess, vf: int, wwpn: str) -> int:
        """A new VM process on the received memory, given the VF (reset first), the
        mapping, the vport and page 0, then let go: the guest resumes. Its pid."""
        svc = self.service
        memory_bytes = svc.inv.vm_get(self.vm).memory_bytes
        pid = proc.spawn(memory_bytes=memory_bytes, workload=svc.vm_workload(self.vm),
                         restart=True, extra_args=nbd_exports.spawn_args(proc))
        svc.pf_call("vf_reset", lambda pf: pf.vf_reset(vf))
        svc.pf_call("vf_assign", lambda pf: pf.vf_assign(vf, self.vm, pid))
        svc.load_mapping(self.vm, vf)
        svc.pf_call("vport_bind", lambda pf: pf.vport_bind(wwpn, vf))
        svc.write_fwtable(self.vm, vf)
        proc.go()
        proc.wait_event("vm_connected", after=proc.boot_offset, timeout=30.0)
        svc.inv.vm_set_state(self.vm, VmState.RUNNING, pid=pid)
        return pid

    def _cleanup(self) -> None:
        """Throw away what this host made for the VM (it stays on the source)."""
        svc = self.service
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.stop(wait_s=5.0)
            with contextlib.suppress(Exception):
                self.proc.remove_memory()
        if self.vf is not None and self._vf_reserved:
            vf = self.vf
            with contextlib.suppress(Exception):
                svc.pf_call("vf_reset", lambda pf: pf.vf_reset(vf))
            with contextlib.suppress(InventoryError):
                svc.inv.vf_release(svc.name, vf)
            self._vf_reserved = False
        if self.wwpn is not None and self._logged_in:
            wwpn = self.wwpn
            with contextlib.suppress(Exception):
                svc.pf_call("vport_logout", lambda pf, w=wwpn: pf.vport_logout(w))
            self._logged_in = False



# -- after a restart of the destination host ----------------------------------------------


def _vm_pids(run_dir: Path, name: str, *, incoming: bool) -> list[int]:
    """Live ``vm-run`` processes of VM ``name`` started by this host (their memory file
    is in its run dir); ``incoming``: only those a migration's destination spawns."""
    memory = str(vm_dir(run_dir, name)).encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if (b"--incoming" in argv or not incoming) and any(a.startswith(memory) for a in argv) \
                and is_vm_process(int(entry.name), name):
            pids.append(int(entry.name))
    return pids


def _booted(proc: VmProcess, pid: int) -> bool:
    """Whether incoming VM process ``pid`` booted on its memory (it answered READY)."""
    booted = False
    for item in console_events(proc.console):
        if item.get("event") == "vm_incoming" and item.get("pid") == pid:
            booted = False
        elif item.get("event") == "vm_booted" and item.get("pid") == pid:
            booted = True
    return booted


def _last_destination(svc: HostService, vm: str) -> bool:
    """Whether the VM's latest migration came to this host."""
    with contextlib.suppress(InventoryError):
        last = svc.inv.migration_list(vm=vm, limit=1)
        return bool(last) and last[0].destination == svc.name and last[0].source != svc.name
    return False


def _decide_incoming(svc: HostService, vm: str) -> None:
    """An incoming migration of ``vm`` this host's previous run left undecided: give it
    up now, unless its source committed first (then the VM is this host's), so that a
    source still holding READY cannot commit a VM this host is about to throw away."""
    with contextlib.suppress(InventoryError):
        last = svc.inv.migration_list(vm=vm, limit=1)
        if last and last[0].destination == svc.name and last[0].source != svc.name \
                and last[0].outcome == MigrationOutcome.RUNNING.value:
            svc.inv.migration_give_up(last[0].id)


def reclaim_incoming(service: HostService) -> dict[str, list[str]]:
    """After this host restarts (before its reconciliation): what incoming migrations
    that died with its previous run left behind (X1, B7).

    A VM the inventory places on another host (its source aborted): the VM process
    started for it is killed, the VF reserved for it reset and released, the vport's
    login by this adapter logged out. A VM committed to this host whose incoming never
    finished (MIGRATING here): its VM process, booted and paused at READY and holding the
    reserved VF, is adopted (recorded RUNNING and let go); otherwise the VM is left in
    ERROR here, restartable with ``vm start``."""
    svc = service
    run_dir = svc.config.run_dir
    report: dict[str, list[str]] = {"thrown_away": [], "adopted": [], "failed": []}
    held = {a.vm: int(a.vf) for a in svc.inv.vf_list(host=svc.name)}
    # MIGRATING here: committed to this host by a migration it was the destination of
    names = set(held) | {v.name for v in svc.inv.vm_list(host=svc.name)
                         if v.state is VmState.MIGRATING and _last_destination(svc, v.name)}
    vfs = {int(v["vf"]): v for v in svc.pf_call("vf_list", lambda pf: pf.vf_list())}
    for name in sorted(names):
        _decide_incoming(svc, name)
        view = svc.inv.vm_get(name)
        if view.host == svc.name and (view.state is not VmState.MIGRATING
                                      or not _last_destination(svc, name)):
            continue  # the VM runs here (or is stopped): reconcile's business
        # a VM elsewhere has no process here at all; one committed here may have the
        # process its incoming migration started
        pids = _vm_pids(run_dir, name, incoming=view.host == svc.name)
        proc = svc.vm_process(name)
        vf = held.get(name)
        if view.host == svc.name:
            adapter_vm = (vfs.get(vf, {}).get("vm") or {}) if vf is not None else {}
            pid = adapter_vm.get("pid")
            if pid in pids and _booted(proc, int(pid)):
                proc.pid = int(pid)
                offset = proc.console_offset()
                svc.inv.vm_set_state(name, VmState.RUNNING, pid=int(pid))
                try:
                    proc.go()
                    proc.wait_event("vm_connected", after=offset, timeout=30.0)
                except (VmProcessError, OSError) as exc:
                    log_event(svc.log, "migration_adopt_failed", level=logging.ERROR,
                              vm=name, pid=pid, error=str(exc))
                else:
                    svc.event("vm_migrated_in", "B7", vm=name, vf=vf, pid=pid,
                              adopted=True)
                    report["adopted"].append(name)
                    continue
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if vf is not None:
            with contextlib.suppress(Exception):
                svc.pf_call("vf_reset", lambda pf, i=vf: pf.vf_reset(i))
            with contextlib.suppress(InventoryError):
                svc.inv.vf_release(svc.name, vf)
        if view.host == svc.name:
            with contextlib.suppress(InventoryError):
                svc.inv.vm_set_state(name, VmState.ERROR)
            report["failed"].append(name)
            log_event(svc.log, "migration_incoming_lost", level=logging.ERROR, vm=name)
            continue
        with contextlib.suppress(Exception):
            proc.remove_memory()
        if view.vport is not None:
            wwpn = view.vport.canonical()
            dump = svc.pf_call("adapter_dump", lambda pf: pf.adapter_dump())
            for vp in dump.get("vports", []):
                if vp.get("wwpn") == wwpn:
                    with contextlib.suppress(Exception):
                        svc.pf_call("vport_logout", lambda pf, w=wwpn: pf.vport_logout(w))
                    with contextlib.suppress(Exception):
                        svc.pf_call("vport_delete", lambda pf, w=wwpn: pf.vport_delete(w))
        report["thrown_away"].append(name)
        log_event(svc.log, "migration_incoming_reclaimed", vm=name, pids=pids, vf=vf)
    return report
