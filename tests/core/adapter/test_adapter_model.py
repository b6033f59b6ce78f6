"""The adapter model in-process, over the in-memory platform: the admin methods, PF IO
through the SCSI core and the fabric guard, the migration hooks, and the invariants under
random sequences of calls."""

from __future__ import annotations

from typing import Any

import pytest
from adapter_fakes import (
    ARRAY_PATH,
    ARRAY_WWN,
    FD_BUFFER,
    VPORT,
    VPORT2,
    VPORT2_NN,
    VPORT_ALT,
    VPORT_NN,
    FakeDataPath,
    MemoryPlatform,
    configured_model,
    datastore,
    entry,
    mapping,
    rpc_error_of,
    standard_mapping,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from vfdirect.core.adapter import AdapterModel, AdapterState, VfEvent, VfState
from vfdirect.core.adapter.methods import METHODS
from vfdirect.core.adapter.vf import invariant_violations
from vfdirect.core.fabric import Fabric
from vfdirect.core.ids import VdiskId
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.scsi import Status, decode_sense
from vfdirect.core.scsi.sense import (
    ACCESS_DENIED_NO_ACCESS_RIGHTS,
    LOGICAL_UNIT_NOT_SUPPORTED,
    SenseKey,
)


def call(model: AdapterModel, method: str, fds: tuple[int, ...] = (), **params: Any) -> Any:
    return model.call(method, params, fds).result


def refused(model: AdapterModel, method: str, **params: Any) -> RpcError:
    with pytest.raises(RpcError) as info:
        model.call(method, params)
    return info.value


def rw10(opcode: int, lba: int, blocks: int) -> str:
    return bytes([opcode, 0, *lba.to_bytes(4, "big"), 0, *blocks.to_bytes(2, "big"), 0]).hex()


# -- configuration ----------------------------------------------------------------------


def test_nothing_works_on_the_fabric_before_an_array_is_attached() -> None:
    model = AdapterModel(MemoryPlatform(), max_vfs=2)
    err = refused(model, "fabric_show")
    assert err.code is ErrorCode.WRONG_STATE
    assert "array_attach" in err.message
    assert refused(model, "array_attach", path="/nope").code is ErrorCode.NOT_FOUND
    assert call(model, "adapter_identify")["physical_port"] is None


def test_vf_enable_is_numvfs() -> None:
    model = AdapterModel(MemoryPlatform(), max_vfs=4)
    r = call(model, "vf_enable", count=2)
    assert [v["state"] for v in r["vfs"]] == ["IDLE", "IDLE", "DISABLED", "DISABLED"]
    err = refused(model, "vf_enable", count=5)
    assert (err.code, err.message) == (ErrorCode.INVALID_PARAMS,
                                       "vf_enable: count 5 exceeds the adapter's 4 VFs")
    call(model, "vf_assign", vf=1, vm_name="vm", vm_pid=9)
    err = refused(model, "vf_enable", count=1)
    assert err.message == "VF 1 is ASSIGNED; vf_disable needs IDLE"
    assert model.state.vfs_enabled == 2  # nothing changed
    assert refused(model, "vf_get", vf=4).code is ErrorCode.NOT_FOUND
    assert refused(model, "vf_assign", vf=3, vm_name="vm", vm_pid=9).message == \
        "VF 3 is DISABLED; vf_assign needs IDLE"


def test_bind_logs_the_vport_in_with_fdisc() -> None:
    model, platform = configured_model()
    vp = model.state.vports[VPORT]
    assert vp.vf == 0 and vp.login is not None and vp.login.port_name == VPORT
    assert model.vf(0).vport == VPORT
    login = platform.shared.logins.get(VPORT)
    assert login is not None and login.parent == platform.fabric.physical_login().wwpn
    assert login.nport_id == vp.login.nport_id


def test_bind_and_unbind_rules() -> None:
    model, _ = configured_model()
    call(model, "vport_create", wwpn=VPORT2.canonical(), wwnn=VPORT2_NN.canonical())
    err = refused(model, "vport_bind", wwpn=VPORT2.canonical(), vf=0)
    assert (err.code, err.message) == (ErrorCode.CONFLICT, f"VF 0 already has vport {VPORT}")
    err = refused(model, "vport_bind", wwpn=VPORT2.canonical(), vf=1)
    assert err.message == "VF 1 is IDLE; vport_bind needs ASSIGNED or CONNECTED"
    call(model, "vf_assign", vf=1, vm_name="vm1", vm_pid=11)
    err = refused(model, "vport_bind", wwpn=VPORT.canonical(), vf=1)
    assert err.message == f"vport {VPORT} is bound to VF 0; vport_unbind first"
    assert refused(model, "vport_delete", wwpn=VPORT.canonical()).code is ErrorCode.WRONG_STATE
    call(model, "vport_unbind", wwpn=VPORT.canonical())
    assert model.vf(0).vport is None
    assert model.state.vports[VPORT].login is not None  # unbinding keeps the login
    call(model, "vport_delete", wwpn=VPORT.canonical())
    assert VPORT not in model.state.vports


def test_vport_names_are_unique_and_logins_exclusive_across_adapters() -> None:
    fabric = Fabric()
    model_a, _ = configured_model(MemoryPlatform(fabric))
    model_b = AdapterModel(MemoryPlatform(fabric, port_vsid=0x8_0000_0002), max_vfs=2)
    call(model_b, "array_attach", path=ARRAY_PATH)
    err = refused(model_a, "vport_create", wwpn=VPORT_ALT.canonical(), wwnn=VPORT_NN.canonical())
    assert err.code is ErrorCode.CONFLICT
    call(model_b, "vport_create", wwpn=VPORT.canonical(), wwnn=VPORT_NN.canonical(),
         alternate_wwpn=VPORT_ALT.canonical())
    err = refused(model_b, "vport_login", wwpn=VPORT.canonical())
    assert err.code is ErrorCode.FABRIC_REFUSED
    assert err.message.startswith("DuplicatePortName: port name")
    # claim X3: the destination logs in the alternate WWPN while the source holds the primary
    r = call(model_b, "vport_login", wwpn=VPORT.canonical(), alternate=True)
    assert r["port_name"] == VPORT_ALT.canonical() and r["logged_in"]
    err = refused(model_b, "vport_login", wwpn=VPORT.canonical())
    assert err.message == f"vport {VPORT} is logged in as {VPORT_ALT}; vport_logout first"


def test_mapping_load_and_get_round_trip() -> None:
    model, platform = configured_model()
    doc, _ = standard_mapping()
    dp = FakeDataPath()
    platform.datapaths[0] = dp
    r = call(model, "mapping_load", vf=0, mapping=doc)
    assert r == {"vf": 0, "luns": 3, "mapping_generation": 1}
    assert call(model, "mapping_get", vf=0) == {"vf": 0, "mapping": doc}
    # the data path got the new snapshot, with the table
    assert dp.last is not None and dp.last.mapping is not None and len(dp.last.mapping) == 3
    assert dp.initiator == VPORT
    call(model, "vport_logout", wwpn=VPORT.canonical())
    assert dp.initiator is None and dp.last.vport == VPORT
    call(model, "vport_login", wwpn=VPORT.canonical(), alternate=True)
    assert dp.initiator == VPORT_ALT  # claim X3: the VF's IO goes out with the new name
    assert call(model, "mapping_unload", vf=0)["mapping_generation"] == 2
    assert call(model, "mapping_get", vf=0)["mapping"] is None


def test_mapping_load_refusals() -> None:
    model, _ = configured_model()
    doc, _ = standard_mapping()
    err = refused(model, "mapping_load", vf=1, mapping=doc)
    assert err.message == "VF 1 is IDLE; mapping_load needs ASSIGNED or CONNECTED"
    ds = datastore()
    thin = ds.vdisk_create(VdiskId("thin"), 128, thin=True)
    err = refused(model, "mapping_load", vf=0, mapping=mapping(entry(0, 0, thin)))
    assert err.code is ErrorCode.INVALID_PARAMS
    assert err.message.startswith(
        "mapping_load: mapping: entry (target 0, lun 0): vdisk 'thin' is thin with 2 "
        "unallocated chunk(s)")
    platform = MemoryPlatform()
    model2 = AdapterModel(platform, max_vfs=1)
    call(model2, "array_attach", path=ARRAY_PATH)
    call(model2, "vf_enable", count=1)
    call(model2, "vf_assign", vf=0, vm_name="vm", vm_pid=3)
    platform.geometry.clear()
    err = refused(model2, "mapping_load", vf=0, mapping=doc)
    assert err.code is ErrorCode.NOT_FOUND
    assert "which is on no attached array" in err.message
    assert model2.vf(0).mapping is None


def test_unassign_and_reset_drop_mapping_and_binding() -> None:
    model, platform = configured_model()
    doc, _ = standard_mapping()
    call(model, "mapping_load", vf=0, mapping=doc)
    dp = platform.datapaths[0] = FakeDataPath()
    r = call(model, "vf_unassign", vf=0)
    assert (r["state"], r["vm"], r["vport"], r["mapping_luns"]) == ("IDLE", None, None, 0)
    assert model.state.vports[VPORT].vf is None and dp.resets == 1
    call(model, "vf_assign", vf=0, vm_name="vm0", vm_pid=1)
    model.vf_event(0, VfEvent.FAULT, "ring index out of range")
    assert call(model, "vf_get", vf=0)["error"] == "ring index out of range"
    model.vf_event(0, VfEvent.FAULT, "second")
    assert model.vf(0).error == "ring index out of range"
    assert refused(model, "vf_unassign", vf=0).message == \
        "VF 0 is ERROR; vf_unassign needs ASSIGNED, CONNECTED, QUIESCED or SAVED"
    assert call(model, "vf_reset", vf=0)["state"] == "IDLE"


# -- the mediated path: PF IO -------------------------------------------------------------


def _io_model() -> tuple[AdapterModel, MemoryPlatform, int]:
    model, platform = configured_model()
    doc, _ = standard_mapping()
    call(model, "mapping_load", vf=0, mapping=doc)
    buffer_id = call(model, "pf_io_buffer_attach", (FD_BUFFER,))["buffer"]
    return model, platform, buffer_id


def test_pf_io_write_then_read_through_the_mapping() -> None:
    model, platform, buf = _io_model()
    mem = platform.fd_memory[FD_BUFFER]
    pattern = bytes(range(256)) * 8  # 2048 bytes = 4 blocks
    mem[0:2048] = pattern
    # vd-c spans both LUNs: blocks 4094..4097 cross from the first extent into the next
    w = call(model, "pf_io_submit", wwpn=VPORT.canonical(), target=1, lun=0,
             cdb=rw10(0x2A, 4094, 4), buffer=buf, sg=[[0, 1000], [1000, 1048]],
             direction="to_device")
    assert w == {"status": 0, "sense": "", "residual": 0, "data_len": 2048}
    r = call(model, "pf_io_submit", wwpn=VPORT.canonical(), target=1, lun=0,
             cdb=rw10(0x28, 4094, 4), buffer=buf, sg=[[8192, 2048]], direction="from_device")
    assert r["status"] == 0 and r["data_len"] == 2048
    assert bytes(mem[8192:8192 + 2048]) == pattern
    stats = call(model, "adapter_get_stats")["pf_io"]
    assert stats == {"commands": 2, "bytes_in": 2048, "bytes_out": 2048, "check_conditions": 0}


def test_pf_io_is_refused_by_the_fabric_for_a_lun_not_masked() -> None:
    model, _, buf = _io_model()
    call(model, "fabric_mask_revoke", initiator=VPORT.canonical(),
         array=ARRAY_WWN.canonical(), luns=[0])
    r = call(model, "pf_io_submit", wwpn=VPORT.canonical(), target=0, lun=0,
             cdb=rw10(0x28, 0, 1), buffer=buf, sg=[[0, 512]], direction="from_device")
    assert r["status"] == Status.CHECK_CONDITION
    sense = decode_sense(bytes.fromhex(r["sense"])).sense
    assert sense == ACCESS_DENIED_NO_ACCESS_RIGHTS
    assert sense.key is SenseKey.ILLEGAL_REQUEST


def test_pf_io_addressing_and_parameter_errors() -> None:
    model, _, buf = _io_model()
    r = call(model, "pf_io_submit", wwpn=VPORT.canonical(), target=9, lun=0, cdb="000000000000")
    assert decode_sense(bytes.fromhex(r["sense"])).sense == LOGICAL_UNIT_NOT_SUPPORTED
    err = refused(model, "pf_io_submit", wwpn=VPORT.canonical(), target=0, lun=0,
                  cdb=rw10(0x28, 0, 1), buffer=buf, sg=[[65535, 2]], direction="from_device")
    assert err.message == (f"pf_io_submit: segment [65535, 65537) is outside buffer {buf} "
                           "of 65536 bytes")
    err = refused(model, "pf_io_submit", wwpn=VPORT.canonical(), target=0, lun=0,
                  cdb="000000000000", sg=[[0, 1]], direction="none")
    assert err.code is ErrorCode.INVALID_PARAMS
    err = refused(model, "pf_io_submit", wwpn=VPORT2.canonical(), target=0, lun=0,
                  cdb="000000000000")
    assert err.code is ErrorCode.NOT_FOUND
    call(model, "vport_logout", wwpn=VPORT.canonical())
    err = refused(model, "pf_io_submit", wwpn=VPORT.canonical(), target=0, lun=0,
                  cdb="000000000000")
    assert err.code is ErrorCode.WRONG_STATE
    call(model, "pf_io_buffer_detach", buffer=buf)
    assert refused(model, "pf_io_buffer_detach", buffer=buf).code is ErrorCode.NOT_FOUND


# -- migration hooks ----------------------------------------------------------------------


def test_migration_methods_need_a_data_path_and_the_right_state() -> None:
    model, platform = configured_model()
    assert refused(model, "vf_quiesce", vf=0).message == \
        "VF 0 is ASSIGNED; vf_quiesce needs CONNECTED"
    err = refused(model, "vf_state_restore", vf=0, state={"x": 1})
    assert err.message == "VF 0 has no running data path; vf_state_restore needs one"
    dp = platform.datapaths[0] = FakeDataPath(heads=[3, 5], drains=False)
    model.vf_event(0, VfEvent.FRONTEND_CONNECT)
    assert call(model, "vf_quiesce", vf=0) == {"vf": 0, "outstanding": 2}  # claim B1
    assert not dp.fetching
    assert call(model, "vf_drain", vf=0, timeout_ms=10) == {
        "vf": 0, "drained": False, "outstanding": [3, 5]}  # claim B2
    err = refused(model, "vf_state_save", vf=0)
    assert err.message == ("VF 0 has 2 outstanding request(s); vf_drain until drained "
                           "before vf_state_save")
    dp.drains = True
    assert call(model, "vf_drain", vf=0, timeout_ms=10)["drained"] is True
    reply = model.call("vf_state_save", {"vf": 0})  # claims B3, B4
    assert reply.fds == (501, 502) and reply.result["state"]["format"] == "fake-queue-state"
    assert model.vf(0).state is VfState.SAVED
    # abort before commit (claim X1): back to the source VF from the saved state
    r = model.call("vf_state_restore", {"vf": 0, "state": reply.result["state"]}, (7, 8))
    assert r.result["state"] == "QUIESCED" and dp.restored == (reply.result["state"], (7, 8))
    assert call(model, "vf_resume", vf=0)["state"] == "CONNECTED" and dp.fetching


def test_dump_load_round_trip_of_a_configured_adapter() -> None:
    model, platform = configured_model()
    doc, _ = standard_mapping()
    call(model, "mapping_load", vf=0, mapping=doc)
    call(model, "pf_io_buffer_attach", (FD_BUFFER,))
    dump = call(model, "adapter_dump")
    assert dump["format"] == "vfdirect.adapter-state"
    state = AdapterState.load(dump)
    assert state.dump() == model.state.dump()
    again = AdapterModel(platform, state=state)
    assert again.dump() == model.dump()
    broken = {**dump, "vports": [{**dump["vports"][0], "vf": 1}]}
    with pytest.raises(ValueError, match="is bound to VF 1, which does not name it"):
        AdapterState.load(broken)


# -- random sequences ---------------------------------------------------------------------

WWNS = [VPORT, VPORT_ALT, VPORT2, VPORT2_NN, VPORT_NN, ARRAY_WWN]
_MAPPING, _DS = standard_mapping()
_THIN = _DS.vdisk_create(VdiskId("thin-x"), 64, thin=True)
MAPPINGS = [_MAPPING, mapping(entry(2, 7, _THIN)), {"format": "nope"}, mapping()]


def _value(name: str) -> st.SearchStrategy[Any]:
    """Mostly valid values for a parameter name, sometimes junk."""
    junk = st.none() | st.booleans() | st.integers(-3, 5) | st.text(max_size=4)
    good: dict[str, st.SearchStrategy[Any]] = {
        "vf": st.integers(0, 5), "count": st.integers(0, 5), "vm_pid": st.integers(1, 9),
        "vm_name": st.sampled_from(["vm0", "vm1"]),
        "wwpn": st.sampled_from([w.canonical() for w in WWNS]),
        "wwnn": st.sampled_from([w.canonical() for w in WWNS]),
        "alternate_wwpn": st.sampled_from([w.canonical() for w in WWNS]),
        "initiator": st.sampled_from([w.canonical() for w in WWNS]),
        "array": st.just(ARRAY_WWN.canonical()),
        "luns": st.lists(st.integers(0, 2), min_size=1, max_size=2, unique=True),
        "members": st.lists(st.sampled_from([w.canonical() for w in WWNS]), max_size=2,
                            unique=True),
        "name": st.sampled_from(["z0", "z1"]), "path": st.sampled_from([ARRAY_PATH, "/x"]),
        "mapping": st.sampled_from(MAPPINGS), "alternate": st.booleans(),
        "timeout_ms": st.integers(0, 10), "state": st.just({"format": "fake-queue-state"}),
        "target": st.integers(0, 2), "lun": st.integers(0, 2),
        "cdb": st.sampled_from([rw10(0x28, 0, 1), rw10(0x2A, 10, 1), "000000000000",
                                "a00000000000ffff0000", "ff" * 6]),
        "buffer": st.integers(0, 2), "sg": st.sampled_from([[], [[0, 512]], [[100, 412]]]),
        "direction": st.sampled_from(["none", "to_device", "from_device"]),
    }
    return st.one_of(good.get(name, junk), junk) if name in good else junk


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any], tuple[int, ...]]:
    spec = draw(st.sampled_from(METHODS))
    params = {}
    for p in spec.params:
        if p.required or draw(st.booleans()):
            params[p.name] = draw(_value(p.name)) if draw(st.integers(0, 9)) else draw(
                _value("junk"))
    fds = tuple(draw(st.lists(st.sampled_from([FD_BUFFER, 77]), max_size=spec.fds.maximum)))
    return spec.name, params, fds


