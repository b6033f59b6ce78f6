"""Fabric logins: FLOGI, FDISC (NPIV), LOGO and N_Port ID assignment (FC-LS, FC-FS)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from vfdirect.core.fabric import (
    DuplicatePortName,
    Fabric,
    FabricConfigError,
    LoginTable,
    NotLoggedInError,
    NPortIdsExhausted,
    ParentNotLoggedIn,
    nport_id_text,
)
from vfdirect.core.wwn import Wwn

HBA = Wwn.naa5(0x100)
HBA_NODE = Wwn.naa5(0x101)
VPORT = Wwn.naa5(0x200)
VPORT_NODE = Wwn.naa5(0x201)


def test_flogi_assigns_area_port_zero() -> None:
    table = LoginTable(domain_id=0x0A)
    login = table.flogi(HBA, HBA_NODE)
    assert login.nport_id == 0x0A0000
    assert (login.domain_id, login.area_id, login.port_id) == (0x0A, 0, 0)
    assert not login.is_npiv
    assert HBA in table
    assert table.get(HBA) == login
    assert table.by_nport_id(0x0A0000) == login
    assert nport_id_text(login.nport_id) == "0x0a0000"


def test_fdisc_assigns_port_ids_in_the_parent_area() -> None:
    table = LoginTable()
    table.flogi(Wwn.naa5(0x1), Wwn.naa5(0x2))
    hba = table.flogi(HBA, HBA_NODE)
    v1 = table.fdisc(HBA, VPORT, VPORT_NODE)
    v2 = table.fdisc(HBA, Wwn.naa5(0x202), Wwn.naa5(0x203))
    assert hba.nport_id == 0x010100
    assert (v1.nport_id, v2.nport_id) == (0x010101, 0x010102)
    assert v1.parent == HBA and v1.is_npiv
    assert table.npiv_ports(HBA) == (v1, v2)


def test_duplicate_login_is_refused() -> None:
    table = LoginTable()
    table.flogi(HBA, HBA_NODE)
    table.fdisc(HBA, VPORT, VPORT_NODE)
    before = table.dump()
    with pytest.raises(DuplicatePortName, match="already logged in as N_Port ID 0x010001"):
        table.fdisc(HBA, VPORT, VPORT_NODE)
    with pytest.raises(DuplicatePortName):
        table.flogi(VPORT, VPORT_NODE)
    with pytest.raises(DuplicatePortName):
        table.flogi(HBA, HBA_NODE)
    assert table.dump() == before


def test_fdisc_needs_a_flogi_parent() -> None:
    table = LoginTable()
    with pytest.raises(ParentNotLoggedIn, match="has no FLOGI"):
        table.fdisc(HBA, VPORT, VPORT_NODE)
    table.flogi(HBA, HBA_NODE)
    table.fdisc(HBA, VPORT, VPORT_NODE)
    with pytest.raises(ParentNotLoggedIn, match="itself an NPIV port"):
        table.fdisc(VPORT, Wwn.naa5(0x300), Wwn.naa5(0x301))


def test_logout_then_login_again() -> None:
    table = LoginTable()
    table.flogi(HBA, HBA_NODE)
    first = table.fdisc(HBA, VPORT, VPORT_NODE)
    assert table.logo(VPORT) == (first,)
    assert VPORT not in table
    with pytest.raises(NotLoggedInError):
        table.logo(VPORT)
    again = table.fdisc(HBA, VPORT, VPORT_NODE)
    assert again.nport_id == first.nport_id  # lowest free Port_ID again


def test_physical_logout_ends_its_npiv_logins() -> None:
    table = LoginTable()
    hba = table.flogi(HBA, HBA_NODE)
    v1 = table.fdisc(HBA, VPORT, VPORT_NODE)
    other = table.flogi(Wwn.naa5(0x999), Wwn.naa5(0x998))
    ended = table.logo(HBA)
    assert ended == (v1, hba)
    assert table.logins() == (other,)
    # the area is free again and is reused first
    assert table.flogi(HBA, HBA_NODE).nport_id == hba.nport_id


def test_exhaustion() -> None:
    table = LoginTable()
    table.flogi(HBA, HBA_NODE)
    for i in range(255):
        table.fdisc(HBA, Wwn.naa5(0x10000 + i), Wwn.naa5(0x20000 + i))
    with pytest.raises(NPortIdsExhausted):
        table.fdisc(HBA, VPORT, VPORT_NODE)
    for i in range(255):
        table.flogi(Wwn.naa5(0x30000 + i), Wwn.naa5(0x40000 + i))
    with pytest.raises(NPortIdsExhausted):
        table.flogi(Wwn.naa5(0x50000), Wwn.naa5(0x50001))


@pytest.mark.parametrize("domain", [0, 0xF0, 0x100, -1])
def test_bad_domain(domain: int) -> None:
    with pytest.raises(FabricConfigError):
        LoginTable(domain)


def test_target_port_names_cannot_log_in_as_initiators() -> None:
    fabric = Fabric()
    target = Wwn.naa5(0x5000)
    fabric.target_port_add(target, Wwn.naa5(0x6000))
    with pytest.raises(DuplicatePortName, match="target port"):
        fabric.flogi(target, HBA_NODE)
    fabric.flogi(HBA, HBA_NODE)
    with pytest.raises(DuplicatePortName, match="target port"):
        fabric.fdisc(HBA, target, VPORT_NODE)
    with pytest.raises(FabricConfigError, match="logged in as initiator"):
        fabric.target_port_add(HBA, Wwn.naa5(0x6000))


def test_login_table_dump_load_round_trip() -> None:
    table = LoginTable(0x21)
    table.flogi(HBA, HBA_NODE)
    table.flogi(Wwn.naa5(0x5), Wwn.naa5(0x6))
    table.fdisc(Wwn.naa5(0x5), VPORT, VPORT_NODE)
    table.logo(HBA)
    again = LoginTable.load(table.dump())
    assert again.dump() == table.dump()
    assert again.logins() == table.logins()
    # equal future behaviour: the next assignments agree
    assert again.flogi(HBA, HBA_NODE) == table.flogi(HBA, HBA_NODE)


@pytest.mark.parametrize(
    "logins",
    [
        [{"wwpn": VPORT.canonical(), "wwnn": VPORT_NODE.canonical(), "nport_id": 0x010001,
          "parent": HBA.canonical()}],  # parent missing
        [{"wwpn": HBA.canonical(), "wwnn": HBA_NODE.canonical(), "nport_id": 0x010005,
          "parent": None}],  # FLOGI with a Port_ID
        [{"wwpn": HBA.canonical(), "wwnn": HBA_NODE.canonical(), "nport_id": 0x020000,
          "parent": None}],  # other domain
        [{"wwpn": HBA.canonical(), "wwnn": HBA_NODE.canonical(), "nport_id": 0x010000,
          "parent": None}] * 2,  # twice
        [{"wwpn": "bogus", "wwnn": HBA_NODE.canonical(), "nport_id": 0x010000, "parent": None}],
        [{"wwpn": HBA.canonical(), "nport_id": 0x010000, "parent": None}],
        ["not an object"],
    ],
)
def test_bad_login_dumps_are_refused(logins: list[object]) -> None:
    data = {"format": "vfdirect.fabric-logins", "version": 1, "domain_id": 1, "logins": logins}
    with pytest.raises(FabricConfigError):
        LoginTable.load(data)


class LoginMachine(RuleBasedStateMachine):
    """Random FLOGI/FDISC/LOGO sequences: IDs unique, names unique, NPIV under parents."""

    def __init__(self) -> None:
        super().__init__()
        self.table = LoginTable()
        self.model: dict[Wwn, Wwn | None] = {}  # logged-in wwpn -> parent

    names = st.integers(0, 12).map(lambda i: Wwn.naa5(0x7000 + i))

    @rule(wwpn=names)
    def flogi(self, wwpn: Wwn) -> None:
        if wwpn in self.model:
            with pytest.raises(DuplicatePortName):
                self.table.flogi(wwpn, wwpn)
        else:
            self.table.flogi(wwpn, wwpn)
            self.model[wwpn] = None

    @rule(parent=names, wwpn=names)
    def fdisc(self, parent: Wwn, wwpn: Wwn) -> None:
        if wwpn in self.model:
            with pytest.raises(DuplicatePortName):
                self.table.fdisc(parent, wwpn, wwpn)
        elif parent not in self.model or self.model[parent] is not None:
            with pytest.raises(ParentNotLoggedIn):
                self.table.fdisc(parent, wwpn, wwpn)
        else:
            self.table.fdisc(parent, wwpn, wwpn)
            self.model[wwpn] = parent

    @precondition(lambda self: bool(self.model))
    @rule(data=st.data())
    def logo(self, data: st.DataObject) -> None:
        wwpn = data.draw(st.sampled_from(sorted(self.model)))
        ended = {lg.wwpn for lg in self.table.logo(wwpn)}
        expect = {wwpn} | {w for w, p in self.model.items() if p == wwpn}
        assert ended == expect
        for w in expect:
            del self.model[w]

    @rule()
    def round_trip(self) -> None:
        again = LoginTable.load(self.table.dump())
        assert again.dump() == self.table.dump()
        self.table = again

    @invariant()
    def consistent(self) -> None:
        logins = self.table.logins()
        assert {lg.wwpn: lg.parent for lg in logins} == self.model
        ids = [lg.nport_id for lg in logins]
        assert len(set(ids)) == len(ids)
        for lg in logins:
            assert 0 <= lg.nport_id < 1 << 24
            if lg.parent is not None:
                parent = self.table.get(lg.parent)
                assert parent is not None
                assert lg.area_id == parent.area_id and lg.port_id != 0
            else:
                assert lg.port_id == 0


TestLoginMachine = LoginMachine.TestCase
TestLoginMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)


@given(st.lists(st.integers(0, 40), min_size=1, max_size=40, unique=True))
def test_nport_ids_unique_for_any_population(names: list[int]) -> None:
    table = LoginTable()
    hba = Wwn.naa5(0xFFFF)
    table.flogi(hba, hba)
    for n in names:
        w = Wwn.naa5(n)
        if n % 3:
            table.fdisc(hba, w, w)
        else:
            table.flogi(w, w)
    ids = [lg.nport_id for lg in table.logins()]
    assert len(ids) == len(set(ids)) == len(names) + 1
