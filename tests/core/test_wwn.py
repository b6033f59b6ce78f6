from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.wwn import VFDIRECT_OUI, Wwn, WwnError


def test_naa5_layout() -> None:
    # NAA 5 (SPC-4 7.8.6.6.4): 4-bit NAA, 24-bit company id, 36-bit vendor-specific id.
    w = Wwn.naa5(0x123456789, oui=0x001B32)
    assert w.raw == bytes.fromhex("5001b32123456789")
    assert w.canonical() == "naa.5001b32123456789"
    assert w.colon() == "50:01:b3:21:23:45:67:89"
    assert w.vendor_specific == 0x123456789
    assert w.naa_type == 5


@pytest.mark.parametrize(
    "text",
    ["naa.5001b32123456789", "NAA.5001B32123456789", "0x5001b32123456789",
     "5001b32123456789", "50:01:b3:21:23:45:67:89", " 50:01:B3:21:23:45:67:89 "],
)
def test_parse_forms(text: str) -> None:
    assert Wwn.parse(text) == Wwn(bytes.fromhex("5001b32123456789"))


@pytest.mark.parametrize(
    "text",
    ["", "naa.", "naa.5001b3212345678", "naa.5001b32123456789aa", "zz01b32123456789",
     "50:01:b3:21:23:45:67", "500:1:b3:21:23:45:67:89", "naa.0001b32123456789",
     "naa.5001b32123456789" + "0" * 16],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(WwnError):
        Wwn.parse(text)


@given(st.integers(0, (1 << 36) - 1), st.integers(0, (1 << 24) - 1))
def test_round_trip(vsid: int, oui: int) -> None:
    w = Wwn.naa5(vsid, oui=oui)
    assert Wwn.parse(w.canonical()) == w
    assert Wwn.parse(w.colon()) == w
    assert Wwn.parse(str(w)) == w
    assert w.vendor_specific == vsid


def test_default_oui_and_limits() -> None:
    assert Wwn.naa5(1).raw[0] >> 4 == 5
    assert (Wwn.naa5(1).as_int() >> 36) & 0xFFFFFF == VFDIRECT_OUI
    with pytest.raises(WwnError):
        Wwn.naa5(1 << 36)
    with pytest.raises(WwnError):
        Wwn.naa5(1, oui=1 << 24)
