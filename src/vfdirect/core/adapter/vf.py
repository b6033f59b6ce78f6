"""Virtual functions: their states, the transitions between them as a table, and the VF
record.

Rules of this module:

* a VF's lifecycle is :class:`VfState`; what may happen to it is :class:`VfEvent` (the
  admin methods that act on one VF, plus the data path's own events: front end attached
  or gone, fault). :data:`TRANSITIONS` says, for each event, from which states it is
  allowed and which state it leads to (``None``: the state does not change);
* :func:`transition` is the one function that applies the table; a refusal is
  ``RpcError(WRONG_STATE, "VF 3 is QUIESCED; vf_assign needs IDLE")``, naming both states
  as QEMU's QMP client does;
* :class:`VfRecord` is immutable: every change makes a new record with a new
  ``generation``, so the data path reads a consistent snapshot without a lock;
* :func:`invariant_violations` states what every reachable record satisfies (checked by
  the property tests and by :meth:`VfRecord.load`): a VF that is not assigned to a VM holds
  no mapping and no vport, an assigned one names its VM, only ERROR has a reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from vfdirect.core.adapter.mapping import MappingError, MappingTable
from vfdirect.core.array import dump_field, parse_wwn
from vfdirect.core.ids import VfIndex
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.wwn import Wwn


class VfState(StrEnum):
    DISABLED = "DISABLED"  #: not enabled (beyond NumVFs)
    IDLE = "IDLE"  #: enabled, not assigned to a VM
    ASSIGNED = "ASSIGNED"  #: assigned to a VM (name + pid); its front end is not attached
    CONNECTED = "CONNECTED"  #: the VM's front end is attached: the direct path runs
    QUIESCED = "QUIESCED"  #: fetching stopped (claim B1); may still have IO in flight
    SAVED = "SAVED"  #: queue state handed to the PF, DMA window revoked (claims B3, B4)
    ERROR = "ERROR"  #: the data path failed; vf_reset clears it


#: States of a VF that belongs to a VM.
ASSIGNED_STATES = frozenset(
    {VfState.ASSIGNED, VfState.CONNECTED, VfState.QUIESCED, VfState.SAVED}
)
#: States of an enabled VF.
ENABLED_STATES = frozenset(set(VfState) - {VfState.DISABLED})
_ORDER = {s: i for i, s in enumerate(VfState)}


class VfEvent(StrEnum):
    """What can happen to one VF: admin methods by their wire name, and data path events."""

    ENABLE = "vf_enable"
    DISABLE = "vf_disable"
    ASSIGN = "vf_assign"
    UNASSIGN = "vf_unassign"
    RESET = "vf_reset"
    MAPPING_LOAD = "mapping_load"
    MAPPING_UNLOAD = "mapping_unload"
    BIND = "vport_bind"
    UNBIND = "vport_unbind"
    QUIESCE = "vf_quiesce"
    DRAIN = "vf_drain"
    SAVE = "vf_state_save"
    RESTORE = "vf_state_restore"
    RESUME = "vf_resume"
    #: the data path: the VM's vhost-user front end attached its memory and rings
    FRONTEND_CONNECT = "frontend_connect"
    #: the data path: the front end closed its socket
    FRONTEND_DISCONNECT = "frontend_disconnect"
    #: the data path: an unrecoverable fault (a bad ring, a crashed worker)
    FAULT = "fault"


@dataclass(frozen=True, slots=True)
class Transition:
    sources: frozenset[VfState]
    #: the new state, or None when the event leaves the state as it is
    target: VfState | None


def _t(sources: set[VfState] | frozenset[VfState], target: VfState | None) -> Transition:
    return Transition(frozenset(sources), target)


_S = VfState
TRANSITIONS: Mapping[VfEvent, Transition] = {
    VfEvent.ENABLE: _t({_S.DISABLED}, _S.IDLE),
    VfEvent.DISABLE: _t({_S.IDLE}, _S.DISABLED),
    VfEvent.ASSIGN: _t({_S.IDLE}, _S.ASSIGNED),
    # claim X1 / commit: a saved VF is released; a quiesced or connected one too (the
    # data path detaches the front end first).
    VfEvent.UNASSIGN: _t(ASSIGNED_STATES, _S.IDLE),
    VfEvent.RESET: _t(ENABLED_STATES, _S.IDLE),
    # claim A4: the mapping reaches a VF that belongs to a VM (the destination of a
    # migration loads it while ASSIGNED, before the state is restored)
    VfEvent.MAPPING_LOAD: _t({_S.ASSIGNED, _S.CONNECTED}, None),
    VfEvent.MAPPING_UNLOAD: _t(ASSIGNED_STATES | {_S.ERROR}, None),
    # claim A7
    VfEvent.BIND: _t({_S.ASSIGNED, _S.CONNECTED}, None),
    VfEvent.UNBIND: _t(ASSIGNED_STATES | {_S.ERROR}, None),
    VfEvent.QUIESCE: _t({_S.CONNECTED}, _S.QUIESCED),  # claim B1
    # claim B2; on a SAVED VF (claim X2): wait for the stale executions it handed over
    VfEvent.DRAIN: _t({_S.QUIESCED, _S.SAVED}, None),
    VfEvent.SAVE: _t({_S.QUIESCED}, _S.SAVED),  # claims B3, B4
    VfEvent.RESTORE: _t({_S.ASSIGNED, _S.SAVED}, _S.QUIESCED),  # claims X1, B7
    VfEvent.RESUME: _t({_S.QUIESCED}, _S.CONNECTED),
    VfEvent.FRONTEND_CONNECT: _t({_S.ASSIGNED}, _S.CONNECTED),
    VfEvent.FRONTEND_DISCONNECT: _t({_S.CONNECTED, _S.QUIESCED}, _S.ASSIGNED),
    VfEvent.FAULT: _t(ENABLED_STATES, _S.ERROR),
}


def needs_text(sources: frozenset[VfState]) -> str:
    """``"IDLE"``, ``"ASSIGNED or CONNECTED"``: the states an event needs, in order."""
    names = [s.value for s in sorted(sources, key=_ORDER.__getitem__)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def transition(index: int, state: VfState, event: VfEvent) -> VfState:
    """The state after ``event``, or ``RpcError(WRONG_STATE)`` naming both states."""
    rule = TRANSITIONS[event]
    if state not in rule.sources:
        raise RpcError(
            ErrorCode.WRONG_STATE,
            f"VF {index} is {state.value}; {event.value} needs {needs_text(rule.sources)}",
        )
    return state if rule.target is None else rule.target


@dataclass(frozen=True, slots=True)
class VmRef:
    """The VM a VF is assigned to: only this process may connect to the VF's socket."""

    name: str
    pid: int

    def dump(self) -> dict[str, Any]:
        return {"name": self.name, "pid": self.pid}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> VmRef:
        err = MappingError
        return cls(dump_field(data, "name", str, err), dump_field(data, "pid", int, err))


