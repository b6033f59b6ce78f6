"""The names the inventory makes up: vport WWPN/WWNN/alternate, LU WWNs, vdisk ids.

Scheme (documented so that names never collide with the other makers' schemes): NAA
type 5 with vfdirect's company id (:data:`~vfdirect.core.wwn.VFDIRECT_OUI`), and a
36-bit vendor-specific id whose top nibble (bits 32..35) says what is named and whose
low 32 bits are random:

==========  ===================================================================
nibble      names
==========  ===================================================================
0x0         storage arrays (their own choice, below 2**32)
0x1..0xF    target port ``i - 1`` of an array (:func:`~vfdirect.core.array.target_port_wwpn`)
0x8, 0x9    an adapter's physical port WWPN and WWNN (``vfdirect adapter``)
0xA         a vport's WWPN
0xB         the same vport's alternate WWPN (claim X3), same low 32 bits
0xC         the same vport's WWNN, same low 32 bits
0xD         a vdisk's logical unit (INQUIRY VPD 83h NAA designator)
==========  ===================================================================

A vport's three names share their random part, so one glance pairs them. Random parts
are drawn again while any of the names is already in the inventory's WWN registry
(which also holds the arrays and target ports it knows), so names are unique in the
inventory; randomness keeps separate inventories on one fabric apart as well.

A vdisk's id is ``vd-`` and the eight hex digits of its LU name's random part; its
SCSI unit serial number is its id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vfdirect.core.ids import VdiskId
from vfdirect.core.wwn import Wwn

VPORT_WWPN_NIBBLE = 0xA
VPORT_ALTERNATE_NIBBLE = 0xB
VPORT_WWNN_NIBBLE = 0xC
LU_NIBBLE = 0xD


class RandomBits(Protocol):
    """Where random parts come from (``random.Random`` or ``secrets.SystemRandom``)."""

    def getrandbits(self, k: int, /) -> int: ...


class WwnKind:
    """Kinds of names in the WWN registry (``world_wide_names.kind``)."""

    ARRAY = "array"
    TARGET_PORT = "target_port"
    VPORT_WWPN = "vport_wwpn"
    VPORT_ALTERNATE = "vport_alternate"
    VPORT_WWNN = "vport_wwnn"
    LU = "lu"


def _name(nibble: int, low: int) -> Wwn:
    return Wwn.naa5((nibble << 32) | (low & 0xFFFF_FFFF))


@dataclass(frozen=True, slots=True)
class VportNames:
    wwpn: Wwn
    wwnn: Wwn
    alternate_wwpn: Wwn

    @classmethod
    def from_random(cls, low: int) -> VportNames:
        return cls(
            _name(VPORT_WWPN_NIBBLE, low),
            _name(VPORT_WWNN_NIBBLE, low),
            _name(VPORT_ALTERNATE_NIBBLE, low),
        )

    def all(self) -> tuple[Wwn, Wwn, Wwn]:
        return (self.wwpn, self.wwnn, self.alternate_wwpn)


@dataclass(frozen=True, slots=True)
class VdiskNames:
    id: VdiskId
    lu_wwn: Wwn

    @property
    def serial(self) -> str:
        return self.id

    @classmethod
    def from_random(cls, low: int) -> VdiskNames:
        low &= 0xFFFF_FFFF
        return cls(VdiskId(f"vd-{low:08x}"), _name(LU_NIBBLE, low))
