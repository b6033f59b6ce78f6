"""NBD exports of a VM's disks, host side (docs/nbd.md).

The exports are part of the VM's spec (``<run dir>/vms/<vm>/spec.json``, key
``"exports"``: a list of ``{"disk": "sda" | "T:L", "unix": PATH}`` or ``{"disk": ...,
"port": N}``), so they come back whenever the VM starts from its spec: on this host,
or on the destination of a live migration (which receives the spec). Before a Python VM
starts, :func:`spawn_args` writes the spec's exports to ``exports.json`` beside it and
returns the ``vm-run --exports-file`` arguments; on a running VM, :func:`add_export` and
:func:`remove_export` rewrite that file and send the VM process SIGHUP, then wait
(bounded) for the VM's ``nbd_exports`` event to confirm what it serves.

The VM process serves the exports itself, through its VF (:mod:`vfdirect.vm.nbd`).
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

from vfdirect.core.nbd.exports import ExportSpec, ExportSpecError
from vfdirect.core.rpc import ErrorCode
from vfdirect.host.vms import VmProcess, VmProcessError

__all__ = [
    "EXPORTS_NAME",
    "ExportError",
    "add_export",
    "list_exports",
    "remove_export",
    "spawn_args",
    "spec_exports",
]

EXPORTS_NAME = "exports.json"
#: How long a running VM has to confirm it serves its new exports.
RELOAD_TIMEOUT_S = 10.0


class ExportError(Exception):
    """An export request refused; ``code`` is the API's error code."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _python_vm(proc: VmProcess) -> bool:
    return bool(proc.read_spec().get("runtime", "python") == "python")


def spec_exports(spec: dict[str, Any]) -> list[ExportSpec]:
    """The exports of a VM spec (entries that do not parse are skipped)."""
    out = []
    items = spec.get("exports")
    for item in items if isinstance(items, list) else []:
        try:
            out.append(ExportSpec.load(item))
        except ExportSpecError:
            continue
    return out


def _write_file(proc: VmProcess, exports: list[ExportSpec]) -> Path:
    proc.dir.mkdir(parents=True, exist_ok=True)
    path = proc.dir / EXPORTS_NAME
    tmp = proc.dir / (EXPORTS_NAME + ".tmp")
    tmp.write_text(json.dumps({"exports": [e.dump() for e in exports]}, indent=2) + "\n")
    tmp.replace(path)
    return path


def spawn_args(proc: VmProcess) -> list[str]:
    """The ``vm-run`` arguments of a Python VM about to start: its exports file, written
    from its spec now (empty for a QEMU VM). Call it for every start of the VM, including
    a migration's destination after the spec was written there."""
    if not _python_vm(proc):
        return []
    path = _write_file(proc, spec_exports(proc.read_spec()))
    return ["--exports-file", str(path)]


def list_exports(proc: VmProcess) -> list[dict[str, Any]]:
    """The VM's exports as ``vm show`` prints them."""
    return [{"disk": e.disk, "address": e.address, "uri": e.uri}
            for e in spec_exports(proc.read_spec())]


def _other_vm_uses(proc: VmProcess, spec: ExportSpec) -> str | None:
    for path in sorted(proc.dir.parent.glob("*/spec.json")):
        if path.parent == proc.dir:
            continue
        try:
            other = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(other, dict) and any(e.address == spec.address
                                           for e in spec_exports(other)):
            return path.parent.name
    return None


