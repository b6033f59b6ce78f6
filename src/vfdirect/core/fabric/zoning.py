"""Zoning: named zones of port names (WWPN "soft" zoning, as FC-GS zone servers hold it).

Rules of this module:

* a zone is a name and a set of member WWPNs; two ports see each other exactly when
  some zone holds both (a port may be in several zones);
* zone names follow the FC-GS zone-name rules most switches enforce: a letter, then up
  to 63 letters, digits, ``_``, ``-``, ``$`` or ``^``;
* every change bumps :attr:`Zoning.generation`, so that a cache of "who sees whom" (the
  fabric's) knows when to forget, and a change takes effect on the very next IO.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from vfdirect.core.array import dump_field, parse_wwn
from vfdirect.core.fabric.errors import FabricConfigError
from vfdirect.core.wwn import Wwn

_ZONE_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_$^-]{0,63}$")


def check_zone_name(name: str) -> str:
    if not isinstance(name, str) or not _ZONE_NAME.match(name):
        raise FabricConfigError(
            f"zone name {name!r}: a letter, then up to 63 letters, digits, _ - $ ^"
        )
    return name


class Zoning:
    """The active zone set."""

    def __init__(self) -> None:
        self._zones: dict[str, set[Wwn]] = {}
        self._member_of: dict[Wwn, set[str]] = {}
        self.generation = 0

    def zones(self) -> dict[str, frozenset[Wwn]]:
        return {name: frozenset(members) for name, members in sorted(self._zones.items())}

    def members(self, name: str) -> frozenset[Wwn]:
        return frozenset(self._zone(name))

    def zones_of(self, wwpn: Wwn) -> frozenset[str]:
        return frozenset(self._member_of.get(wwpn, ()))

    def share_zone(self, a: Wwn, b: Wwn) -> bool:
        za = self._member_of.get(a)
        zb = self._member_of.get(b)
        return bool(za and zb and not za.isdisjoint(zb))

    def zone_create(self, name: str, members: Iterable[Wwn] = ()) -> None:
        check_zone_name(name)
        if name in self._zones:
            raise FabricConfigError(f"zone {name!r} already exists")
        self._zones[name] = set()
        self.zone_member_add(name, members)

    def zone_delete(self, name: str) -> None:
        self.zone_member_remove(name, tuple(self._zone(name)))
        del self._zones[name]
        self.generation += 1

    def zone_member_add(self, name: str, members: Iterable[Wwn]) -> None:
        zone = self._zone(name)
        for wwpn in members:
            zone.add(wwpn)
            self._member_of.setdefault(wwpn, set()).add(name)
        self.generation += 1

    def zone_member_remove(self, name: str, members: Iterable[Wwn]) -> None:
        zone = self._zone(name)
        for wwpn in members:
            if wwpn not in zone:
                raise FabricConfigError(f"{wwpn} is not a member of zone {name!r}")
            zone.discard(wwpn)
            of = self._member_of[wwpn]
            of.discard(name)
            if not of:
                del self._member_of[wwpn]
        self.generation += 1

    def dump(self) -> list[dict[str, Any]]:
        return [
            {"name": name, "members": sorted(w.canonical() for w in members)}
            for name, members in sorted(self._zones.items())
        ]

    @classmethod
    def load(cls, data: Sequence[Mapping[str, Any]]) -> Zoning:
        zoning = cls()
        err = FabricConfigError
        for item in data:
            if not isinstance(item, Mapping):
                raise err(f"zone entry {item!r} is not an object")
            members = dump_field(item, "members", list, err)
            zoning.zone_create(
                dump_field(item, "name", str, err),
                (parse_wwn(m, "zone member", err) for m in members),
            )
        return zoning

    def _zone(self, name: str) -> set[Wwn]:
        zone = self._zones.get(name)
        if zone is None:
            raise FabricConfigError(f"no zone named {name!r}")
        return zone
