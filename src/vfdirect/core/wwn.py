"""World Wide Names: one canonical text form, converted at the edges.

The canonical form is ``naa.`` followed by lower-case hex digits (16 for NAA types 2, 5
and 6 in their 8-byte forms, 32 for NAA 6 registered-extended), as targetcli prints it.
Fibre-Channel tools print WWPNs with colons (``50:01:43:80:12:34:56:78``); both are
accepted on input and converted here only.

NAA type 5 ("IEEE Registered", SPC-4 7.8.6.6.4) packs a 24-bit IEEE company id (OUI)
and a 36-bit vendor-specific identifier into 8 bytes: ``5 | OUI(24) | VSID(36)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_HEX_RE = re.compile(r"^[0-9a-f]+$")

#: Company id used for every WWN vfdirect makes up itself (a locally administered,
#: documentation-range OUI; it is only ever seen inside one vfdirect fabric).
VFDIRECT_OUI = 0x0A_F1_DE


class WwnError(ValueError):
    """A text or byte string is not a well-formed World Wide Name."""


@dataclass(frozen=True, order=True, slots=True)
class Wwn:
    """A World Wide Name (port, node or logical-unit name) held as its raw bytes."""

    raw: bytes

    def __post_init__(self) -> None:
        if len(self.raw) not in (8, 16):
            raise WwnError(f"a WWN is 8 or 16 bytes, not {len(self.raw)}")
        naa = self.raw[0] >> 4
        if len(self.raw) == 16 and naa != 6:
            raise WwnError(f"a 16-byte WWN must be NAA type 6, not {naa}")
        if len(self.raw) == 8 and naa not in (1, 2, 3, 5):
            raise WwnError(f"an 8-byte WWN must be NAA type 1, 2, 3 or 5, not {naa}")

    @property
    def naa_type(self) -> int:
        return self.raw[0] >> 4

    @classmethod
    def parse(cls, text: str) -> Wwn:
        """Accept ``naa.5…``, ``0x5…``, ``5…`` or colon-separated bytes; case-insensitive."""
        t = text.strip().lower()
        if t.startswith("naa."):
            t = t[4:]
        elif t.startswith("0x"):
            t = t[2:]
        if ":" in t:
            parts = t.split(":")
            if not all(len(p) == 2 for p in parts):
                raise WwnError(f"{text!r}: colon form needs two hex digits per byte")
            t = "".join(parts)
        if len(t) not in (16, 32) or not _HEX_RE.match(t):
            raise WwnError(f"{text!r} is not a WWN (expected 16 or 32 hex digits, e.g. naa.5…)")
        return cls(bytes.fromhex(t))

    @classmethod
    def naa5(cls, vendor_specific: int, oui: int = VFDIRECT_OUI) -> Wwn:
        """Build an NAA type 5 (IEEE Registered) name from a company id and a 36-bit id."""
        if not 0 <= oui < 1 << 24:
            raise WwnError(f"OUI {oui:#x} does not fit in 24 bits")
        if not 0 <= vendor_specific < 1 << 36:
            raise WwnError(f"vendor-specific id {vendor_specific:#x} does not fit in 36 bits")
        value = (5 << 60) | (oui << 36) | vendor_specific
        return cls(value.to_bytes(8, "big"))

    @property
    def vendor_specific(self) -> int:
        """The 36-bit vendor-specific identifier of an NAA type 5 name."""
        if self.naa_type != 5:
            raise WwnError(f"{self} is NAA type {self.naa_type}, not 5")
        return int.from_bytes(self.raw, "big") & ((1 << 36) - 1)

    def canonical(self) -> str:
        return "naa." + self.raw.hex()

    def colon(self) -> str:
        """Fibre-Channel text form, ``50:0a:f1:…``."""
        return ":".join(f"{b:02x}" for b in self.raw)

    def as_int(self) -> int:
        return int.from_bytes(self.raw, "big")

    def __str__(self) -> str:
        return self.canonical()
