"""The adapter model: the PF admin command set applied to the adapter's state.

Rules of this module:

* :meth:`AdapterModel.call` is the PF's one entry: method name, by-name parameters and
  the number of file descriptors in; a :class:`Reply` or an
  :class:`~vfdirect.core.rpc.RpcError` with a stable code out. Nothing else escapes it: an
  unexpected exception is a bug, reported to ``on_internal_error`` and answered
  ``INTERNAL_ERROR`` (the h11 fuzzing invariant, for the control plane);
* the whole state is one immutable :class:`AdapterState`; a method checks everything
  first, then asks the platform for its side effects (fabric logins, array files, data
  path), then publishes the new state in one assignment. A refused method changes
  nothing; a reader (the VF data path's threads) always sees a consistent snapshot;
* a VF's state changes only through :meth:`~.vf.VfRecord.apply` (the transition table);
* vport <-> VF binding is kept consistent on both sides: ``vport.vf == i`` exactly when
  ``vfs[i].vport == vport.wwpn``;
* not thread-safe for writers: the shell serializes :meth:`call` and :meth:`vf_event`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from vfdirect.core.adapter.mapping import MappingError, MappingTable
from vfdirect.core.adapter.methods import (
    MAX_BUFFERS,
    MAX_FDS,
    METHODS,
    PROTOCOL_VERSION,
    validate,
)
from vfdirect.core.adapter.platform import AdapterPlatform, FabricPort, VfDataPath
from vfdirect.core.adapter.scsi_view import build_targets, empty_target
from vfdirect.core.adapter.vf import VfEvent, VfRecord, VfState, VmRef
from vfdirect.core.adapter.vport import VportLogin, VportRecord
from vfdirect.core.array import dump_field, parse_wwn
from vfdirect.core.fabric.errors import FabricError
from vfdirect.core.fabric.logins import nport_id_text
from vfdirect.core.ids import TargetId, VfIndex
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.scsi import Status, Target
from vfdirect.core.wwn import Wwn

STATE_FORMAT = "vfdirect.adapter-state"
STATE_VERSION = 1


@dataclass(frozen=True, slots=True)
class AdapterIdentity:
    vendor: str = "VFDIRECT"
    model: str = "VFD-SRIOV-FC"
    version: str = "0"

    def dump(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "model": self.model, "version": self.version}


@dataclass(frozen=True, slots=True)
class ArrayRef:
    wwn: Wwn
    path: str

    def dump(self) -> dict[str, Any]:
        return {"wwn": self.wwn.canonical(), "path": self.path}


@dataclass(frozen=True, slots=True)
class AdapterState:
    """Everything the PF configured, as one immutable value."""

    max_vfs: int
    vfs: tuple[VfRecord, ...]
    #: by primary WWPN; never mutated after construction
    vports: Mapping[Wwn, VportRecord] = field(default_factory=dict)
    arrays: tuple[ArrayRef, ...] = ()
    #: attached IO buffers: id -> size in bytes
    buffers: Mapping[int, int] = field(default_factory=dict)
    next_buffer: int = 1

    @classmethod
    def initial(cls, max_vfs: int) -> AdapterState:
        return cls(max_vfs, tuple(VfRecord(VfIndex(i)) for i in range(max_vfs)))

    @property
    def vfs_enabled(self) -> int:
        return sum(1 for v in self.vfs if v.state is not VfState.DISABLED)

    def dump(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "max_vfs": self.max_vfs,
            "arrays": [a.dump() for a in self.arrays],
            "vfs": [v.dump() for v in self.vfs],
            "vports": [self.vports[w].dump() for w in sorted(self.vports)],
            "buffers": [{"buffer": b, "size": s} for b, s in sorted(self.buffers.items())],
            "next_buffer": self.next_buffer,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> AdapterState:
        """Rebuild from :meth:`dump`, checking every record and the cross references."""
        err = MappingError
        if dump_field(data, "format", str, err) != STATE_FORMAT:
            raise err(f"not a {STATE_FORMAT} dump")
        if dump_field(data, "version", int, err) != STATE_VERSION:
            raise err(f"unsupported {STATE_FORMAT} version")
        max_vfs = dump_field(data, "max_vfs", int, err)
        vfs = []
        for i, item in enumerate(dump_field(data, "vfs", list, err)):
            if not isinstance(item, Mapping):
                raise err(f"vfs[{i}] must be an object")
            vf = VfRecord.load(item)
            if vf.index != i:
                raise err(f"vfs[{i}] is VF {vf.index}")
            vfs.append(vf)
        if len(vfs) != max_vfs:
            raise err(f"{len(vfs)} VF records for {max_vfs} VFs")
        vports: dict[Wwn, VportRecord] = {}
        for item in dump_field(data, "vports", list, err):
            if not isinstance(item, Mapping):
                raise err("a vport must be an object")
            vp = VportRecord.load(item)
            if vp.wwpn in vports:
                raise err(f"vport {vp.wwpn} appears twice")
            vports[vp.wwpn] = vp
        arrays = []
        for item in dump_field(data, "arrays", list, err):
            if not isinstance(item, Mapping):
                raise err("an array must be an object")
            arrays.append(ArrayRef(parse_wwn(dump_field(item, "wwn", str, err), "array", err),
                                   dump_field(item, "path", str, err)))
        buffers: dict[int, int] = {}
        for item in dump_field(data, "buffers", list, err):
            if not isinstance(item, Mapping):
                raise err("a buffer must be an object")
            buffers[dump_field(item, "buffer", int, err)] = dump_field(item, "size", int, err)
        state = cls(max_vfs, tuple(vfs), vports, tuple(arrays), buffers,
                    dump_field(data, "next_buffer", int, err))
        bad = state.violations()
        if bad:
            raise err(bad[0])
        return state

    def initiator_of(self, index: int) -> Wwn | None:
        """The port name VF ``index``'s IO goes out with: its bound vport's login."""
        wwpn = self.vfs[index].vport
        vp = None if wwpn is None else self.vports.get(wwpn)
        return None if vp is None or vp.login is None else vp.login.port_name

    def violations(self) -> list[str]:
        """Broken cross references (empty for every state the model reaches)."""
        bad: list[str] = []
        for vp in self.vports.values():
            if vp.vf is not None:
                if not 0 <= vp.vf < self.max_vfs:
                    bad.append(f"vport {vp.wwpn} is bound to VF {vp.vf}, which does not exist")
                elif self.vfs[vp.vf].vport != vp.wwpn:
                    bad.append(f"vport {vp.wwpn} is bound to VF {vp.vf}, which does not name it")
        for vf in self.vfs:
            if vf.vport is not None:
                bound = self.vports.get(vf.vport)
                if bound is None or bound.vf != vf.index:
                    bad.append(f"VF {vf.index} names vport {vf.vport}, which is not bound to it")
        names: dict[Wwn, Wwn] = {}
        for vp in self.vports.values():
            for name in vp.names():
                if name in names:
                    bad.append(f"port name {name} belongs to vports {names[name]} and {vp.wwpn}")
                names[name] = vp.wwpn
        if any(b >= self.next_buffer or b < 1 for b in self.buffers):
            bad.append("a buffer id at or above next_buffer")
        return bad


@dataclass(frozen=True, slots=True)
class Reply:
    """A method's result, and the file descriptors to send with it (owned by the caller
    once returned)."""

    result: Any
    fds: tuple[int, ...] = ()


def _refused(exc: FabricError) -> RpcError:
    return RpcError(ErrorCode.FABRIC_REFUSED, f"{type(exc).__name__}: {exc}")


class AdapterModel:
    """The PF of one adapter: its admin command set over an :class:`AdapterState`."""

    def __init__(
        self,
        platform: AdapterPlatform,
        *,
        max_vfs: int = 16,
        identity: AdapterIdentity | None = None,
        state: AdapterState | None = None,
        on_internal_error: Callable[[str, BaseException], None] | None = None,
    ) -> None:
        self._platform = platform
        self._identity = identity if identity is not None else AdapterIdentity()
        self._state = state if state is not None else AdapterState.initial(max_vfs)
        self._on_internal_error = on_internal_error
        self._requests: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._pf_io: Counter[str] = Counter()
        self._internal_errors = 0
        # pf_io_submit's SCSI targets, per VF, for (mapping generation, port name)
        self._targets: dict[int, tuple[tuple[int, Wwn], Mapping[TargetId, Target]]] = {}
        self._handlers: dict[str, Callable[[dict[str, Any], Sequence[int]], Any]] = {
            m.name: getattr(self, "_m_" + m.name) for m in METHODS
        }

    # -- reading ---------------------------------------------------------------------------

    @property
    def state(self) -> AdapterState:
        """The current snapshot (immutable; safe to read from any thread)."""
        return self._state

    @property
    def identity(self) -> AdapterIdentity:
        return self._identity

    @property
    def internal_errors(self) -> int:
        return self._internal_errors

    def vf(self, index: int) -> VfRecord:
        """The snapshot of VF ``index`` (the data path's configuration)."""
        return self._state.vfs[index]

    def dump(self) -> dict[str, Any]:
        return {**self._state.dump(), "identity": self._identity.dump()}

    # -- the one entry ---------------------------------------------------------------------

    def call(self, method: str, params: Mapping[str, Any], fds: Sequence[int] = ()) -> Reply:
        """Run one admin method; returns its :class:`Reply` or raises :class:`RpcError`."""
        self._requests[method if method in self._handlers else "(unknown)"] += 1
        try:
            _spec, parsed = validate(method, params, len(fds))
            out = self._handlers[method](parsed, fds)
        except RpcError as exc:
            self._errors[exc.code.name] += 1
            raise
        except FabricError as exc:
            self._errors[ErrorCode.FABRIC_REFUSED.name] += 1
            raise _refused(exc) from None
        except Exception as exc:
            self._internal_errors += 1
            self._errors[ErrorCode.INTERNAL_ERROR.name] += 1
            if self._on_internal_error is not None:
                self._on_internal_error(method, exc)
            raise RpcError(
                ErrorCode.INTERNAL_ERROR,
                f"{method}: internal error ({type(exc).__name__}); see the adapter log",
            ) from None
        return out if isinstance(out, Reply) else Reply(out)

    def vf_event(self, index: int, event: VfEvent, reason: str | None = None) -> VfRecord:
        """An event of the VF's data path (front end attached or gone, fault)."""
        if event not in (VfEvent.FRONTEND_CONNECT, VfEvent.FRONTEND_DISCONNECT, VfEvent.FAULT):
            raise ValueError(f"{event} is not a data path event")
        vf = self._vf(index)
        if event is VfEvent.FAULT and vf.state is VfState.ERROR:
            return vf  # the first fault's reason is the one worth keeping
        changes: dict[str, Any] = {}
        if event is VfEvent.FAULT:
            changes["error"] = reason or "data path fault"
        new = vf.apply(event, **changes)
        self._commit(vfs=[new])
        return new

    # -- internals -------------------------------------------------------------------------

    def _commit(
        self,
        *,
        vfs: Sequence[VfRecord] = (),
        vports: Sequence[VportRecord] = (),
        drop_vports: Sequence[Wwn] = (),
        **changes: Any,
    ) -> None:
        """Publish a new state in one assignment, then tell the data paths."""
        s = self._state
        new_vfs = list(s.vfs)
        for vf in vfs:
            new_vfs[vf.index] = vf
        new_vports = dict(s.vports)
        for vp in vports:
            new_vports[vp.wwpn] = vp
        for w in drop_vports:
            new_vports.pop(w, None)
        self._state = replace(s, vfs=tuple(new_vfs), vports=new_vports, **changes)
        for vf in vfs:
            self._targets.pop(vf.index, None)
            dp = self._platform.datapath(vf.index)
            if dp is not None:
                dp.configure(vf, self._state.initiator_of(vf.index))

    def _vf(self, index: int) -> VfRecord:
        if not 0 <= index < self._state.max_vfs:
            raise RpcError(ErrorCode.NOT_FOUND,
                           f"no VF {index} (the adapter has VFs 0..{self._state.max_vfs - 1})")
        return self._state.vfs[index]

    def _vport(self, wwpn: Wwn) -> VportRecord:
        vp = self._state.vports.get(wwpn)
        if vp is None:
            raise RpcError(ErrorCode.NOT_FOUND, f"no vport {wwpn}")
        return vp

    def _fabric(self) -> FabricPort:
        fabric = self._platform.fabric
        if fabric is None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           "no fabric attached: attach a storage array first (array_attach) "
                           "or start the adapter with --fabric-dir")
        return fabric

    def _datapath(self, vf: VfRecord, method: str) -> VfDataPath:
        dp = self._platform.datapath(vf.index)
        if dp is None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"VF {vf.index} has no running data path; {method} needs one")
        return dp

    def _vf_view(self, vf: VfRecord) -> dict[str, Any]:
        dp = self._platform.datapath(vf.index)
        assigned = vf.vm is not None
        return {
            "vf": int(vf.index),
            "state": vf.state.value,
            "vm": None if vf.vm is None else vf.vm.dump(),
            "vport": None if vf.vport is None else vf.vport.canonical(),
            "socket_path": self._platform.vf_socket_path(vf.index) if assigned else None,
            "mapping_luns": 0 if vf.mapping is None else len(vf.mapping),
            "mapping_generation": vf.mapping_generation,
            "error": vf.error,
            "outstanding": 0 if dp is None else dp.outstanding(),
        }

    def _release(self, vf: VfRecord) -> list[VportRecord]:
        """The vport records to update when ``vf`` loses its binding."""
        if vf.vport is None:
            return []
        vp = self._state.vports.get(vf.vport)
        return [] if vp is None else [replace(vp, vf=None)]

    # -- adapter ---------------------------------------------------------------------------

    def _m_adapter_identify(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        fabric = self._platform.fabric
        port: dict[str, Any] | None = None
        if fabric is not None:
            login = fabric.physical_login()
            port = {"wwpn": login.wwpn.canonical(), "wwnn": login.wwnn.canonical(),
                    "nport_id": nport_id_text(login.nport_id)}
        return {
            **self._identity.dump(),
            "protocol_version": PROTOCOL_VERSION,
            "max_vfs": self._state.max_vfs,
            "vfs_enabled": self._state.vfs_enabled,
            "physical_port": port,
            "fabric": fabric is not None,
            "methods": [m.name for m in METHODS],
        }

    def _m_adapter_get_stats(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vfs = []
        for vf in self._state.vfs:
            if vf.state is VfState.DISABLED:
                continue
            dp = self._platform.datapath(vf.index)
            vfs.append({"vf": int(vf.index), "state": vf.state.value,
                        "outstanding": 0 if dp is None else dp.outstanding(),
                        "io": None if dp is None else dict(dp.stats())})
        return {
            "requests": dict(sorted(self._requests.items())),
            "errors": dict(sorted(self._errors.items())),
            "pf_io": {k: self._pf_io[k] for k in
                      ("commands", "bytes_in", "bytes_out", "check_conditions")},
            "internal_errors": self._internal_errors,
            "vfs": vfs,
        }

    def _m_adapter_dump(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        return self.dump()

    def _m_array_attach(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        info = self._platform.array_attach(p["path"])
        arrays = self._state.arrays
        if all(a.wwn != info.wwn for a in arrays):
            self._commit(arrays=(*arrays, ArrayRef(info.wwn, info.path)))
        fabric = self._fabric()
        return {
            "wwn": info.wwn.canonical(),
            "target_ports": [w.canonical() for w in info.target_ports],
            "luns": [{"lun": int(lun.key.lun), "block_size": lun.block_size,
                      "num_blocks": lun.num_blocks} for lun in info.luns],
            "fabric_dir": fabric.directory,
        }

    # -- fabric ----------------------------------------------------------------------------

    def _m_fabric_zone_create(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        members = self._fabric().zone_create(p["name"], p["members"])
        return {"zone": p["name"], "members": sorted(w.canonical() for w in members)}

    def _m_fabric_zone_member_add(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        members = self._fabric().zone_member_add(p["name"], p["members"])
        return {"zone": p["name"], "members": sorted(w.canonical() for w in members)}

    def _m_fabric_mask_grant(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        # claim A5: the fabric masks the backing physical LUNs to the virtual port
        changed = self._fabric().mask_grant(p["initiator"], p["array"], p["luns"])
        return {"initiator": p["initiator"].canonical(), "array": p["array"].canonical(),
                "changed": sorted(changed)}

    def _m_fabric_mask_revoke(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        changed = self._fabric().mask_revoke(p["initiator"], p["array"], p["luns"])
        return {"initiator": p["initiator"].canonical(), "array": p["array"].canonical(),
                "changed": sorted(changed)}

    def _m_fabric_show(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        return self._fabric().show()

    # -- VFs -------------------------------------------------------------------------------

    def _m_vf_enable(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        count = p["count"]
        total = self._state.max_vfs
        if count > total:
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           f"vf_enable: count {count} exceeds the adapter's {total} VFs")
        changed = []
        for vf in self._state.vfs:
            if vf.index < count and vf.state is VfState.DISABLED:
                changed.append(vf.apply(VfEvent.ENABLE))
            elif vf.index >= count and vf.state is not VfState.DISABLED:
                changed.append(vf.apply(VfEvent.DISABLE))  # refuses all but IDLE
        self._commit(vfs=changed)
        return {"count": count, "vfs": [self._vf_view(v) for v in self._state.vfs]}

    def _m_vf_list(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        return {"vfs": [self._vf_view(v) for v in self._state.vfs]}

    def _m_vf_get(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        return self._vf_view(self._vf(p["vf"]))

    def _m_vf_assign(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        new = vf.apply(VfEvent.ASSIGN, vm=VmRef(p["vm_name"], p["vm_pid"]))
        self._commit(vfs=[new])
        return self._vf_view(new)

    def _drop_vf(self, vf: VfRecord, event: VfEvent) -> dict[str, Any]:
        """vf_unassign / vf_reset: back to IDLE without VM, mapping or vport."""
        new = vf.apply(
            event, vm=None, vport=None, mapping=None, error=None,
            mapping_generation=vf.mapping_generation + (vf.mapping is not None),
        )
        dp = self._platform.datapath(vf.index)
        if dp is not None:
            dp.reset()
        self._commit(vfs=[new], vports=self._release(vf))
        return self._vf_view(new)

    def _m_vf_unassign(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        return self._drop_vf(self._vf(p["vf"]), VfEvent.UNASSIGN)

    def _m_vf_reset(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        return self._drop_vf(self._vf(p["vf"]), VfEvent.RESET)

    # -- vports ----------------------------------------------------------------------------

    def _name_owner(self, name: Wwn) -> VportRecord | None:
        return next((v for v in self._state.vports.values() if name in v.names()), None)

    def _m_vport_create(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        wwpn: Wwn = p["wwpn"]
        alt: Wwn | None = p["alternate_wwpn"]
        if alt == wwpn:
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           "vport_create: alternate_wwpn must differ from wwpn")
        if p["wwnn"] in (wwpn, alt):
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           "vport_create: wwnn must differ from the port names")
        for name in (wwpn, alt):
            if name is None:
                continue
            owner = self._name_owner(name)
            if owner is not None:
                raise RpcError(ErrorCode.CONFLICT,
                               f"port name {name} already belongs to vport {owner.wwpn}")
            fabric = self._platform.fabric
            if fabric is not None and fabric.physical_login().wwpn == name:
                raise RpcError(ErrorCode.CONFLICT,
                               f"port name {name} is the adapter's physical port")
        vp = VportRecord(wwpn, p["wwnn"], alt)
        self._commit(vports=[vp])  # claim A5
        return vp.view()

    def _m_vport_delete(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vp = self._vport(p["wwpn"])
        if vp.vf is not None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"vport {vp.wwpn} is bound to VF {vp.vf}; vport_unbind first")
        if vp.login is not None:
            self._fabric().logo(vp.login.port_name)
        self._commit(drop_vports=[vp.wwpn])
        return {"wwpn": vp.wwpn.canonical()}

    def _login(self, vp: VportRecord, alternate: bool) -> VportRecord:
        """``vp`` logged in (FDISC) with the port name asked for."""
        if alternate and vp.alternate_wwpn is None:
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           f"vport_login: vport {vp.wwpn} has no alternate WWPN")
        name = vp.alternate_wwpn if alternate and vp.alternate_wwpn is not None else vp.wwpn
        if vp.login is not None:
            if vp.login.port_name == name:
                return vp
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"vport {vp.wwpn} is logged in as {vp.login.port_name}; "
                           "vport_logout first")
        login = self._fabric().fdisc(name, vp.wwnn)
        return replace(vp, login=VportLogin(name, login.nport_id))

    def _bound_vf(self, vp: VportRecord) -> list[VfRecord]:
        """The VF whose snapshot must be republished when ``vp`` changes (its initiator
        name, say); its state is unchanged."""
        if vp.vf is None:
            return []
        vf = self._state.vfs[vp.vf]
        return [replace(vf, generation=vf.generation + 1)]

    def _m_vport_login(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vp = self._vport(p["wwpn"])
        new = self._login(vp, p["alternate"])
        if new is not vp:
            self._commit(vports=[new], vfs=self._bound_vf(new))
        return new.view()

    def _m_vport_logout(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vp = self._vport(p["wwpn"])
        if vp.login is None:
            raise RpcError(ErrorCode.WRONG_STATE, f"vport {vp.wwpn} is not logged in")
        self._fabric().logo(vp.login.port_name)
        new = replace(vp, login=None)
        self._commit(vports=[new], vfs=self._bound_vf(new))
        return new.view()

    def _m_vport_bind(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vp = self._vport(p["wwpn"])
        vf = self._vf(p["vf"])
        new_vf = vf.apply(VfEvent.BIND, vport=vp.wwpn)
        if vp.vf is not None and vp.vf != vf.index:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"vport {vp.wwpn} is bound to VF {vp.vf}; vport_unbind first")
        if vf.vport is not None and vf.vport != vp.wwpn:
            raise RpcError(ErrorCode.CONFLICT, f"VF {vf.index} already has vport {vf.vport}")
        # claim A7: bind the vport to the VF, logging it in (FDISC) if it is not yet
        new_vp = replace(self._login(vp, alternate=False) if vp.login is None else vp,
                         vf=vf.index)
        self._commit(vfs=[new_vf], vports=[new_vp])
        return new_vp.view()

    def _m_vport_unbind(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vp = self._vport(p["wwpn"])
        if vp.vf is None:
            raise RpcError(ErrorCode.WRONG_STATE, f"vport {vp.wwpn} is not bound to a VF")
        new_vf = self._state.vfs[vp.vf].apply(VfEvent.UNBIND, vport=None)
        new_vp = replace(vp, vf=None)
        self._commit(vfs=[new_vf], vports=[new_vp])
        return new_vp.view()

    # -- mapping ---------------------------------------------------------------------------

    def _check_placement(self, table: MappingTable) -> None:
        """Every extent lies on a LUN of an attached array, inside it, same block size."""
        for i, entry in enumerate(table.entries):
            for placement in entry.layout.placements:
                ext = placement.extent
                lun = self._platform.lun_geometry(ext.lun)
                where = f"mapping_load: luns[{i}] (vdisk {entry.vdisk_id!r})"
                if lun is None:
                    raise RpcError(ErrorCode.NOT_FOUND,
                                   f"{where} lies on LUN {ext.lun}, which is on no attached "
                                   "array (array_attach it first)")
                if lun.block_size != entry.block_size:
                    raise RpcError(ErrorCode.INVALID_PARAMS,
                                   f"{where} has {entry.block_size}-byte blocks, LUN {ext.lun} "
                                   f"{lun.block_size}-byte ones")
                if ext.end > lun.num_blocks:
                    raise RpcError(ErrorCode.INVALID_PARAMS,
                                   f"{where}: extent {ext} runs past the {lun.num_blocks} "
                                   f"blocks of LUN {ext.lun}")

    def _m_mapping_load(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        vf.apply(VfEvent.MAPPING_LOAD)  # state check before the (longer) table checks
        try:
            table = MappingTable.load(p["mapping"])
        except MappingError as exc:
            raise RpcError(ErrorCode.INVALID_PARAMS, f"mapping_load: mapping: {exc}") from None
        self._check_placement(table)
        # claim A4: the VF's copy of the mapping info, received through the PF
        new = vf.apply(VfEvent.MAPPING_LOAD, mapping=table,
                       mapping_generation=vf.mapping_generation + 1)
        self._commit(vfs=[new])
        return {"vf": int(new.index), "luns": len(table),
                "mapping_generation": new.mapping_generation}

    def _m_mapping_unload(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        new = vf.apply(VfEvent.MAPPING_UNLOAD, mapping=None,
                       mapping_generation=vf.mapping_generation + (vf.mapping is not None))
        self._commit(vfs=[new])
        return {"vf": int(new.index), "mapping_generation": new.mapping_generation}

    def _m_mapping_get(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        return {"vf": int(vf.index),
                "mapping": None if vf.mapping is None else vf.mapping.dump()}

    # -- migration -------------------------------------------------------------------------

    def _m_vf_quiesce(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        new = vf.apply(VfEvent.QUIESCE)
        outstanding = self._datapath(vf, "vf_quiesce").quiesce()  # claim B1
        self._commit(vfs=[new])
        return {"vf": int(vf.index), "outstanding": outstanding}

    def _m_vf_drain(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        vf.apply(VfEvent.DRAIN)
        result = self._datapath(vf, "vf_drain").drain(p["timeout_ms"])  # claim B2
        return {"vf": int(vf.index), "drained": result.drained,
                "outstanding": list(result.outstanding)}

    def _m_vf_state_save(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        new = vf.apply(VfEvent.SAVE)
        dp = self._datapath(vf, "vf_state_save")
        left = dp.outstanding()
        if left:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"VF {vf.index} has {left} outstanding request(s); vf_drain until "
                           "drained before vf_state_save")
        saved = dp.save()  # claims B3, B4: queue state VF -> PF -> hypervisor
        if len(saved.fds) > MAX_FDS:
            raise RpcError(ErrorCode.INTERNAL_ERROR,
                           f"VF {vf.index} saved {len(saved.fds)} fds, over {MAX_FDS}")
        self._commit(vfs=[new])
        return Reply({"vf": int(vf.index), "state": dict(saved.record)}, tuple(saved.fds))

    def _m_vf_state_restore(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        new = vf.apply(VfEvent.RESTORE)
        self._datapath(vf, "vf_state_restore").restore(p["state"], fds)
        self._commit(vfs=[new])
        return self._vf_view(new)

    def _m_vf_resume(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vf = self._vf(p["vf"])
        new = vf.apply(VfEvent.RESUME)
        self._datapath(vf, "vf_resume").resume()
        self._commit(vfs=[new])
        return self._vf_view(new)

    # -- PF IO -----------------------------------------------------------------------------

    def _m_pf_io_buffer_attach(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        s = self._state
        if len(s.buffers) >= MAX_BUFFERS:
            raise RpcError(ErrorCode.RESOURCE_EXHAUSTED,
                           f"pf_io_buffer_attach: {MAX_BUFFERS} buffers are attached already")
        buffer_id = s.next_buffer
        size = self._platform.io_buffer_attach(buffer_id, fds[0])
        self._commit(buffers={**s.buffers, buffer_id: size}, next_buffer=buffer_id + 1)
        return {"buffer": buffer_id, "size": size}

    def _m_pf_io_buffer_detach(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        buffer_id = p["buffer"]
        if buffer_id not in self._state.buffers:
            raise RpcError(ErrorCode.NOT_FOUND, f"no IO buffer {buffer_id}")
        self._platform.io_buffer_detach(buffer_id)
        self._commit(buffers={b: s for b, s in self._state.buffers.items() if b != buffer_id})
        return {"buffer": buffer_id}

    def _io_targets(self, vf: VfRecord, initiator: Wwn) -> Mapping[TargetId, Target]:
        key = (vf.mapping_generation, initiator)
        cached = self._targets.get(vf.index)
        if cached is not None and cached[0] == key:
            return cached[1]
        targets = build_targets(
            vf.mapping,
            lambda entry: self._platform.block_device(initiator, entry.layout),
            on_internal_error=self._scsi_internal_error,
        )
        self._targets[vf.index] = (key, targets)
        return targets

    def _scsi_internal_error(self, exc: BaseException) -> None:
        self._internal_errors += 1
        if self._on_internal_error is not None:
            self._on_internal_error("pf_io_submit", exc)

    def _m_pf_io_submit(self, p: dict[str, Any], fds: Sequence[int]) -> Any:
        vp = self._vport(p["wwpn"])
        if vp.login is None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"vport {vp.wwpn} is not logged in; pf_io_submit needs a login")
        if vp.vf is None:
            raise RpcError(ErrorCode.WRONG_STATE,
                           f"vport {vp.wwpn} is bound to no VF; pf_io_submit uses the mapping "
                           "of the VF it is bound to")
        direction, sg, buffer_id = p["direction"], p["sg"], p["buffer"]
        if direction == "none" and sg:
            raise RpcError(ErrorCode.INVALID_PARAMS,
                           'pf_io_submit: direction "none" takes no scatter list')
        views: list[memoryview] = []
        if sg:
            if buffer_id == 0:
                raise RpcError(ErrorCode.INVALID_PARAMS,
                               "pf_io_submit: a scatter list needs a buffer")
            size = self._state.buffers.get(buffer_id)
            if size is None:
                raise RpcError(ErrorCode.NOT_FOUND, f"no IO buffer {buffer_id}")
            for off, length in sg:
                if off + length > size:
                    raise RpcError(ErrorCode.INVALID_PARAMS,
                                   f"pf_io_submit: segment [{off}, {off + length}) is outside "
                                   f"buffer {buffer_id} of {size} bytes")
            buf = self._platform.io_buffer(buffer_id)
            views = [buf[off:off + length] for off, length in sg]
        vf = self._state.vfs[vp.vf]
        targets = self._io_targets(vf, vp.login.port_name)
        target = targets.get(TargetId(p["target"]))
        if target is None:
            target = empty_target(self._scsi_internal_error)
        # claim B6: the PF transmits the request to physical storage (through the guard)
        if direction == "to_device":
            result = target.execute(p["lun"], p["cdb"], data_out=views)
        elif direction == "from_device":
            result = target.execute(p["lun"], p["cdb"], data_in=views)
        else:
            result = target.execute(p["lun"], p["cdb"])
        stats = self._pf_io
        stats["commands"] += 1
        stats["bytes_in"] += result.data_in_len
        stats["bytes_out"] += result.data_out_len
        if result.status == Status.CHECK_CONDITION:
            stats["check_conditions"] += 1
        return {"status": int(result.status), "sense": result.sense.hex(),
                "residual": result.residual,
                "data_len": result.data_in_len + result.data_out_len}