@dataclass(frozen=True, slots=True)
class VfRecord:
    """One VF as the PF configured it (the data path's snapshot of it)."""

    index: VfIndex
    state: VfState = VfState.DISABLED
    vm: VmRef | None = None
    #: WWPN of the bound vport (the vport record says which name it is logged in with)
    vport: Wwn | None = None
    mapping: MappingTable | None = None
    #: bumped on every mapping_load / mapping_unload, so a cached translation is dropped
    mapping_generation: int = 0
    error: str | None = None
    #: bumped on every change of this record
    generation: int = 0

    def apply(self, event: VfEvent, **changes: Any) -> VfRecord:
        """The record after ``event`` (``RpcError`` if the state forbids it), with
        ``changes`` applied and the generation bumped."""
        state = transition(self.index, self.state, event)
        return replace(self, state=state, generation=self.generation + 1, **changes)

    def dump(self) -> dict[str, Any]:
        return {
            "vf": int(self.index),
            "state": self.state.value,
            "vm": None if self.vm is None else self.vm.dump(),
            "vport": None if self.vport is None else self.vport.canonical(),
            "mapping": None if self.mapping is None else self.mapping.dump(),
            "mapping_generation": self.mapping_generation,
            "error": self.error,
            "generation": self.generation,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> VfRecord:
        err = MappingError
        try:
            state = VfState(dump_field(data, "state", str, err))
        except ValueError as exc:
            raise err(f"VF state: {exc}") from None
        vm = data.get("vm")
        vport = data.get("vport")
        mapping = data.get("mapping")
        error = data.get("error")
        if error is not None and not isinstance(error, str):
            raise err(f"VF error must be a string or null, not {error!r}")
        if vm is not None and not isinstance(vm, Mapping):
            raise err(f"VF vm must be an object or null, not {vm!r}")
        if mapping is not None and not isinstance(mapping, Mapping):
            raise err(f"VF mapping must be an object or null, not {mapping!r}")
        record = cls(
            index=VfIndex(dump_field(data, "vf", int, err)),
            state=state,
            vm=None if vm is None else VmRef.load(vm),
            vport=None if vport is None else parse_wwn(vport, "VF vport", err),
            mapping=None if mapping is None else MappingTable.load(mapping),
            mapping_generation=dump_field(data, "mapping_generation", int, err),
            error=error,
            generation=dump_field(data, "generation", int, err),
        )
        bad = invariant_violations(record)
        if bad:
            raise err(f"VF {record.index}: {bad[0]}")
        return record


def invariant_violations(vf: VfRecord) -> list[str]:
    """What is wrong with ``vf`` (empty for every record the transitions can reach)."""
    bad: list[str] = []
    if vf.state in ASSIGNED_STATES and vf.vm is None:
        bad.append(f"{vf.state.value} without a VM")
    if vf.state in (VfState.DISABLED, VfState.IDLE):
        if vf.vm is not None:
            bad.append(f"{vf.state.value} but assigned to VM {vf.vm.name}")
        if vf.mapping is not None:
            bad.append(f"{vf.state.value} but holds a mapping")
        if vf.vport is not None:
            bad.append(f"{vf.state.value} but bound to vport {vf.vport}")
    if (vf.state is VfState.ERROR) != (vf.error is not None):
        bad.append("an error reason exactly when in ERROR")
    if vf.index < 0 or vf.generation < 0 or vf.mapping_generation < 0:
        bad.append("negative index or generation")
    return bad
