"""The one IO check (login, zoning, masking) and the GuardedLun that applies it on every IO."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.array import LunKey
from vfdirect.core.block import AccessDenied, BlockDevice, BlockRangeError
from vfdirect.core.fabric import (
    Fabric,
    FabricConfigError,
    FabricDenied,
    GuardedLun,
    NotLoggedIn,
    NotMasked,
    NotZoned,
)
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn
from vfdirect.storage import MemoryBackend

ARRAY = Wwn.naa5(0x1000)
OTHER_ARRAY = Wwn.naa5(0x2000)
TPORT = Wwn.naa5(0x1001)
OTHER_TPORT = Wwn.naa5(0x2001)
HBA = Wwn.naa5(0x100)
VPORT = Wwn.naa5(0x200)
INTRUDER = Wwn.naa5(0x300)
LUN0 = LunKey(ARRAY, LunNumber(0))
LUN1 = LunKey(ARRAY, LunNumber(1))


@pytest.fixture
def fabric() -> Fabric:
    """HBA with vport VPORT logged in, zoned with ARRAY, LUN0 masked to VPORT."""
    f = Fabric()
    f.target_port_add(TPORT, ARRAY)
    f.target_port_add(OTHER_TPORT, OTHER_ARRAY)
    f.flogi(HBA, Wwn.naa5(0x101))
    f.fdisc(HBA, VPORT, Wwn.naa5(0x201))
    f.fdisc(HBA, INTRUDER, Wwn.naa5(0x301))
    f.zone_create("vm1", [VPORT, TPORT])
    f.zone_create("intruder", [INTRUDER, TPORT])
    f.mask_grant(VPORT, LUN0)
    return f


@pytest.fixture
def backend() -> MemoryBackend:
    return MemoryBackend(512, 16)


def guarded(fabric: Fabric, initiator: Wwn, key: LunKey, backend: BlockDevice) -> GuardedLun:
    return GuardedLun(fabric, initiator, key, backend)


def block(byte: int) -> memoryview:
    return memoryview(bytes([byte]) * 512)


def test_authorized_io_passes(fabric: Fabric, backend: MemoryBackend) -> None:
    dev = guarded(fabric, VPORT, LUN0, backend)
    assert isinstance(dev, BlockDevice)
    assert (dev.block_size, dev.num_blocks) == (512, 16)
    dev.write_blocks(3, [block(7)], fua=True)
    out = bytearray(512)
    dev.read_blocks(3, [memoryview(out)])
    assert out == bytes([7]) * 512
    dev.flush()
    assert fabric.is_authorized(VPORT, ARRAY, LunNumber(0))
    assert "as seen by" in repr(dev)


def test_not_masked_is_refused(fabric: Fabric, backend: MemoryBackend) -> None:
    dev = guarded(fabric, INTRUDER, LUN0, backend)  # zoned, logged in, not masked
    with pytest.raises(NotMasked, match=r"LUN 0 of array naa\.50af1de000001000 is not masked"):
        dev.write_blocks(0, [block(1)])
    with pytest.raises(NotMasked):
        dev.read_blocks(0, [memoryview(bytearray(512))])
    with pytest.raises(NotMasked):
        dev.flush()
    # nothing reached the backend
    out = bytearray(512)
    backend.read_blocks(0, [memoryview(out)])
    assert not any(out)
    # and a masked initiator's other LUN is refused too
    with pytest.raises(NotMasked):
        guarded(fabric, VPORT, LUN1, backend).read_blocks(0, [memoryview(bytearray(512))])


def test_not_zoned_is_refused(fabric: Fabric, backend: MemoryBackend) -> None:
    key = LunKey(OTHER_ARRAY, LunNumber(0))
    fabric.mask_grant(VPORT, key)  # masked but not zoned
    dev = guarded(fabric, VPORT, key, backend)
    with pytest.raises(NotZoned, match="shares no zone"):
        dev.read_blocks(0, [memoryview(bytearray(512))])


def test_not_logged_in_is_refused(fabric: Fabric, backend: MemoryBackend) -> None:
    stranger = Wwn.naa5(0x999)
    fabric.zone_member_add("vm1", [stranger])
    fabric.mask_grant(stranger, LUN0)
    dev = guarded(fabric, stranger, LUN0, backend)
    with pytest.raises(NotLoggedIn, match="not logged in"):
        dev.write_blocks(0, [block(1)])


def test_check_order_and_rule_names(fabric: Fabric) -> None:
    """Login is checked before zoning, zoning before masking; each names its rule."""
    stranger = Wwn.naa5(0x999)
    with pytest.raises(NotLoggedIn) as e1:
        fabric.authorize(stranger, OTHER_ARRAY, LunNumber(9))
    with pytest.raises(NotZoned) as e2:
        fabric.authorize(VPORT, OTHER_ARRAY, LunNumber(9))
    with pytest.raises(NotMasked) as e3:
        fabric.authorize(VPORT, ARRAY, LunNumber(9))
    assert [e.value.rule for e in (e1, e2, e3)] == ["login", "zoning", "masking"]
    for e in (e1, e2, e3):
        assert isinstance(e.value, AccessDenied)
        assert isinstance(e.value, FabricDenied)


def test_grant_and_revoke_take_effect_on_the_next_io(
    fabric: Fabric, backend: MemoryBackend
) -> None:
    dev = guarded(fabric, VPORT, LUN1, backend)
    buf = memoryview(bytearray(512))
    with pytest.raises(NotMasked):
        dev.read_blocks(0, [buf])
    assert fabric.mask_grant(VPORT, LUN1) is True
    assert fabric.mask_grant(VPORT, LUN1) is False  # idempotent
    dev.read_blocks(0, [buf])  # same GuardedLun object: the grant is seen at once
    assert fabric.mask_revoke(VPORT, LUN1) is True
    with pytest.raises(NotMasked):
        dev.read_blocks(0, [buf])
    assert fabric.mask_revoke(VPORT, LUN1) is False


def test_zoning_changes_take_effect_on_the_next_io(
    fabric: Fabric, backend: MemoryBackend
) -> None:
    dev = guarded(fabric, VPORT, LUN0, backend)
    buf = memoryview(bytearray(512))
    dev.read_blocks(0, [buf])
    fabric.zone_member_remove("vm1", [VPORT])
    with pytest.raises(NotZoned):
        dev.read_blocks(0, [buf])
    fabric.zone_member_add("vm1", [VPORT])
    dev.read_blocks(0, [buf])
    fabric.zone_delete("vm1")
    with pytest.raises(NotZoned):
        dev.read_blocks(0, [buf])
    fabric.zone_create("vm1b", [VPORT, TPORT])
    dev.read_blocks(0, [buf])
    fabric.target_port_remove(TPORT)  # the array's only port leaves the fabric
    with pytest.raises(NotZoned):
        dev.read_blocks(0, [buf])
    fabric.target_port_add(TPORT, ARRAY)
    dev.read_blocks(0, [buf])


def test_logout_takes_effect_on_the_next_io(fabric: Fabric, backend: MemoryBackend) -> None:
    dev = guarded(fabric, VPORT, LUN0, backend)
    buf = memoryview(bytearray(512))
    dev.read_blocks(0, [buf])
    fabric.logo(HBA)  # the physical port: its NPIV ports go with it
    with pytest.raises(NotLoggedIn):
        dev.read_blocks(0, [buf])
    fabric.flogi(HBA, Wwn.naa5(0x101))
    fabric.fdisc(HBA, VPORT, Wwn.naa5(0x201))
    dev.read_blocks(0, [buf])


def test_range_errors_pass_through_the_guard(fabric: Fabric, backend: MemoryBackend) -> None:
    with pytest.raises(BlockRangeError):
        guarded(fabric, VPORT, LUN0, backend).read_blocks(16, [memoryview(bytearray(512))])


def test_visible_luns_and_acl_queries(fabric: Fabric) -> None:
    fabric.mask_grant(VPORT, LUN1)
    fabric.mask_grant(VPORT, LunKey(OTHER_ARRAY, LunNumber(4)))  # not zoned
    assert fabric.visible_luns(VPORT) == (LUN0, LUN1)
    assert fabric.masking.initiators_of(LUN0) == (VPORT,)
    assert fabric.mask_revoke_all(VPORT) == tuple(
        sorted([LUN0, LUN1, LunKey(OTHER_ARRAY, LunNumber(4))])
    )
    assert fabric.visible_luns(VPORT) == ()


def test_zoning_config_errors(fabric: Fabric) -> None:
    with pytest.raises(FabricConfigError, match="already exists"):
        fabric.zone_create("vm1")
    with pytest.raises(FabricConfigError, match="no zone"):
        fabric.zone_delete("nope")
    with pytest.raises(FabricConfigError, match="zone name"):
        fabric.zone_create("9bad name")
    with pytest.raises(FabricConfigError, match="not a member"):
        fabric.zone_member_remove("vm1", [INTRUDER])
    with pytest.raises(FabricConfigError, match="already belongs"):
        fabric.target_port_add(TPORT, OTHER_ARRAY)
    fabric.target_port_add(TPORT, ARRAY)  # same owner: no-op
    with pytest.raises(FabricConfigError, match="not a target port"):
        fabric.target_port_remove(HBA)


def test_fabric_dump_load_round_trip(fabric: Fabric) -> None:
    fabric.mask_grant(VPORT, LunKey(OTHER_ARRAY, LunNumber(16383)))
    data = json.loads(json.dumps(fabric.dump()))
    again = Fabric.load(data)
    assert again.dump() == fabric.dump()
    # logins are runtime state: not in the configuration dump
    assert "logins" not in data
    assert len(again.logins) == 0
    with pytest.raises(NotLoggedIn):
        again.authorize(VPORT, ARRAY, LunNumber(0))
    # ... but can be restored alongside it
    restored = Fabric.load(data, logins=fabric.logins.dump())
    assert restored.logins.dump() == fabric.logins.dump()
    restored.authorize(VPORT, ARRAY, LunNumber(0))
    for initiator in (VPORT, INTRUDER, HBA):
        for key in (LUN0, LUN1):
            assert restored.is_authorized(initiator, key.array, key.lun) == fabric.is_authorized(
                initiator, key.array, key.lun
            )


@pytest.mark.parametrize(
    "patch",
    [
        {"format": "x"},
        {"version": 2},
        {"domain_id": 0},
        {"target_ports": [{"wwpn": "naa.50af1de000001001"}]},
        {"zones": [{"name": "z", "members": ["zz"]}]},
        {"zones": [{"name": "z", "members": []}, {"name": "z", "members": []}]},
        {"masking": [{"initiator": HBA.canonical(), "array": ARRAY.canonical(), "luns": [-1]}]},
        {"masking": [{"initiator": HBA.canonical(), "array": ARRAY.canonical(), "luns": [True]}]},
        {"masking": "nope"},
    ],
)
def test_bad_fabric_dumps_are_refused(fabric: Fabric, patch: dict[str, object]) -> None:
    data = {**fabric.dump(), **patch}
    with pytest.raises(FabricConfigError):
        Fabric.load(data)


def test_login_dump_conflicting_with_config_is_refused(fabric: Fabric) -> None:
    logins = fabric.logins.dump()
    config = fabric.dump()
    config["target_ports"].append({"wwpn": VPORT.canonical(), "array": ARRAY.canonical()})
    with pytest.raises(FabricConfigError):
        Fabric.load(config, logins=logins)


wwpns = st.integers(0, 7).map(lambda i: Wwn.naa5(0x8000 + i))
keys = st.builds(LunKey, st.sampled_from([ARRAY, OTHER_ARRAY]), st.integers(0, 3).map(LunNumber))


@settings(max_examples=80, deadline=None)
@given(
    targets=st.lists(st.tuples(st.integers(0, 5).map(lambda i: Wwn.naa5(0x9000 + i)),
                               st.sampled_from([ARRAY, OTHER_ARRAY])),
                     unique_by=lambda t: t[0], max_size=4),
    zones=st.dictionaries(st.sampled_from(["a", "b", "c"]), st.sets(wwpns, max_size=4),
                          max_size=3),
    masks=st.lists(st.tuples(wwpns, keys), max_size=10),
    logged=st.sets(wwpns),
)
def test_authorize_matches_the_rules(
    targets: list[tuple[Wwn, Wwn]],
    zones: dict[str, set[Wwn]],
    masks: list[tuple[Wwn, LunKey]],
    logged: set[Wwn],
) -> None:
    fabric = Fabric()
    for wwpn, array in targets:
        fabric.target_port_add(wwpn, array)
    target_names = [t for t, _ in targets]
    for i, (name, members) in enumerate(sorted(zones.items())):
        # put a target port into some zones
        extra = [target_names[i % len(target_names)]] if target_names else []
        fabric.zone_create(name, [*members, *extra])
    for wwpn, key in masks:
        fabric.mask_grant(wwpn, key)
    for wwpn in sorted(logged):
        fabric.flogi(wwpn, wwpn)
    zoned_pairs = {
        (m, fabric.target_ports()[t])
        for members in fabric.zoning.zones().values()
        for m in members
        for t in members
        if t in fabric.target_ports()
    }
    for i in range(8):
        initiator = Wwn.naa5(0x8000 + i)
        for array in (ARRAY, OTHER_ARRAY):
            for lun in range(4):
                key = LunKey(array, LunNumber(lun))
                expected: type[FabricDenied] | None
                if initiator not in logged:
                    expected = NotLoggedIn
                elif (initiator, array) not in zoned_pairs:
                    expected = NotZoned
                elif (initiator, key) not in masks:
                    expected = NotMasked
                else:
                    expected = None
                if expected is None:
                    fabric.authorize(initiator, array, LunNumber(lun))
                else:
                    with pytest.raises(expected):
                        fabric.authorize(initiator, array, LunNumber(lun))
    assert Fabric.load(fabric.dump()).dump() == fabric.dump()
