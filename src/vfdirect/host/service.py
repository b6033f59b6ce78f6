"""The hypervisor's operations: claim A step by step, VM lifecycle, reconciliation.

Rules of this module:

* every claim step is its own method and leaves one event in the inventory carrying its
  claim id (the inventory writes those of A1, A3, A5 and A6 in the same transaction as the
  change; this module writes A2, A4, A7 and A8) and one log line;
* the adapter is reached only through :class:`~vfdirect.host.adapter_link.AdapterLink`
  (the PF); the VMs only as processes (signals) and their memory file (page 0);
* one lock serialises the operations: the API runs requests on several threads, and a VM
  start is a sequence over the inventory, the adapter and a process that must not
  interleave with another;
* a refused request changes nothing: input is checked by the inventory before anything
  else is touched, and a VM start that fails half way is rolled back (process stopped,
  VF reset and released, VM in ERROR).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vfdirect.adapter.pf_client import PfClient, PfError
from vfdirect.core.guest.fwtable import FirmwareTable, FwDisk, encode_fwtable
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.wwn import Wwn, WwnError
from vfdirect.guestimage import GuestImageError
from vfdirect.host import exports as nbd_exports
from vfdirect.host import qemu as qemu_vms
from vfdirect.host.adapter_link import AdapterLink
from vfdirect.host.client import HostClient
from vfdirect.host.inventory import (
    Inventory,
    InventoryError,
    MappingInfo,
    VmRuntime,
    VmState,
    VmView,
)
from vfdirect.host.log import log_event
from vfdirect.host.migration import (
    IncomingMigration,
    MigrateOptions,
    MigrationFailed,
    SourceMigration,
    reclaim_incoming,
)
from vfdirect.host.vms import WORKLOADS, VmProcess, VmProcessError, is_vm_process
from vfdirect.storage import StorageArray, StorageError

#: VM states in which the VM has a process on this host.
_LIVE = frozenset({VmState.STARTING, VmState.RUNNING, VmState.PAUSED})


class HostError(Exception):
    """A refusal or failure of the host, with the stable JSON-RPC code the API answers
    with (as :class:`~vfdirect.host.inventory.InventoryError`)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _pf_error(exc: PfError, what: str) -> HostError:
    return HostError(exc.code, f"{what}: adapter: {exc.message}")


@dataclass
class HostConfig:
    name: str
    run_dir: Path
    db: str
    api_socket: Path
    api_port: int | None = None
    arrays: tuple[Path, ...] = ()
    fabric_dir: Path | None = None
    vfs: int = 8
    log_format: str = "text"
    vm_workload: str = "idle"
    #: where an incoming migration's stream listens (TCP)
    migration_address: str = "127.0.0.1"


