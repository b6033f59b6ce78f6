"""LUN masking: which initiator port may address which physical LUN.

Rules of this module:

* the access list is keyed by the initiator's port name, the N_Port_Name an FC
  TransportID carries (SPC-4 7.6.4.2); an entry names a logical unit by (array WWN,
  LUN number): SPC-4's access controls (8.3) in their everyday form, an ACL per
  initiator port, like rtslib's node ACL -> mapped LUN;
* "masking a LUN to an initiator" grants access; revoking withdraws it. Both are idempotent
  and take effect on the next IO, because every IO asks :meth:`LunMasking.is_masked`;
* lookups allocate nothing (nested dicts, no tuple keys): they run on every IO.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from vfdirect.core.array import LunKey, dump_field, parse_wwn
from vfdirect.core.fabric.errors import FabricConfigError
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn


class LunMasking:
    """Initiator WWPN -> array WWN -> set of LUN numbers it may address."""

    def __init__(self) -> None:
        self._acl: dict[Wwn, dict[Wwn, set[int]]] = {}

    def is_masked(self, initiator: Wwn, array: Wwn, lun: int) -> bool:
        by_array = self._acl.get(initiator)
        if by_array is None:
            return False
        luns = by_array.get(array)
        return luns is not None and lun in luns

    def grant(self, initiator: Wwn, key: LunKey) -> bool:
        """Mask ``key`` to ``initiator``; False if it already was."""
        luns = self._acl.setdefault(initiator, {}).setdefault(key.array, set())
        if key.lun in luns:
            return False
        luns.add(key.lun)
        return True

    def revoke(self, initiator: Wwn, key: LunKey) -> bool:
        """Withdraw ``key`` from ``initiator``; False if it was not masked to it."""
        by_array = self._acl.get(initiator)
        luns = None if by_array is None else by_array.get(key.array)
        if by_array is None or luns is None or key.lun not in luns:
            return False
        luns.discard(key.lun)
        if not luns:
            del by_array[key.array]
        if not by_array:
            del self._acl[initiator]
        return True

    def revoke_all(self, initiator: Wwn) -> tuple[LunKey, ...]:
        """Withdraw every LUN from ``initiator`` (a deleted virtual port)."""
        keys = self.luns_of(initiator)
        self._acl.pop(initiator, None)
        return keys

    def luns_of(self, initiator: Wwn) -> tuple[LunKey, ...]:
        by_array = self._acl.get(initiator, {})
        return tuple(
            sorted(LunKey(a, LunNumber(n)) for a, luns in by_array.items() for n in luns)
        )

    def initiators_of(self, key: LunKey) -> tuple[Wwn, ...]:
        return tuple(
            sorted(i for i, by in self._acl.items() if key.lun in by.get(key.array, ()))
        )

    def dump(self) -> list[dict[str, Any]]:
        return [
            {"initiator": initiator.canonical(), "array": array.canonical(), "luns": sorted(luns)}
            for initiator, by_array in sorted(self._acl.items())
            for array, luns in sorted(by_array.items())
        ]

    @classmethod
    def load(cls, data: Sequence[Mapping[str, Any]]) -> LunMasking:
        masking = cls()
        err = FabricConfigError
        for item in data:
            if not isinstance(item, Mapping):
                raise err(f"masking entry {item!r} is not an object")
            initiator = parse_wwn(dump_field(item, "initiator", str, err), "initiator", err)
            array = parse_wwn(dump_field(item, "array", str, err), "array", err)
            for lun in dump_field(item, "luns", list, err):
                try:
                    key = LunKey(array, LunNumber(lun))
                except (ValueError, TypeError) as exc:
                    raise err(f"masking entry for {initiator}: {exc}") from exc
                masking.grant(initiator, key)
        return masking
