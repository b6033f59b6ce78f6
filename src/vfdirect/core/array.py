"""The pure model of a storage array: physical LUN identities and their geometry.

Rules of this module:

* a physical LUN is named by the pair (array WWN, LUN number), :class:`LunKey`; nothing
  else (a path, a file descriptor) identifies it outside :mod:`vfdirect.storage`;
* :class:`PhysicalLun` is the geometry every layer agrees on: block size and capacity
  in blocks; the backing (file or block device) is the shell's business;
* every record dumps to plain, JSON-able data and ``load(dump(x)) == x``.

The fabric (:mod:`vfdirect.core.fabric`) masks LUNs by :class:`LunKey`; the datastore
allocator (:mod:`vfdirect.core.alloc`) carves extents out of :class:`PhysicalLun` s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn, WwnError

#: Logical block sizes a physical LUN may have (SBC-3 READ CAPACITY(16) reports any
#: size, but the data path and the allocator are written for these two).
BLOCK_SIZES = (512, 4096)

#: Highest LUN number: SAM-5 flat / single-level peripheral addressing carries 14 bits.
MAX_LUN = 16383


class ArrayModelError(ValueError):
    """A LUN key or geometry is malformed (bad LUN number, block size or dump)."""


def _check_lun_number(lun: int) -> LunNumber:
    if isinstance(lun, bool) or not isinstance(lun, int) or not 0 <= lun <= MAX_LUN:
        raise ArrayModelError(f"LUN number {lun!r} is not in 0..{MAX_LUN}")
    return LunNumber(lun)


def dump_field(
    data: Mapping[str, Any], name: str, kind: type, error: type[ValueError] = ArrayModelError
) -> Any:
    """Field ``name`` of a dump, checked to be a ``kind`` (``bool`` is not an ``int``
    here), or ``error`` naming the field: loaders never fail with ``KeyError``."""
    try:
        value = data[name]
    except (KeyError, TypeError, IndexError) as exc:
        raise error(f"dump lacks field {name!r}") from exc
    if isinstance(value, bool) and kind is not bool:
        raise error(f"field {name!r} must be {kind.__name__}, not bool")
    if not isinstance(value, kind):
        raise error(f"field {name!r} must be {kind.__name__}, not {value!r}")
    return value


def parse_wwn(text: object, what: str, error: type[ValueError] = ArrayModelError) -> Wwn:
    """A WWN from a dump, with ``error`` on anything malformed."""
    if not isinstance(text, str):
        raise error(f"{what} must be a WWN string, not {text!r}")
    try:
        return Wwn.parse(text)
    except WwnError as exc:
        raise error(f"{what}: {exc}") from exc


@dataclass(frozen=True, order=True, slots=True)
class LunKey:
    """A physical LUN's identity in the fabric: its array's WWN and its LUN number."""

    array: Wwn
    lun: LunNumber

    def __post_init__(self) -> None:
        _check_lun_number(self.lun)

    def __str__(self) -> str:
        return f"{self.array.canonical()}/{self.lun}"

    def dump(self) -> dict[str, Any]:
        return {"array": self.array.canonical(), "lun": int(self.lun)}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> LunKey:
        array = parse_wwn(dump_field(data, "array", str), "array")
        return cls(array, _check_lun_number(dump_field(data, "lun", int)))


@dataclass(frozen=True, order=True, slots=True)
class PhysicalLun:
    """A physical LUN's geometry: ``num_blocks`` blocks of ``block_size`` bytes."""

    key: LunKey
    block_size: int
    num_blocks: int

    def __post_init__(self) -> None:
        if self.block_size not in BLOCK_SIZES:
            raise ArrayModelError(
                f"{self.key}: block size {self.block_size} is not one of {BLOCK_SIZES}"
            )
        if isinstance(self.num_blocks, bool) or self.num_blocks < 1:
            raise ArrayModelError(f"{self.key}: capacity must be at least one block")

    @property
    def size_bytes(self) -> int:
        return self.block_size * self.num_blocks

    def dump(self) -> dict[str, Any]:
        return {
            **self.key.dump(),
            "block_size": self.block_size,
            "num_blocks": self.num_blocks,
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> PhysicalLun:
        return cls(
            LunKey.load(data),
            dump_field(data, "block_size", int),
            dump_field(data, "num_blocks", int),
        )


def target_port_wwpn(array: Wwn, index: int) -> Wwn:
    """The default WWPN of target port ``index`` (0..14) of an NAA-5 array.

    Scheme (vfdirect's own, documented so that names never collide): an array WWN uses
    a vendor-specific id below 2**32; its target port ``i`` has the same company id and
    the vendor-specific id with ``i + 1`` in the top nibble (bits 32..35). Arrays that do
    not follow the scheme must be given explicit port names.
    """
    if array.naa_type != 5:
        raise ArrayModelError(f"{array}: default port names need an NAA-5 array WWN")
    if not 0 <= index < 15:
        raise ArrayModelError(f"target port index {index} is not in 0..14")
    vsid = array.vendor_specific
    if vsid >> 32:
        raise ArrayModelError(
            f"{array}: vendor-specific id {vsid:#x} uses bits 32..35, which name target "
            "ports; give explicit target port WWPNs"
        )
    oui = (array.as_int() >> 36) & 0xFF_FFFF
    return Wwn.naa5(((index + 1) << 32) | vsid, oui=oui)