def add_export(proc: VmProcess, disk: str, *, unix: str | None = None,
               port: int | None = None, running: bool) -> dict[str, Any]:
    """Export ``disk`` of the VM at a Unix socket or loopback TCP port; recorded in the
    spec; a running VM serves it at once. Returns the export (``disk``, ``name`` when the
    running VM resolved it, ``address``, ``uri``)."""
    if not _python_vm(proc):
        raise ExportError(ErrorCode.INVALID_PARAMS,
                          "NBD exports are served by the Python VM runtime only")
    if unix is not None and not unix.startswith("/"):
        raise ExportError(ErrorCode.INVALID_PARAMS, f"Unix socket path {unix!r} is not "
                                                    f"absolute")
    try:
        export = ExportSpec(disk=disk, unix=unix, port=port)
    except ExportSpecError as exc:
        raise ExportError(ErrorCode.INVALID_PARAMS, str(exc)) from None
    spec = proc.read_spec()
    current = spec_exports(spec)
    if any(e.disk == export.disk and e.address == export.address for e in current):
        raise ExportError(ErrorCode.CONFLICT,
                          f"{export.disk} is already exported at {export.address}")
    owner = _other_vm_uses(proc, export)
    if owner is not None:
        raise ExportError(ErrorCode.CONFLICT, f"{export.address} is used by VM {owner!r}")
    updated = [*current, export]
    _save(proc, spec, updated)
    entry = {"disk": export.disk, "name": None, "address": export.address, "uri": export.uri}
    if not running:
        return entry
    try:
        status = _reload(proc)
    except ExportError:
        _save(proc, spec, current)
        raise
    mine = next((s for s in status if s.get("disk") == export.disk
                 and s.get("address") == export.address), None)
    problem = None
    if mine is None:
        problem = "the VM did not report the export"
    elif mine.get("error"):
        problem = f"cannot listen at {export.address}: {mine['error']}"
    elif mine.get("name") is None:
        problem = f"the VM has no disk {export.disk}"
    if problem is not None:
        _save(proc, spec, current)
        _reload(proc)
        raise ExportError(ErrorCode.INVALID_PARAMS, problem)
    assert mine is not None
    entry["name"] = mine["name"]
    return entry


def remove_export(proc: VmProcess, disk: str, *, running: bool) -> list[dict[str, Any]]:
    """Stop exporting ``disk`` (at every address); returns the exports removed."""
    try:
        ref = ExportSpec(disk=disk, port=1).disk
    except ExportSpecError as exc:
        raise ExportError(ErrorCode.INVALID_PARAMS, str(exc)) from None
    spec = proc.read_spec()
    current = spec_exports(spec)
    gone = [e for e in current if e.disk == ref]
    if not gone:
        raise ExportError(ErrorCode.NOT_FOUND, f"{ref} is not exported")
    _save(proc, spec, [e for e in current if e.disk != ref])
    if running:
        _reload(proc)
    return [{"disk": e.disk, "address": e.address, "uri": e.uri} for e in gone]


def _save(proc: VmProcess, spec: dict[str, Any], exports: list[ExportSpec]) -> None:
    new = {k: v for k, v in spec.items() if k != "exports"}
    if exports:
        new["exports"] = [e.dump() for e in exports]
    proc.write_spec(new)
    _write_file(proc, exports)


def _takes_exports(pid: int) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"--exports-file" in argv


def _reload(proc: VmProcess) -> list[dict[str, Any]]:
    """SIGHUP the running VM; its ``nbd_exports`` status (bounded wait)."""
    pid = proc.pid
    if pid is None or not proc.alive():
        raise ExportError(ErrorCode.WRONG_STATE, f"VM {proc.name!r} has no process")
    if not _takes_exports(pid):
        raise ExportError(ErrorCode.WRONG_STATE,
                          f"VM {proc.name!r} was started without an exports file: the "
                          f"exports are recorded and served from its next start")
    offset = proc.console_offset()
    try:
        proc.send_signal(signal.SIGHUP)
        event = _wait_reload(proc, offset)
    except VmProcessError as exc:
        raise ExportError(ErrorCode.TIMEOUT,
                          f"{exc} (NBD exports are served by the idle workload)") from None
    if event.get("event") == "nbd_exports_invalid":
        raise ExportError(ErrorCode.INTERNAL_ERROR, f"the VM refused its exports file: "
                                                    f"{event.get('error')}")
    status = event.get("exports")
    return status if isinstance(status, list) else []


def _wait_reload(proc: VmProcess, offset: int) -> dict[str, Any]:
    """The VM's first ``nbd_exports`` or ``nbd_exports_invalid`` event after ``offset``."""
    deadline = time.monotonic() + RELOAD_TIMEOUT_S
    while True:
        try:
            with open(proc.console, "rb") as f:
                f.seek(offset)
                lines = f.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            if not line.startswith("{"):
                continue
            with contextlib.suppress(ValueError):
                item = json.loads(line)
                if isinstance(item, dict) and item.get("event") in (
                        "nbd_exports", "nbd_exports_invalid"):
                    return item
        if not proc.alive():
            raise VmProcessError(f"VM {proc.name!r} exited")
        if time.monotonic() >= deadline:
            raise VmProcessError(f"VM {proc.name!r} did not confirm its exports in "
                                 f"{RELOAD_TIMEOUT_S:g} s")
        time.sleep(0.02)
