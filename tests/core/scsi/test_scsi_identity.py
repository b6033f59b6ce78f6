from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scsi_doubles import TEST_WWN, make_identity

from vfdirect.core.scsi.identity import (
    BlockLimits,
    IdentityError,
    LuIdentity,
    TargetIdentity,
)
from vfdirect.core.scsi.opcodes import ProtocolIdentifier
from vfdirect.core.wwn import Wwn


@pytest.mark.parametrize(
    "overrides",
    [
        {"vendor": "TOO-LONG-VENDOR"},
        {"product": "P" * 17},
        {"revision": "12345"},
        {"serial": ""},
        {"serial": "S" * 65},
        {"serial": "caf\u00e9"},
        {"vendor": "tab\there"},
        {"wwn": "naa.5001405123456789"},
        {"target_port_wwn": b"\x50" * 8},
        {"relative_target_port": 0},
        {"relative_target_port": 0x10000},
        {"relative_target_port": True},
        {"physical_block_exponent": 16},
        {"limits": {"max_transfer_blocks": 1}},
        {"protocol": 0xB},
    ],
)
def test_lu_identity_refuses_what_inquiry_cannot_carry(overrides: dict[str, Any]) -> None:
    with pytest.raises(IdentityError):
        make_identity(**overrides)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_transfer_blocks": -1},
        {"max_transfer_blocks": 1 << 32},
        {"optimal_granularity_blocks": 1 << 16},
        {"optimal_transfer_blocks": 1.5},
    ],
)
def test_block_limits_refuse_out_of_range(kwargs: dict[str, Any]) -> None:
    with pytest.raises(IdentityError):
        BlockLimits(**kwargs)


def test_target_identity_checks_strings() -> None:
    with pytest.raises(IdentityError):
        TargetIdentity(vendor="X" * 9)
    assert TargetIdentity.load(TargetIdentity().dump()) == TargetIdentity()


printable = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
identities = st.builds(
    LuIdentity,
    vendor=printable,
    product=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=16),
    revision=st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=4),
    serial=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=64),
    wwn=st.builds(Wwn.naa5, st.integers(0, (1 << 36) - 1)),
    target_port_wwn=st.one_of(st.none(), st.builds(Wwn.naa5, st.integers(0, (1 << 36) - 1))),
    relative_target_port=st.one_of(st.none(), st.integers(1, 0xFFFF)),
    protocol=st.sampled_from(ProtocolIdentifier),
    limits=st.builds(
        BlockLimits,
        max_transfer_blocks=st.integers(0, 0xFFFF_FFFF),
        optimal_granularity_blocks=st.integers(0, 0xFFFF),
        optimal_transfer_blocks=st.integers(0, 0xFFFF_FFFF),
    ),
    physical_block_exponent=st.integers(0, 15),
)


@settings(max_examples=100, deadline=None)
@given(identities)
def test_lu_identity_dump_load_round_trip(identity: LuIdentity) -> None:
    assert LuIdentity.load(identity.dump()) == identity


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.pop("serial"),
        lambda d: d.update(wwn="naa.xyz"),
        lambda d: d.update(wwn=5),
        lambda d: d.update(protocol=99),
        lambda d: d.update(protocol=True),
        lambda d: d.update(relative_target_port="1"),
        lambda d: d.update(limits=None),
        lambda d: d["limits"].pop("max_transfer_blocks"),
        lambda d: d.update(physical_block_exponent=False),
    ],
)
def test_lu_identity_load_rejects_malformed_dumps(mutate: Any) -> None:
    data = make_identity(target_port_wwn=TEST_WWN).dump()
    mutate(data)
    with pytest.raises(IdentityError):
        LuIdentity.load(data)


def test_lu_identity_load_rejects_non_mappings() -> None:
    with pytest.raises(IdentityError):
        LuIdentity.load([])  # type: ignore[arg-type]
