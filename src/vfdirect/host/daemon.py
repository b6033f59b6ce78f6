"""The host daemon (``vfdirect host start``): the hypervisor of one host.

Start-up, in order: take the run directory (``host.lock``, flock: one host per run
directory; the kernel drops it when the host dies, even by SIGKILL), open the inventory
and register the host (claim A9: what a previous run stored is there), start the adapter
or attach to the one still serving the run directory, import and attach the ``--array``
directories, reconcile the adapter with the inventory, bind the API on ``api.sock``
(0600) and optionally on 127.0.0.1, write ``host.json``, log ``host_ready``.

Stop: ``POST /v1/host/stop`` or SIGTERM/SIGINT. A full stop stops the VMs and the
adapter; ``keep_running`` leaves both (a host restart or upgrade finds them again).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
from pathlib import Path
from types import FrameType

import uvicorn

from vfdirect.host.adapter_link import AdapterLink, AdapterStartError
from vfdirect.host.api import create_app
from vfdirect.host.inventory import HostState, Inventory, InventoryError
from vfdirect.host.log import log_event, setup_logging
from vfdirect.host.service import HostConfig, HostError, HostService

HOST_LOCK_NAME = "host.lock"
HOST_INFO_NAME = "host.json"
API_SOCKET_NAME = "api.sock"
HOST_LOG_NAME = "host.log"


class HostStartError(Exception):
    """The host cannot start; the message says why."""


class _ApiServer(uvicorn.Server):
    """uvicorn, except that SIGTERM/SIGINT only end the serving: uvicorn would raise the
    signal again once it stopped, killing the host before it stops its VMs and adapter."""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def _take_run_dir(run_dir: Path) -> int:
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(run_dir / HOST_LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise HostStartError(f"another host (pid {holder or '?'}) serves {run_dir}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _bind_unix(path: Path) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()  # we hold the run directory: no live host uses it
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        sock.bind(str(path))
    finally:
        os.umask(old)
    sock.listen(64)
    return sock


def _bind_tcp(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(64)
    return sock


def run_host(config: HostConfig) -> int:
    """Run until stopped; the exit status (0, or 1 when start-up failed)."""
    logger = setup_logging(config.log_format)
    try:
        lock_fd = _take_run_dir(config.run_dir)
    except HostStartError as exc:
        log_event(logger, "host_start_failed", level=logging.ERROR, error=str(exc))
        return 1
    try:
        return _run(config, logger)
    except (HostStartError, AdapterStartError, InventoryError, HostError, OSError) as exc:
        log_event(logger, "host_start_failed", level=logging.ERROR, error=str(exc))
        return 1
    finally:
        os.close(lock_fd)


def _run(config: HostConfig, logger: logging.Logger) -> int:
    run_dir = config.run_dir
    inventory = Inventory.open(config.db)
    adapter = AdapterLink(run_dir)
    sockets: list[socket.socket] = []
    keep = {"running": False}
    served = False
    try:
        inventory.host_register(config.name, api_address=str(config.api_socket),
                                run_dir=str(run_dir))
        adapter.open(vfs=config.vfs, arrays=(), fabric_dir=config.fabric_dir,
                     log_format=config.log_format)
        log_event(logger, "adapter_linked", pid=adapter.pid, attached=adapter.attached,
                  socket=str(adapter.socket_path))
        service = HostService(config, inventory, adapter, logger)
        for array in config.arrays:
            service.array_attach(array.resolve())
        report = service.reconcile()
        sockets.append(_bind_unix(config.api_socket))
        if config.api_port is not None:
            sockets.append(_bind_tcp(config.api_port))
        server: _ApiServer | None = None

        def on_stop(keep_running: bool) -> None:
            keep["running"] = keep_running
            if server is not None:
                server.should_exit = True

        app = create_app(service, on_stop=on_stop)
        server = _ApiServer(uvicorn.Config(app, log_level="warning", lifespan="off",
                                               access_log=False))
        info = {"name": config.name, "pid": os.getpid(), "api_socket": str(config.api_socket),
                "api_port": config.api_port, "adapter_pid": adapter.pid}
        (run_dir / HOST_INFO_NAME).write_text(json.dumps(info) + "\n")
        log_event(logger, "host_ready", pid=os.getpid(), name=config.name,
                  api_socket=str(config.api_socket), api_port=config.api_port,
                  adapter_pid=adapter.pid, adapter_attached=adapter.attached,
                  reconciled=report)
        served = True
        server.run(sockets=sockets)
        if keep["running"]:
            log_event(logger, "host_stopping", keep_running=True)
            adapter.close()
        else:
            log_event(logger, "host_stopping", keep_running=False)
            service.shutdown_vms()
            adapter.stop()
        with contextlib.suppress(InventoryError):
            inventory.host_set_state(config.name, HostState.DOWN)
        log_event(logger, "host_stopped", pid=os.getpid())
        return 0
    finally:
        if not served and not adapter.attached:
            adapter.stop()  # start-up failed: leave no adapter of ours behind
        for s in sockets:
            s.close()
        with contextlib.suppress(FileNotFoundError):
            config.api_socket.unlink()
        with contextlib.suppress(FileNotFoundError):
            (run_dir / HOST_INFO_NAME).unlink()
        adapter.close()
        inventory.close()