class AdapterMachine(RuleBasedStateMachine):
    """Random admin calls and data path events: every call ends in a result or an
    RpcError with a stable code, never INTERNAL_ERROR, and the state stays legal."""

    def __init__(self) -> None:
        super().__init__()
        self.platform = MemoryPlatform()
        for i in range(4):
            self.platform.datapaths[i] = FakeDataPath()
        self.model = AdapterModel(self.platform, max_vfs=4)

    @rule(req=requests())
    def admin_call(self, req: tuple[str, dict[str, Any], tuple[int, ...]]) -> None:
        method, params, fds = req
        err = rpc_error_of(self.model.call, method, params, fds)
        if err is not None:
            assert err.code in set(ErrorCode) - {ErrorCode.INTERNAL_ERROR}, err
            assert err.message

    @rule(vf=st.integers(0, 3), event=st.sampled_from(
        [VfEvent.FRONTEND_CONNECT, VfEvent.FRONTEND_DISCONNECT, VfEvent.FAULT]),
        heads=st.lists(st.integers(0, 255), max_size=2))
    def datapath_event(self, vf: int, event: VfEvent, heads: list[int]) -> None:
        self.platform.datapaths[vf].heads[:] = heads
        err = rpc_error_of(self.model.vf_event, vf, event, "fault")
        assert err is None or err.code is ErrorCode.WRONG_STATE

    @invariant()
    def state_is_legal(self) -> None:
        state = self.model.state
        assert self.model.internal_errors == 0
        for vf in state.vfs:
            assert invariant_violations(vf) == [], vf
        assert state.violations() == []
        assert AdapterState.load(state.dump()).dump() == state.dump()


TestAdapterMachine = AdapterMachine.TestCase
TestAdapterMachine.settings = settings(
    max_examples=60, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([m.name for m in METHODS]),
       st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=5),
                       max_size=4))
def test_any_params_yield_a_result_or_a_stable_error(method: str,
                                                     params: dict[str, Any]) -> None:
    model, _ = configured_model()
    err = rpc_error_of(model.call, method, params)
    assert err is None or err.code is not ErrorCode.INTERNAL_ERROR
