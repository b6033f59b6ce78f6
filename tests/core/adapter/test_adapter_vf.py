"""The VF state machine: the transition table and the function that applies it."""

from __future__ import annotations

import pytest
from adapter_fakes import rpc_error_of
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.adapter.vf import (
    ASSIGNED_STATES,
    TRANSITIONS,
    VfEvent,
    VfRecord,
    VfState,
    VmRef,
    invariant_violations,
    needs_text,
    transition,
)
from vfdirect.core.ids import VfIndex
from vfdirect.core.rpc import ErrorCode, RpcError


def test_refusal_names_both_states() -> None:
    with pytest.raises(RpcError) as info:
        transition(3, VfState.QUIESCED, VfEvent.ASSIGN)
    assert info.value.code is ErrorCode.WRONG_STATE
    assert info.value.message == "VF 3 is QUIESCED; vf_assign needs IDLE"


def test_needs_text_lists_states_in_lifecycle_order() -> None:
    assert needs_text(frozenset({VfState.CONNECTED, VfState.ASSIGNED})) == \
        "ASSIGNED or CONNECTED"
    assert needs_text(frozenset({VfState.SAVED, VfState.ASSIGNED, VfState.QUIESCED})) == \
        "ASSIGNED, QUIESCED or SAVED"


def test_every_event_has_a_rule() -> None:
    assert set(TRANSITIONS) == set(VfEvent)


def test_the_migration_path_is_in_the_table() -> None:
    s = VfState.ASSIGNED
    for event in (VfEvent.FRONTEND_CONNECT, VfEvent.QUIESCE, VfEvent.DRAIN, VfEvent.SAVE,
                  VfEvent.RESTORE, VfEvent.RESUME):
        s = transition(0, s, event)
    assert s is VfState.CONNECTED
    # the destination: a fresh ASSIGNED VF takes a saved state
    assert transition(0, VfState.ASSIGNED, VfEvent.RESTORE) is VfState.QUIESCED


def test_only_disable_reaches_disabled_and_reset_clears_error() -> None:
    into_disabled = {e for e, t in TRANSITIONS.items() if t.target is VfState.DISABLED}
    assert into_disabled == {VfEvent.DISABLE}
    assert transition(1, VfState.ERROR, VfEvent.RESET) is VfState.IDLE
    for event in VfEvent:
        if event is not VfEvent.RESET and event not in (VfEvent.UNBIND,
                                                        VfEvent.MAPPING_UNLOAD):
            rule = TRANSITIONS[event]
            assert VfState.ERROR not in rule.sources or event is VfEvent.FAULT, event


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(list(VfEvent)), max_size=40))
def test_apply_never_reaches_an_illegal_record(events: list[VfEvent]) -> None:
    """Drive one record with every event, carrying the changes the model makes."""
    vf = VfRecord(VfIndex(2))
    for event in events:
        changes: dict[str, object] = {}
        if event is VfEvent.ASSIGN:
            changes["vm"] = VmRef("vm", 7)
        elif event in (VfEvent.UNASSIGN, VfEvent.RESET):
            changes.update(vm=None, vport=None, mapping=None, error=None)
        elif event is VfEvent.FAULT:
            changes["error"] = "boom"
        if vf.state not in TRANSITIONS[event].sources:
            err = rpc_error_of(vf.apply, event, **changes)
            assert err is not None and err.code is ErrorCode.WRONG_STATE
            assert err.message.startswith(f"VF 2 is {vf.state.value}; {event.value} needs ")
            continue
        new = vf.apply(event, **changes)
        assert new.generation == vf.generation + 1
        assert invariant_violations(new) == [], (vf, event, new)
        if event is VfEvent.FAULT and vf.state in ASSIGNED_STATES:
            assert new.vm == vf.vm  # kept for inspection until vf_reset
        vf = new
        assert VfRecord.load(vf.dump()) == vf