class HostService:
    """The hypervisor of one host: inventory + adapter (PF) + VM processes."""

    def __init__(self, config: HostConfig, inventory: Inventory, adapter: AdapterLink,
                 logger: logging.Logger) -> None:
        self.config = config
        self.name = config.name
        self.inv = inventory
        self.adapter = adapter
        self.log = logger
        self._lock = threading.RLock()
        self._vms: dict[str, VmProcess] = {}
        self._migrations: dict[str, SourceMigration] = {}
        self._incoming: dict[str, IncomingMigration] = {}

    # -- helpers ---------------------------------------------------------------------

    @contextlib.contextmanager
    def _op(self) -> Iterator[None]:
        with self._lock:
            yield

    def _pf(self, what: str, fn: Any) -> Any:
        try:
            return self.adapter.call(fn)
        except PfError as exc:
            raise _pf_error(exc, what) from None

    def _event(self, kind: str, claim: str | None, *, vm: str | None = None,
               vport: str | None = None, **detail: Any) -> None:
        """One claim step done: an inventory event and one log line."""
        self.inv.event_append(kind, claim=claim, host=self.name, vm=vm, vport=vport,
                              detail=detail)
        log_event(self.log, kind, claim=claim, vm=vm, vport=vport, **detail)

    def _vm_process(self, name: str) -> VmProcess:
        proc = self._vms.get(name)
        if proc is None:
            # a QEMU VM (its spec says so, host/qemu.py) or a Python VM
            proc = qemu_vms.vm_process(self.config.run_dir, name, self.log)
            self._vms[name] = proc
        return proc

    def _vm(self, name: str) -> VmView:
        view = self.inv.vm_get(name)
        if view.host is not None and view.host != self.name:
            raise HostError(ErrorCode.WRONG_STATE, f"VM {name!r} runs on host {view.host!r}")
        return view

    # -- status ----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        ident = self._pf("adapter_identify", lambda pf: pf.adapter_identify())
        return {
            "name": self.name, "pid": os.getpid(), "run_dir": str(self.config.run_dir),
            "inventory": self.inv.url, "api_socket": str(self.config.api_socket),
            "api_port": self.config.api_port,
            "adapter": {"pid": self.adapter.pid, "attached": self.adapter.attached,
                        "socket": str(self.adapter.socket_path),
                        "vfs_enabled": ident.get("vfs_enabled"),
                        "max_vfs": ident.get("max_vfs"), "version": ident.get("version")},
            "vms": len(self.inv.vm_list(host=self.name)),
        }

    def adapter_show(self) -> dict[str, Any]:
        def get(pf: PfClient) -> dict[str, Any]:
            fabric = pf.fabric_show()
            return {"identify": pf.adapter_identify(), "vfs": pf.vf_list(),
                    "logins": fabric.get("logins", [])}
        out: dict[str, Any] = self._pf("adapter_show", get)
        out["pid"] = self.adapter.pid
        # claims B3/B4: the queue-state records VFs handed to this hypervisor (migrations
        # under way: the mediated path serves from them)
        out["handed_over"] = [
            {"migration": m.ident, "vm": m.vm, "vf": m.handed_over_vf,
             "state": m.handed_over_state}
            for m in self._migrations.values()
            if not m.progress.done and m.handed_over_state is not None]
        return out

    # -- storage ---------------------------------------------------------------------

    def array_attach(self, directory: Path) -> None:
        """An array directory: into the inventory (with its LUNs) and the adapter."""
        try:
            array = StorageArray.open(directory)
        except (StorageError, OSError) as exc:
            raise HostError(ErrorCode.NOT_FOUND, f"array {directory}: {exc}") from None
        self.inv.array_import(array)
        self._pf("array_attach", lambda pf: pf.array_attach(array.directory))

    def lun_create(self, array: str, num_blocks: int, block_size: int,
                   lun: int | None) -> dict[str, Any]:
        with self._op():
            view = self.inv.array_get(array)
            try:
                shell = StorageArray.open(view.directory)
                made = shell.lun_create(num_blocks, block_size, lun)
            except (StorageError, ValueError) as exc:
                raise HostError(ErrorCode.INVALID_PARAMS, f"array {view.wwn}: {exc}") from None
            except (OverflowError, OSError) as exc:
                # a size past what a file can be (EFBIG, or beyond off_t): the array
                # removed the file it began; nothing was made
                if isinstance(exc, OSError) and exc.errno not in (errno.EFBIG, errno.EINVAL):
                    raise
                raise HostError(ErrorCode.INVALID_PARAMS,
                                f"array {view.wwn}: {num_blocks} blocks of {block_size} "
                                f"bytes is too large for a LUN file") from None
            self.inv.array_import(shell)
            self._pf("array_attach", lambda pf: pf.array_attach(shell.directory))
            log_event(self.log, "lun_create", lun=str(made.key), num_blocks=num_blocks,
                      block_size=block_size)
            return {"array": made.key.array.canonical(), "lun": int(made.key.lun),
                    "block_size": made.block_size, "num_blocks": made.num_blocks}

    # -- claim A1: vdisks ------------------------------------------------------------

    def vdisk_create(self, datastore: str, name: str, capacity_blocks: int,
                     thin: bool) -> Any:
        with self._op():
            # claim A1: the hypervisor creates a virtual disk on a datastore (the
            # inventory writes the A1 event with its extents, the first mapping)
            view = self.inv.vdisk_create(datastore, name, capacity_blocks, thin=thin)
            log_event(self.log, "vdisk_create", claim="A1", vdisk=view.id, name=name,
                      datastore=datastore, capacity_blocks=capacity_blocks)
            return view

    def vdisk_delete(self, vdisk: str) -> None:
        with self._op():
            datastore = self.inv.vdisk_get(vdisk).datastore
            self.inv.vdisk_delete(vdisk)
            log_event(self.log, "vdisk_delete", vdisk=vdisk)
            self._zero_freed(datastore)

    def _zero_freed(self, datastore: str) -> None:
        """Zero-on-reuse: zero the datastore's freed extents on their LUNs, then hand
        them back to the allocator. One that fails stays dirty (never handed out) and
        is tried again at the next delete."""
        for extent in self.inv.datastore_pending_zero(datastore):
            try:
                array = StorageArray.open(self.inv.array_get(extent.lun.array).directory)
                array.lun_zero(int(extent.lun.lun), int(extent.start), extent.count)
                self.inv.datastore_mark_zeroed(datastore, extent)
            except (StorageError, InventoryError, OSError, ValueError) as exc:
                log_event(self.log, "vdisk_zero_failed", level=logging.WARNING,
                          datastore=datastore, extent=str(extent), error=str(exc))

    # -- claim A2: mapping info ------------------------------------------------------

    def mapping_build(self, vm: str) -> MappingInfo:
        """Claim A2: the VM's mapping info, both mappings, built from the inventory."""
        info = self.inv.mapping_build(vm)
        self._event("mapping_build", "A2", vm=vm, vdisks=[
            {"vdisk": e.vdisk.id, "extents": [p.extent.dump() for p in e.layout.placements],
             "target": int(e.address.target), "lun": e.address.lun} for e in info.entries])
        return info

    # -- claim A3: allocate vdisks to a VM (and hot attach/detach) -------------------

    def vm_attach(self, vm: str, vdisk: str, target: int | None, lun: int | None) -> Any:
        with self._op():
            view = self._vm(vm)
            # claim A3: the vdisk is allocated to the VM (A2's second mapping row)
            address = self.inv.vdisk_attach(vm, vdisk, target=target, lun=lun)
            log_event(self.log, "vdisk_attach", claim="A3", vm=vm, vdisk=address.vdisk_id,
                      target=int(address.target), lun=address.lun)
            if view.state in _LIVE and view.vf is not None:
                try:
                    self._hot_update(vm, int(view.vf))
                except Exception:
                    self.inv.vdisk_detach(address.vdisk_id)  # nothing changed
                    raise
            return address

    def vm_detach(self, vm: str, vdisk: str) -> Any:
        with self._op():
            view = self._vm(vm)
            disk = self.inv.vdisk_get(vdisk)
            if disk.vm != vm:
                raise HostError(ErrorCode.CONFLICT,
                                f"vdisk {disk.id} ({disk.name!r}) is not attached to VM {vm!r}")
            address = self.inv.vdisk_detach(disk.id)
            log_event(self.log, "vdisk_detach", vm=vm, vdisk=disk.id)
            if view.state in _LIVE and view.vf is not None:
                self._hot_update(vm, int(view.vf))
            return address

    def _hot_update(self, vm: str, vf: int) -> None:
        """A running VM's disks changed: new mapping through the PF (the VF raises a
        rescan event in the guest), masking for new LUNs, firmware table rewritten."""
        info = self._prepare_vdisks(vm)
        vport = self.inv.vm_get(vm).vport
        if vport is not None:
            self._mask(vm, vport.canonical(), info)
        self._mapping_load(vm, vf)
        self._fwtable_write(vm, vf, info)

    # -- VM lifecycle ----------------------------------------------------------------

    def vm_create(self, name: str, memory_bytes: int, workload: str | None = None, *,
                  runtime: str = "python", kernel: Path | None = None,
                  initrd: Path | None = None) -> VmView:
        """Define a VM; ``workload`` (what ``vm start`` runs unless told otherwise) goes
        to the VM's spec file in the run directory (the inventory has no column for it),
        and so do a QEMU VM's kernel and initrd (``runtime="qemu"``, host/qemu.py)."""
        try:  # before the lock: the default guest image may have to be built
            runtime_spec = qemu_vms.runtime_spec(runtime, kernel, initrd)
            if runtime_spec:
                qemu_vms.check_memory(memory_bytes)
        except qemu_vms.QemuError as exc:
            raise HostError(ErrorCode.INVALID_PARAMS, str(exc)) from None
        except GuestImageError as exc:
            raise HostError(ErrorCode.INTERNAL_ERROR, str(exc)) from None
        with self._op():
            if workload is not None and workload not in WORKLOADS:
                raise HostError(ErrorCode.INVALID_PARAMS, f"unknown workload {workload!r}")
            view = self.inv.vm_create(name, memory_bytes=memory_bytes, host=self.name,
                                      runtime=VmRuntime(runtime))
            self._vms.pop(name, None)
            proc = VmProcess(self.config.run_dir, name)
            spec = {**({} if workload is None else {"workload": workload}), **runtime_spec}
            if spec:
                proc.write_spec(spec)
            else:
                proc.remove_spec()  # of an earlier VM of that name
            log_event(self.log, "vm_create", vm=name, memory_bytes=memory_bytes,
                      workload=workload)
            return view

    def vm_workload(self, name: str) -> str:
        """What VM ``name`` runs when started without a workload."""
        spec = self._vm_process(name).read_spec().get("workload")
        return spec if isinstance(spec, str) and spec in WORKLOADS \
            else self.config.vm_workload

    def vm_start(self, name: str, workload: str | None = None) -> VmView:
        with self._op():
            view = self._vm(name)
            if view.state not in (VmState.DEFINED, VmState.STOPPED, VmState.ERROR):
                raise HostError(ErrorCode.WRONG_STATE, f"VM {name!r} is {view.state.value}")
            info = self._prepare_vdisks(name)
            self.inv.vm_set_state(name, VmState.STARTING)
            proc = self._vm_process(name)
            vf: int | None = None
            try:
                pid = proc.spawn(memory_bytes=view.memory_bytes,
                                 workload=workload or self.vm_workload(name),
                                 extra_args=nbd_exports.spawn_args(proc))
                self.inv.vm_set_state(name, VmState.STARTING, pid=pid)
                vf = self._vf_assign(name, pid)
                self._mapping_load(name, vf)                     # claim A4
                wwpn = self._vport_ensure(name, info)             # claims A5, A6
                self._vport_bind(name, wwpn, vf)                  # claim A7
                info = self.inv.mapping_build(name)               # with the vport now
                self._fwtable_write(name, vf, info)               # claim A8
                proc.go()
                proc.wait_event("vm_connected", after=proc.boot_offset, timeout=30.0)
            except (HostError, InventoryError, VmProcessError, OSError) as exc:
                self._rollback_start(name, proc, vf, str(exc))
                if isinstance(exc, VmProcessError):
                    raise HostError(ErrorCode.INTERNAL_ERROR, str(exc)) from None
                raise
            view = self.inv.vm_set_state(name, VmState.RUNNING, pid=pid)
            log_event(self.log, "vm_started", vm=name, pid=pid, vf=vf)
            return view

    def _rollback_start(self, name: str, proc: VmProcess, vf: int | None, why: str) -> None:
        log_event(self.log, "vm_start_failed", level=logging.ERROR, vm=name, error=why)
        proc.stop()
        if vf is not None:
            self._vf_release(name, vf)
        with contextlib.suppress(InventoryError):
            self.inv.vm_set_state(name, VmState.ERROR)

    def _prepare_vdisks(self, vm: str) -> MappingInfo:
        """A VF maps only fully allocated vdisks: thin ones are inflated first."""
        for disk in self.inv.vdisk_list(vm=vm):
            if not disk.fully_allocated:
                self.inv.vdisk_inflate(disk.id)
        return self.mapping_build(vm)

    def _vf_assign(self, vm: str, pid: int) -> int:
        """The VF for the VM process: the lowest IDLE VF no VM of the inventory holds."""
        held = {int(a.vf) for a in self.inv.vf_list(host=self.name)}
        vfs = self._pf("vf_list", lambda pf: pf.vf_list())
        free = [int(v["vf"]) for v in vfs if v["state"] == "IDLE" and int(v["vf"]) not in held]
        if not free:
            raise HostError(ErrorCode.RESOURCE_EXHAUSTED,
                            f"VM {vm!r}: no free VF on host {self.name!r}")
        vf = free[0]
        self._pf("vf_assign", lambda pf: pf.vf_assign(vf, vm, pid))
        try:
            self.inv.vf_assign(self.name, vf, vm)
        except InventoryError:
            self._pf("vf_reset", lambda pf: pf.vf_reset(vf))
            raise
        log_event(self.log, "vf_assign", vm=vm, vf=vf, pid=pid)
        return vf

    def _vf_release(self, vm: str, vf: int) -> None:
        with contextlib.suppress(HostError):
            self._pf("vf_reset", lambda pf: pf.vf_reset(vf))
        with contextlib.suppress(InventoryError):
            self.inv.vf_release(self.name, vf)

    def _mapping_load(self, vm: str, vf: int) -> dict[str, Any]:
        # claim A4: a copy of the VM's mapping info goes to its VF, through the PF
        table = self.inv.vm_mapping_table(vm)
        if table["luns"]:
            result: dict[str, Any] = self._pf(
                "mapping_load", lambda pf: pf.mapping_load(vf, table))
        else:
            result = self._pf("mapping_unload", lambda pf: pf.mapping_unload(vf))
        self._event("mapping_load", "A4", vm=vm, vf=vf, luns=len(table["luns"]),
                    mapping_generation=result.get("mapping_generation"))
        return table

    def _vport_ensure(self, vm: str, info: MappingInfo) -> str:
        """Claims A5 and A6: the VM's vport (made if it has none) exists in the adapter,
        is zoned with the arrays' target ports and has the backing LUNs masked to it."""
        view = self.inv.vm_get(vm)
        if view.vport is None:
            # claim A5: the hypervisor creates the virtual port (inventory event A5)
            port = self.inv.vport_create(host=self.name)
            log_event(self.log, "vport_create", claim="A5", vm=vm, vport=port.wwpn.canonical())
            # claim A6: associated with the VM's mapping info (inventory event A6)
            port = self.inv.vport_associate(port.wwpn, vm)
            log_event(self.log, "vport_associate", claim="A6", vm=vm,
                      vport=port.wwpn.canonical())
        else:
            port = self.inv.vport_get(view.vport)
        wwpn = port.wwpn.canonical()
        existing = {v["wwpn"] for v in self._pf("adapter_dump",
                                                lambda pf: pf.adapter_dump()).get("vports", [])}
        if wwpn not in existing:
            self._pf("vport_create", lambda pf: pf.vport_create(
                port.wwpn, port.wwnn, alternate_wwpn=port.alternate_wwpn))
        self._mask(vm, wwpn, info)
        return wwpn

    def _mask(self, vm: str, wwpn: str, info: MappingInfo) -> None:
        """Claim A5: the fabric masks the VM's backing physical LUNs to its vport."""
        port = self.inv.vport_get(wwpn)
        by_array: dict[Wwn, list[int]] = {}
        for key in info.physical_luns():
            by_array.setdefault(key.array, []).append(int(key.lun))
        zone = f"vm-{vm}"
        members: list[Wwn] = list(port.port_names())
        for array in by_array:
            members += list(self.inv.array_get(array).target_ports)

        def zone_it(pf: PfClient) -> None:
            try:
                pf.fabric_zone_create(zone, members)
            except PfError as exc:
                # the zone of an earlier start, or of a vdisk attached since: add to it
                if "exists" not in exc.message:
                    raise
                pf.fabric_zone_member_add(zone, members)
        self._pf("fabric_zone", zone_it)
        for array, luns in by_array.items():
            for name in port.port_names():
                self._pf("fabric_mask_grant",
                         lambda pf, n=name, a=array, u=luns: pf.fabric_mask_grant(n, a, u))
        self._event("fabric_mask_grant", "A5", vm=vm, vport=wwpn, zone=zone,
                    luns={a.canonical(): u for a, u in by_array.items()})

    def vport_create(self, wwpn: str | None, wwnn: str | None, alternate_wwpn: str | None,
                     vm: str | None) -> Any:
        """Claim A5 ahead of a VM start (names given or made up); with ``vm``, claim A6
        too. The adapter learns of it when the VM starts."""
        with self._op():
            if vm is not None:
                self._vm(vm)
            port = self.inv.vport_create(host=self.name, vm=vm, wwpn=wwpn, wwnn=wwnn,
                                         alternate_wwpn=alternate_wwpn)
            log_event(self.log, "vport_create", claim="A5", vm=vm, vport=port.wwpn.canonical())
            return port

    def _vport_bind(self, vm: str, wwpn: str, vf: int) -> None:
        # claim A7: the vport is bound to the VF; the adapter logs it in (FDISC)
        result = self._pf("vport_bind", lambda pf: pf.vport_bind(wwpn, vf))
        self._event("vport_bind", "A7", vm=vm, vport=wwpn, vf=vf,
                    nport_id=result.get("nport_id"), logged_in=result.get("logged_in"))

    def _fwtable_write(self, vm: str, vf: int, info: MappingInfo) -> FirmwareTable:
        """Claim A8: the virtual disk addresses (second mapping) into the VM's page 0."""
        sock = self._pf("vf_get", lambda pf: pf.vf_get(vf)).get("socket_path")
        port = info.vport
        if port is None:
            raise HostError(ErrorCode.WRONG_STATE, f"VM {vm!r} has no vport")
        proc = self._vm_process(vm)
        generation = 0
        old = proc.dir / "fwtable.json"
        if old.exists():
            with contextlib.suppress(ValueError, OSError):
                generation = int(json.loads(old.read_text()).get("generation", -1)) + 1
        disks = tuple(FwDisk(port.wwpn, int(e.address.target), e.address.lun, e.vdisk.id,
                             e.vdisk.capacity_blocks, e.vdisk.block_size, e.vdisk.serial,
                             e.vdisk.lu_wwn) for e in info.entries)
        table = FirmwareTable(vm, vm, sock, disks, generation=generation)
        content = {**table.dump(), "generation": generation}
        proc.write_fwtable(encode_fwtable(table), content)
        self._event("fwtable_write", "A8", vm=vm, vport=port.wwpn.canonical(),
                    generation=generation,
                    addresses=[[d.target, d.lun] for d in disks])
        return table

    def vm_pause(self, name: str) -> VmView:
        """Freeze the VM's process (SIGSTOP). Its VF stays assigned and connected; the
        requests it had in flight complete into its memory."""
        return self._pause_resume(name, VmState.RUNNING, VmState.PAUSED, signal.SIGSTOP)

    def vm_resume(self, name: str) -> VmView:
        return self._pause_resume(name, VmState.PAUSED, VmState.RUNNING, signal.SIGCONT)

    def _pause_resume(self, name: str, expect: VmState, to: VmState,
                      sig: signal.Signals) -> VmView:
        with self._op():
            view = self._vm(name)
            if view.state is not expect:
                raise HostError(ErrorCode.WRONG_STATE,
                                f"VM {name!r} is {view.state.value}, not {expect.value}")
            proc = self._vm_process(name)
            if proc.pid is None:
                proc.pid = view.pid
            try:
                proc.send_signal(sig)
            except VmProcessError as exc:
                raise HostError(ErrorCode.WRONG_STATE, str(exc)) from None
            view = self.inv.vm_set_state(name, to, expect=expect)
            log_event(self.log, f"vm_{'paused' if to is VmState.PAUSED else 'resumed'}",
                      vm=name)
            return view

    def vm_stop(self, name: str) -> VmView:
        with self._op():
            view = self._vm(name)
            if view.state not in (*_LIVE, VmState.ERROR):
                raise HostError(ErrorCode.WRONG_STATE, f"VM {name!r} is {view.state.value}")
            proc = self._vm_process(name)
            if proc.pid is None and view.pid is not None:
                proc.pid = view.pid
            if view.state is VmState.PAUSED:
                with contextlib.suppress(VmProcessError, OSError):
                    proc.send_signal(signal.SIGCONT)  # so that it can handle SIGTERM
            proc.stop()
            self._teardown(name, view)
            view = self.inv.vm_set_state(name, VmState.STOPPED)
            log_event(self.log, "vm_stopped", vm=name)
            return view

    def _teardown(self, name: str, view: VmView) -> None:
        if view.vf is not None:
            vf = int(view.vf)
            with contextlib.suppress(HostError):
                self._pf("vf_unassign", lambda pf: pf.vf_unassign(vf))
            self._vf_release(name, vf)
        if view.vport is not None:
            wwpn = view.vport.canonical()
            with contextlib.suppress(HostError):
                self._pf("vport_logout", lambda pf: pf.vport_logout(wwpn))

    def vm_delete(self, name: str) -> None:
        with self._op():
            view = self._vm(name)
            if view.state in _LIVE:
                raise HostError(ErrorCode.WRONG_STATE,
                                f"VM {name!r} is {view.state.value}; stop it first")
            for disk in self.inv.vdisk_list(vm=name):
                self.inv.vdisk_detach(disk.id)
            if view.vport is not None:
                wwpn = view.vport.canonical()
                self.inv.vport_dissociate(wwpn)
                self.inv.vport_delete(wwpn)
                with contextlib.suppress(HostError):
                    self._pf("vport_delete", lambda pf: pf.vport_delete(wwpn))
            self.inv.vm_delete(name)
            self._vm_process(name).remove_spec()
            self._vms.pop(name, None)
            log_event(self.log, "vm_delete", vm=name)

    def vm_console(self, name: str) -> str:
        self.inv.vm_get(name)
        return self._vm_process(name).read_console()

    def vm_show(self, name: str) -> dict[str, Any]:
        view = self.inv.vm_get(name)
        table = None
        if view.vf is not None and view.host == self.name:
            vf = int(view.vf)
            table = self._pf("mapping_get", lambda pf: pf.mapping_get(vf))
        try:
            inventory_table: Any = self.inv.vm_mapping_table(name)
        except InventoryError:
            inventory_table = None
        fw = self._vm_process(name).dir / "fwtable.json"
        return {"vm": view, "workload": self.vm_workload(name),
                "vf_mapping": table, "inventory_mapping": inventory_table,
                "fwtable": json.loads(fw.read_text()) if fw.exists() else None,
                "disks": self.inv.vdisk_list(vm=name),
                "migrations": self.inv.migration_list(vm=name, limit=20),
                "exports": nbd_exports.list_exports(self._vm_process(name)),
                "qemu": proc.runtime_info() if isinstance(
                    proc := self._vm_process(name), qemu_vms.QemuVmProcess) else None}

    # -- NBD exports (docs/nbd.md; the logic is in host/exports.py) ------------------

    def vm_export(self, name: str, disk: str, *, unix: str | None = None,
                  port: int | None = None, remove: bool = False) -> Any:
        """Export ``disk`` of VM ``name`` over NBD (or stop exporting it: ``remove``)."""
        with self._op():
            view = self.inv.vm_get(name)
            if view.state not in (VmState.RUNNING, VmState.DEFINED, VmState.STOPPED,
                                  VmState.ERROR) or view.host not in (None, self.name):
                raise HostError(ErrorCode.WRONG_STATE, f"VM {name!r} is {view.state.value}"
                                f"{'' if view.host in (None, self.name) else ' elsewhere'}")
            proc, running = self._vm_process(name), view.state == VmState.RUNNING
            try:
                if remove:
                    return nbd_exports.remove_export(proc, disk, running=running)
                return nbd_exports.add_export(proc, disk, unix=unix, port=port,
                                              running=running)
            except nbd_exports.ExportError as exc:
                raise HostError(exc.code, str(exc)) from None

    # -- live migration (SYSTEM.md 5) -------------------------------------------------

    def vm_migrate(self, name: str, to: str, *, max_downtime_ms: int = 300,
                   drain_timeout_ms: int = 1000, max_rounds: int = 30) -> dict[str, Any]:
        """Start migrating running VM ``name`` to host ``to``; returns the migration's
        id and progress at once (the phases run on a thread of this host)."""
        with self._op():
            view = self._vm(name)
            if view.state is not VmState.RUNNING:
                raise HostError(ErrorCode.WRONG_STATE,
                                f"VM {name!r} is {view.state.value}; only a running VM "
                                f"migrates")
            if view.runtime is VmRuntime.QEMU:  # docs/qemu-guest.md
                raise HostError(ErrorCode.WRONG_STATE,
                                f"VM {name!r} is a QEMU VM; only Python VMs migrate")
            if to == self.name:
                raise HostError(ErrorCode.INVALID_PARAMS, f"VM {name!r} is on {to!r} already")
            dest = self.inv.host_get(to)
            if dest.state.value != "up":
                raise HostError(ErrorCode.WRONG_STATE, f"host {to!r} is {dest.state.value}")
            for mig in self._migrations.values():
                if mig.vm == name and not mig.progress.done:
                    raise HostError(ErrorCode.WRONG_STATE,
                                    f"VM {name!r} is migrating ({mig.ident})")
            options = MigrateOptions(max_downtime_ms=max_downtime_ms,
                                     drain_timeout_ms=drain_timeout_ms, max_rounds=max_rounds)
            ident = f"mig-{secrets.token_hex(5)}"
            self.inv.vm_set_state(name, VmState.MIGRATING, expect=VmState.RUNNING)
            try:
                self.inv.migration_begin(ident, name, source=self.name, destination=to)
            except InventoryError:
                self.inv.vm_set_state(name, VmState.RUNNING)
                raise
            migration = SourceMigration(self, ident, name, to, options)
            self._migrations[ident] = migration
            migration.start()
            log_event(self.log, "migration_start", migration=ident, vm=name, to=to,
                      max_downtime_ms=max_downtime_ms, drain_timeout_ms=drain_timeout_ms)
            return {"migration": ident, "vm": name, "source": self.name, "destination": to,
                    "progress": migration.progress.dump()}

    def migration_show(self, ident: str) -> dict[str, Any]:
        """A migration's record; while this host runs it, with its live progress."""
        live = self._migrations.get(ident)
        # progress first: once it says done, the record read after it is final
        progress = None if live is None else live.progress.dump()
        view = self.inv.migration_get(ident)
        return {"migration": view, "progress": progress}

    def migration_incoming(self, ident: str, vm: str, source: str,
                           source_port_name: str) -> dict[str, Any]:
        """The destination's half of prepare: check, reserve a VF, log the vport's free
        port name in (X3), listen for the stream."""
        with self._op():
            for inc in self._incoming.values():
                if inc.vm == vm and not inc.done.is_set():
                    raise HostError(ErrorCode.WRONG_STATE,
                                    f"VM {vm!r} is being received already ({inc.ident})")
            incoming = IncomingMigration(self, ident, vm, source=source,
                                         source_port_name=source_port_name,
                                         options=MigrateOptions())
            try:
                answer = incoming.prepare(self.config.migration_address)
            except MigrationFailed as exc:
                raise HostError(ErrorCode.WRONG_STATE, str(exc)) from None
            self._incoming[ident] = incoming
            log_event(self.log, "migration_incoming", migration=ident, vm=vm, source=source,
                      vf=answer.get("vf"), vport=incoming.wwpn)
            return answer

    # the parts of a VM start a migration destination uses (claim B7)

    def vm_process(self, name: str) -> VmProcess:
        return self._vm_process(name)

    def pf_call(self, what: str, fn: Any) -> Any:
        return self._pf(what, fn)

    def event(self, kind: str, claim: str | None, *, vm: str | None = None,
              vport: str | None = None, **detail: Any) -> None:
        self._event(kind, claim, vm=vm, vport=vport, **detail)

    def peer(self, api_address: str) -> Any:
        """A client of another host's API (its Unix socket on this machine)."""
        return HostClient(api_address, timeout=60.0)

    def check_luns_reachable(self, vm: str) -> None:
        """Every array the VM's vdisks live on is attached to this host's adapter."""
        info = self.inv.mapping_build(vm)
        dump = self._pf("adapter_dump", lambda pf: pf.adapter_dump())
        attached = {str(a.get("wwn")) for a in dump.get("arrays", [])}
        for key in info.physical_luns():
            if key.array.canonical() not in attached:
                raise HostError(ErrorCode.WRONG_STATE,
                                f"host {self.name!r} does not reach array "
                                f"{key.array.canonical()} (LUN {int(key.lun)})")

    def reserve_vf(self, vm: str) -> int:
        """A free VF of this host, recorded for ``vm`` in the inventory (assigned to the
        VM process once it exists)."""
        held = {int(a.vf) for a in self.inv.vf_list(host=self.name)}
        vfs = self._pf("vf_list", lambda pf: pf.vf_list())
        free = [int(v["vf"]) for v in vfs if v["state"] == "IDLE" and int(v["vf"]) not in held]
        if not free:
            raise HostError(ErrorCode.RESOURCE_EXHAUSTED,
                            f"VM {vm!r}: no free VF on host {self.name!r}")
        self.inv.vf_assign(self.name, free[0], vm)
        return free[0]

    def ensure_vport(self, port: Any) -> None:
        """The vport exists in this host's adapter."""
        wwpn = port.wwpn.canonical()
        existing = {v["wwpn"] for v in self._pf("adapter_dump",
                                                lambda pf: pf.adapter_dump()).get("vports", [])}
        if wwpn not in existing:
            self._pf("vport_create", lambda pf: pf.vport_create(
                port.wwpn, port.wwnn, alternate_wwpn=port.alternate_wwpn))

    def load_mapping(self, vm: str, vf: int) -> None:
        self._mapping_load(vm, vf)

    def write_fwtable(self, vm: str, vf: int) -> None:
        self._fwtable_write(vm, vf, self.inv.mapping_build(vm))

    # -- shutdown and reconciliation -------------------------------------------------

    def shutdown_vms(self, migration_wait_s: float = 60.0) -> None:
        """Stop this host's VMs; migrations under way finish (commit or abort) first, so
        that no VM process of theirs is left behind on either host."""
        deadline = time.monotonic() + migration_wait_s
        for migration in list(self._migrations.values()):
            migration.thread.join(max(0.0, deadline - time.monotonic()))
        for incoming in list(self._incoming.values()):
            incoming.done.wait(max(0.0, deadline - time.monotonic()))
        for view in self.inv.vm_list(host=self.name):
            if view.state in _LIVE:
                with contextlib.suppress(Exception):
                    self.vm_stop(view.name)

    def reconcile(self) -> dict[str, Any]:
        """Make the adapter agree with the inventory (after a host restart, the adapter
        kept running or not): VFs enabled, arrays attached, every live VM's VF assigned,
        vport bound and mapping loaded as recorded; VMs whose process is gone stopped,
        their VFs released; VF assignments the inventory does not know reset."""
        with self._op():
            report: dict[str, Any] = {"vfs_enabled": None, "vms_kept": [],
                                      "vms_stopped": [], "mappings_reloaded": [],
                                      "vfs_reset": []}
            ident = self._pf("adapter_identify", lambda pf: pf.adapter_identify())
            if int(ident.get("vfs_enabled", 0)) < self.config.vfs:
                count = min(self.config.vfs, int(ident.get("max_vfs", self.config.vfs)))
                self._pf("vf_enable", lambda pf: pf.vf_enable(count))
            report["vfs_enabled"] = self._pf(
                "adapter_identify", lambda pf: pf.adapter_identify()).get("vfs_enabled")
            for array in self.inv.array_list():
                directory = array.directory
                with contextlib.suppress(HostError):
                    self._pf("array_attach", lambda pf, d=directory: pf.array_attach(d))
            # what incoming migrations that died with this host's last run left
            report["incoming_reclaimed"] = reclaim_incoming(self)
            vfs = {int(v["vf"]): v for v in self._pf("vf_list", lambda pf: pf.vf_list())}
            known: set[int] = set()
            for view in self.inv.vm_list(host=self.name):
                if view.state not in _LIVE:
                    continue
                if view.pid is None or not is_vm_process(view.pid, view.name):
                    self._teardown(view.name, view)
                    self.inv.vm_set_state(view.name, VmState.STOPPED)
                    report["vms_stopped"].append(view.name)
                    log_event(self.log, "reconcile_vm_gone", vm=view.name, pid=view.pid)
                    continue
                proc = self._vm_process(view.name)
                proc.pid = view.pid
                if view.vf is None:
                    continue
                vf = int(view.vf)
                known.add(vf)
                self._reconcile_vf(view, vf, vfs.get(vf), report)
                report["vms_kept"].append(view.name)
            for vf, v in vfs.items():
                if vf not in known and v["state"] not in ("DISABLED", "IDLE"):
                    self._pf("vf_reset", lambda pf, i=vf: pf.vf_reset(i))
                    report["vfs_reset"].append(vf)
            log_event(self.log, "reconcile", **report)
            self.inv.event_append("reconcile", host=self.name, detail=report)
            return report

    def _reconcile_vf(self, view: VmView, vf: int, state: dict[str, Any] | None,
                      report: dict[str, Any]) -> None:
        name, pid = view.name, view.pid
        assert pid is not None
        vm = (state or {}).get("vm") or {}
        if state is None or vm.get("pid") != pid:
            if state is not None and state["state"] != "IDLE":
                self._pf("vf_reset", lambda pf: pf.vf_reset(vf))
            self._pf("vf_assign", lambda pf: pf.vf_assign(vf, name, pid))
        table = self.inv.vm_mapping_table(name)
        have = self._pf("mapping_get", lambda pf: pf.mapping_get(vf))
        if have != table:
            self._mapping_load(name, vf)
            report["mappings_reloaded"].append(name)
        if view.vport is not None:
            wwpn = view.vport.canonical()
            info = self.inv.mapping_build(name)
            bound = self._pf("vf_get", lambda pf: pf.vf_get(vf)).get("vport")
            if bound != wwpn:
                self._vport_ensure(name, info)
                self._vport_bind(name, wwpn, vf)


def parse_wwn(text: str, what: str) -> str:
    try:
        return Wwn.parse(text).canonical()
    except WwnError as exc:
        raise HostError(ErrorCode.INVALID_PARAMS, f"{what}: {exc}") from None


__all__ = ["HostConfig", "HostError", "HostService", "parse_wwn"]
