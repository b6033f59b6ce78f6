"""What a logical unit or a target says about itself in INQUIRY data.

Rules of this module:

* identities are frozen records, checked when built: a string that INQUIRY cannot carry
  (SPC-4 4.4.1: ASCII fields hold only the graphic codes 20h-7Eh) is refused here, with
  :class:`IdentityError`, not found out while answering a guest;
* every record dumps to plain JSON-able data and ``load(dump(x)) == x``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vfdirect.core.scsi.opcodes import ProtocolIdentifier
from vfdirect.core.wwn import Wwn, WwnError

VENDOR_LEN = 8
PRODUCT_LEN = 16
REVISION_LEN = 4
#: Longest unit serial number accepted (VPD 80h allows more; this keeps the T10 vendor
#: id designator of VPD 83h, vendor + serial, well under its 255-byte limit).
MAX_SERIAL_LEN = 64


class IdentityError(ValueError):
    """An identity field cannot be carried in INQUIRY data, or a dump is malformed."""


def _ascii(value: object, what: str, max_len: int, *, allow_empty: bool = True) -> str:
    if not isinstance(value, str):
        raise IdentityError(f"{what} must be a string, not {value!r}")
    if len(value) > max_len:
        raise IdentityError(f"{what} {value!r} is longer than {max_len} characters")
    if not allow_empty and not value:
        raise IdentityError(f"{what} must not be empty")
    if any(not 0x20 <= ord(c) <= 0x7E for c in value):
        raise IdentityError(f"{what} {value!r} has characters outside ASCII 20h-7Eh")
    return value


def padded(value: str, length: int) -> bytes:
    """An ASCII INQUIRY field: left-aligned, padded with spaces (SPC-4 4.4.1)."""
    return value.encode("ascii").ljust(length, b" ")


def _field(data: Mapping[str, Any], name: str, kind: type) -> Any:
    try:
        value = data[name]
    except (KeyError, TypeError) as exc:
        raise IdentityError(f"identity dump lacks field {name!r}") from exc
    if isinstance(value, bool) and kind is not bool:
        raise IdentityError(f"field {name!r} must be {kind.__name__}, not bool")
    if not isinstance(value, kind):
        raise IdentityError(f"field {name!r} must be {kind.__name__}, not {value!r}")
    return value


def _wwn(text: object, what: str) -> Wwn:
    if not isinstance(text, str):
        raise IdentityError(f"{what} must be a WWN string, not {text!r}")
    try:
        return Wwn.parse(text)
    except WwnError as exc:
        raise IdentityError(f"{what}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class TargetIdentity:
    """INQUIRY strings a target returns for a LUN that has no logical unit (standard data
    with peripheral qualifier 011b, SPC-4 6.6.2)."""

    vendor: str = "VFDIRECT"
    product: str = "VIRTUAL TARGET"
    revision: str = "0001"

    def __post_init__(self) -> None:
        _ascii(self.vendor, "vendor", VENDOR_LEN)
        _ascii(self.product, "product", PRODUCT_LEN)
        _ascii(self.revision, "revision", REVISION_LEN)

    def dump(self) -> dict[str, Any]:
        return {"vendor": self.vendor, "product": self.product, "revision": self.revision}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> TargetIdentity:
        return cls(
            vendor=_field(data, "vendor", str),
            product=_field(data, "product", str),
            revision=_field(data, "revision", str),
        )


@dataclass(frozen=True, slots=True)
class BlockLimits:
    """The Block Limits VPD page values (SBC-3), in logical blocks; 0 means "no limit /
    not reported" as SBC-3 defines for each field."""

    #: MAXIMUM TRANSFER LENGTH: a READ/WRITE asking for more is an invalid field.
    max_transfer_blocks: int = 0
    #: OPTIMAL TRANSFER LENGTH GRANULARITY.
    optimal_granularity_blocks: int = 0
    #: OPTIMAL TRANSFER LENGTH.
    optimal_transfer_blocks: int = 0

    def __post_init__(self) -> None:
        for name, bits in (
            ("max_transfer_blocks", 32),
            ("optimal_granularity_blocks", 16),
            ("optimal_transfer_blocks", 32),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise IdentityError(f"{name} must be an int, not {value!r}")
            if not 0 <= value < 1 << bits:
                raise IdentityError(f"{name}={value} does not fit {bits} bits")

    def dump(self) -> dict[str, Any]:
        return {
            "max_transfer_blocks": self.max_transfer_blocks,
            "optimal_granularity_blocks": self.optimal_granularity_blocks,
            "optimal_transfer_blocks": self.optimal_transfer_blocks,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> BlockLimits:
        return cls(
            max_transfer_blocks=_field(data, "max_transfer_blocks", int),
            optimal_granularity_blocks=_field(data, "optimal_granularity_blocks", int),
            optimal_transfer_blocks=_field(data, "optimal_transfer_blocks", int),
        )


@dataclass(frozen=True, slots=True)
class LuIdentity:
    """Identity of one emulated SBC direct-access logical unit.

    ``wwn`` becomes the NAA designator of VPD page 83h (association: logical unit); the
    optional ``target_port_wwn`` and ``relative_target_port`` add target port
    designators (association: target port, PIV set with ``protocol``).
    """

    vendor: str
    product: str
    revision: str
    serial: str
    wwn: Wwn
    target_port_wwn: Wwn | None = None
    relative_target_port: int | None = None
    protocol: ProtocolIdentifier = ProtocolIdentifier.FCP
    limits: BlockLimits = field(default_factory=BlockLimits)
    #: LOGICAL BLOCKS PER PHYSICAL BLOCK EXPONENT of READ CAPACITY(16) (SBC-3).
    physical_block_exponent: int = 0

    def __post_init__(self) -> None:
        _ascii(self.vendor, "vendor", VENDOR_LEN)
        _ascii(self.product, "product", PRODUCT_LEN)
        _ascii(self.revision, "revision", REVISION_LEN)
        _ascii(self.serial, "serial", MAX_SERIAL_LEN, allow_empty=False)
        if not isinstance(self.wwn, Wwn):
            raise IdentityError(f"wwn must be a Wwn, not {self.wwn!r}")
        if self.target_port_wwn is not None and not isinstance(self.target_port_wwn, Wwn):
            raise IdentityError(f"target_port_wwn must be a Wwn, not {self.target_port_wwn!r}")
        rtp = self.relative_target_port
        # SPC-4 relative target port designator: identifier 0 is reserved, 1..FFFFh valid.
        if rtp is not None and (
            isinstance(rtp, bool) or not isinstance(rtp, int) or not 1 <= rtp <= 0xFFFF
        ):
            raise IdentityError(f"relative_target_port {rtp!r} is not 1..65535")
        if not isinstance(self.limits, BlockLimits):
            raise IdentityError(f"limits must be BlockLimits, not {self.limits!r}")
        exp = self.physical_block_exponent
        if isinstance(exp, bool) or not isinstance(exp, int) or not 0 <= exp <= 15:
            raise IdentityError(f"physical_block_exponent {exp!r} is not 0..15")
        if self.protocol not in set(ProtocolIdentifier):
            raise IdentityError(f"protocol {self.protocol!r} is not a protocol identifier")

    def dump(self) -> dict[str, Any]:
        return {
            "vendor": self.vendor,
            "product": self.product,
            "revision": self.revision,
            "serial": self.serial,
            "wwn": self.wwn.canonical(),
            "target_port_wwn": (self.target_port_wwn.canonical() if self.target_port_wwn else None),
            "relative_target_port": self.relative_target_port,
            "protocol": int(self.protocol),
            "limits": self.limits.dump(),
            "physical_block_exponent": self.physical_block_exponent,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> LuIdentity:
        tpw = data.get("target_port_wwn") if isinstance(data, Mapping) else None
        rtp = data.get("relative_target_port") if isinstance(data, Mapping) else None
        protocol = _field(data, "protocol", int)
        try:
            proto = ProtocolIdentifier(protocol)
        except ValueError as exc:
            raise IdentityError(f"protocol {protocol!r} is not a protocol identifier") from exc
        if rtp is not None and (isinstance(rtp, bool) or not isinstance(rtp, int)):
            raise IdentityError(f"relative_target_port must be an int, not {rtp!r}")
        limits = _field(data, "limits", Mapping)
        return cls(
            vendor=_field(data, "vendor", str),
            product=_field(data, "product", str),
            revision=_field(data, "revision", str),
            serial=_field(data, "serial", str),
            wwn=_wwn(_field(data, "wwn", str), "wwn"),
            target_port_wwn=None if tpw is None else _wwn(tpw, "target_port_wwn"),
            relative_target_port=rtp,
            protocol=proto,
            limits=BlockLimits.load(limits),
            physical_block_exponent=_field(data, "physical_block_exponent", int),
        )
