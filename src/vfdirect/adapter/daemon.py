"""The adapter daemon: one per host; owns the PF, the VFs, the vport logins, the IO engine.

Start-up, in order: take the run directory (``adapter.lock``, flock: one adapter per run
directory), register the VF data paths (each VF binds its vhost-user socket
``vf<N>.sock`` when it is assigned to a VM), open the shared fabric if ``--fabric-dir``
was given (the physical port logs in, FLOGI), attach the ``--array`` directories, bind
``pf.sock`` (0600), log ``adapter_ready``. SIGTERM or SIGINT: stop accepting, finish the
request in hand, unlink the socket, stop the VF threads (their front ends are
disconnected, their sockets unlinked), log every port out (their login files are
released), close the LUNs.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from vfdirect import __version__
from vfdirect.adapter.audit import Auditor, pf_scope_resolver
from vfdirect.adapter.log import log_event, setup_logging
from vfdirect.adapter.platform import HostPlatform
from vfdirect.adapter.server import PeerPolicy, PfServer
from vfdirect.adapter.service import AdapterService
from vfdirect.adapter.vf import VfManager
from vfdirect.adapter.vf.worker import POLL_BUDGET_NS
from vfdirect.core.adapter.model import AdapterIdentity, AdapterModel
from vfdirect.core.rpc import RpcError
from vfdirect.core.wwn import Wwn

PF_SOCKET_NAME = "pf.sock"
RUN_LOCK_NAME = "adapter.lock"


class StartupError(Exception):
    """The adapter cannot start; the message says why."""


@dataclass(frozen=True, slots=True)
class AdapterConfig:
    run_dir: Path
    vfs: int = 16
    hypervisor_pid: int | None = None
    hypervisor_uid: int | None = None
    arrays: tuple[Path, ...] = ()
    fabric_dir: Path | None = None
    log_format: str = "text"
    port_wwpn: Wwn | None = None
    port_wwnn: Wwn | None = None
    #: busy-poll budget of a VF thread after activity, before it re-arms kicks and sleeps
    vf_poll_us: int = POLL_BUDGET_NS // 1000
    #: IO threads per VF (0: a VF executes its requests one at a time on its thread)
    vf_io_threads: int = 0
    #: audit every VF's (and the PF IO path's) guest memory and LUN accesses (issue 8)
    audit: bool = False

    def policy(self) -> PeerPolicy:
        """Without a configured hypervisor, only our own uid may connect."""
        if self.hypervisor_pid is None and self.hypervisor_uid is None:
            return PeerPolicy(uid=os.geteuid())
        return PeerPolicy(self.hypervisor_pid, self.hypervisor_uid)


def default_port_names(run_dir: Path) -> tuple[Wwn, Wwn]:
    """The physical port's WWPN and WWNN, derived from the run directory's path so that
    each host on a machine gets its own: NAA-5, vfdirect's company id, vendor-specific id
    ``8 << 32 | h`` (port) and ``9 << 32 | h`` (node), ``h`` 32 bits of a SHA-256 of the
    path. (Arrays' own names keep bits 32..35 for target port numbers 1..15.)"""
    digest = hashlib.sha256(str(run_dir.resolve()).encode()).digest()
    h = int.from_bytes(digest[:4], "big")
    return Wwn.naa5((0x8 << 32) | h), Wwn.naa5((0x9 << 32) | h)


def _take_run_dir(run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(run_dir / RUN_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StartupError(f"another adapter (pid {holder or '?'}) serves {run_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def run_adapter(config: AdapterConfig) -> int:
    """Run until SIGTERM/SIGINT; the exit status (0, or 1 when start-up failed)."""
    logger = setup_logging(config.log_format)
    try:
        return asyncio.run(_amain(config, logger))
    except StartupError as exc:
        log_event(logger, "adapter_start_failed", level=logging.ERROR, error=str(exc))
        return 1


async def _amain(config: AdapterConfig, logger: logging.Logger) -> int:
    run_dir = config.run_dir.resolve()
    lock_fd = _take_run_dir(run_dir)
    wwpn, wwnn = default_port_names(run_dir)
    auditor = Auditor(logger) if config.audit else None
    platform = HostPlatform(run_dir, port_wwpn=config.port_wwpn or wwpn,
                            port_wwnn=config.port_wwnn or wwnn,
                            fabric_dir=config.fabric_dir, auditor=auditor)
    server: PfServer | None = None
    vfs: VfManager | None = None
    try:
        def internal(method: str, exc: BaseException) -> None:
            log_event(logger, "pf_internal_error", level=logging.ERROR, method=method,
                      exc_info=exc)

        model = AdapterModel(platform, max_vfs=config.vfs,
                             identity=AdapterIdentity(version=__version__),
                             on_internal_error=internal)
        if auditor is not None:
            platform.audit_scope_of = pf_scope_resolver(auditor, model)
        service = AdapterService(model, platform, logger)
        vfs = VfManager(service, max_vfs=config.vfs, logger=logger,
                        poll_budget_ns=config.vf_poll_us * 1000,
                        io_threads=config.vf_io_threads)
        vfs.start()
        try:
            if config.fabric_dir is not None:
                platform.open_fabric(config.fabric_dir.resolve())
            for array in config.arrays:
                model.call("array_attach", {"path": str(array.resolve())})
        except RpcError as exc:
            raise StartupError(exc.message) from None
        sock_path = run_dir / PF_SOCKET_NAME
        with contextlib.suppress(FileNotFoundError):
            sock_path.unlink()  # we hold the run directory: no live adapter uses it
        server = PfServer(service, sock_path, config.policy(), logger)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        fabric = platform.fabric
        log_event(logger, "adapter_ready", pid=os.getpid(), socket=str(sock_path),
                  vfs=config.vfs,
                  physical_port=None if fabric is None else
                  fabric.physical_login().wwpn.canonical(),
                  fabric=None if fabric is None else fabric.directory,
                  audit=auditor is not None)
        await server.run(stop)
        log_event(logger, "adapter_stopped", pid=os.getpid())
        return 0
    finally:
        if server is not None:
            server.close_listener()
        if vfs is not None:
            vfs.close()
        platform.close()
        os.close(lock_fd)
