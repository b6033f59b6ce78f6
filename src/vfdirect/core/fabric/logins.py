"""Fabric logins: FLOGI, FDISC and LOGO, and the N_Port IDs they assign.

Rules of this module:

* a port name (WWPN) has at most one login at a time; a second FLOGI or FDISC with the
  same name is rejected with :class:`DuplicatePortName`, never silently replaced;
* FLOGI (FC-LS, Fabric Login) logs in a physical N_Port; FDISC (FC-LS, Discover F_Port
  Service Parameters, the NPIV login) logs in an additional virtual N_Port *through* a
  physical N_Port that already did FLOGI;
* an N_Port ID is the 24-bit address identifier of FC-FS: Domain_ID (bits 23..16),
  Area_ID (15..8), Port_ID (7..0). The fabric here is a single switch domain. A physical
  port gets a whole area (Port_ID 00h); its NPIV ports get Port_IDs 01h..FFh of the same
  area, as NPIV-capable switches commonly assign them. Both always take the lowest free
  value, so assignment is a pure function of the login history;
* LOGO of a physical port ends the logins of its NPIV ports too (their FDISC rode on its
  FLOGI: FC-LS implicit logout);
* logins are runtime state: they are not part of the fabric configuration dump (a
  restarted adapter logs its ports in again), but the table dumps and loads on its own
  for inspection and for tests.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NewType

from vfdirect.core.array import dump_field, parse_wwn
from vfdirect.core.fabric.errors import (
    DuplicatePortName,
    FabricConfigError,
    NotLoggedInError,
    NPortIdsExhausted,
    ParentNotLoggedIn,
)
from vfdirect.core.wwn import Wwn

#: A 24-bit Fibre Channel address identifier (FC-FS), as assigned by a fabric login.
NPortId = NewType("NPortId", int)

#: Domain_IDs a switch may hold (FC-SW: 01h..EFh; F0h..FFh are reserved or well-known
#: addresses such as FFFFFEh, the F_Port login server).
MIN_DOMAIN_ID = 0x01
MAX_DOMAIN_ID = 0xEF

_AREAS = 256
_NPIV_PORTS = range(0x01, 0x100)

LOGINS_FORMAT = "vfdirect.fabric-logins"
LOGINS_VERSION = 1


def nport_id_text(nport_id: int) -> str:
    """FC tools print N_Port IDs as six hex digits (``0x010200``)."""
    return f"0x{nport_id:06x}"


@dataclass(frozen=True, slots=True)
class Login:
    """One accepted fabric login."""

    wwpn: Wwn
    wwnn: Wwn
    nport_id: NPortId
    #: The physical port's WWPN for an FDISC (NPIV) login; ``None`` for FLOGI.
    parent: Wwn | None = None

    @property
    def is_npiv(self) -> bool:
        return self.parent is not None

    @property
    def domain_id(self) -> int:
        return self.nport_id >> 16

    @property
    def area_id(self) -> int:
        return (self.nport_id >> 8) & 0xFF

    @property
    def port_id(self) -> int:
        return self.nport_id & 0xFF

    def dump(self) -> dict[str, Any]:
        return {
            "wwpn": self.wwpn.canonical(),
            "wwnn": self.wwnn.canonical(),
            "nport_id": int(self.nport_id),
            "parent": None if self.parent is None else self.parent.canonical(),
        }


class LoginTable:
    """The fabric's login server state: who is logged in, under which N_Port ID."""

    def __init__(self, domain_id: int = MIN_DOMAIN_ID) -> None:
        if not MIN_DOMAIN_ID <= domain_id <= MAX_DOMAIN_ID:
            raise FabricConfigError(
                f"Domain_ID {domain_id:#x} is not in {MIN_DOMAIN_ID:#x}..{MAX_DOMAIN_ID:#x}"
            )
        self._domain_id = domain_id
        self._by_wwpn: dict[Wwn, Login] = {}
        self._by_nport_id: dict[int, Login] = {}
        #: area -> WWPN of the physical port holding it
        self._areas: dict[int, Wwn] = {}
        #: physical WWPN -> WWPNs of its NPIV ports
        self._children: dict[Wwn, set[Wwn]] = {}

    @property
    def domain_id(self) -> int:
        return self._domain_id

    # -- queries ---------------------------------------------------------------------

    def __contains__(self, wwpn: object) -> bool:
        return wwpn in self._by_wwpn

    def __len__(self) -> int:
        return len(self._by_wwpn)

    def __iter__(self) -> Iterator[Login]:
        return iter(self.logins())

    def get(self, wwpn: Wwn) -> Login | None:
        return self._by_wwpn.get(wwpn)

    def by_nport_id(self, nport_id: int) -> Login | None:
        return self._by_nport_id.get(nport_id)

    def logins(self) -> tuple[Login, ...]:
        """Every login, in N_Port ID order."""
        return tuple(self._by_nport_id[k] for k in sorted(self._by_nport_id))

    def npiv_ports(self, physical: Wwn) -> tuple[Login, ...]:
        """The NPIV logins riding on ``physical``'s FLOGI, in N_Port ID order."""
        kids = (self._by_wwpn[w] for w in self._children.get(physical, ()))
        return tuple(sorted(kids, key=lambda lg: lg.nport_id))

    # -- login server ----------------------------------------------------------------

    def flogi(self, wwpn: Wwn, wwnn: Wwn) -> Login:
        """Fabric Login of a physical N_Port: a fresh area, Port_ID 00h."""
        self._refuse_duplicate(wwpn)
        area = next((a for a in range(_AREAS) if a not in self._areas), None)
        if area is None:
            raise NPortIdsExhausted(
                f"FLOGI {wwpn}: every area of domain {self._domain_id:#04x} is in use"
            )
        login = Login(wwpn, wwnn, NPortId((self._domain_id << 16) | (area << 8)))
        self._areas[area] = wwpn
        self._children[wwpn] = set()
        self._add(login)
        return login

    def fdisc(self, parent: Wwn, wwpn: Wwn, wwnn: Wwn) -> Login:
        """NPIV login of a virtual N_Port through the physical port ``parent``."""
        self._refuse_duplicate(wwpn)
        plogin = self._by_wwpn.get(parent)
        if plogin is None or plogin.is_npiv:
            raise ParentNotLoggedIn(
                f"FDISC {wwpn}: physical port {parent} has no FLOGI"
                + ("" if plogin is None else " (it is itself an NPIV port)")
            )
        used = {self._by_wwpn[w].port_id for w in self._children[parent]}
        port = next((p for p in _NPIV_PORTS if p not in used), None)
        if port is None:
            raise NPortIdsExhausted(
                f"FDISC {wwpn}: area of {parent} has no free Port_ID for another NPIV port"
            )
        login = Login(wwpn, wwnn, NPortId(plogin.nport_id | port), parent)
        self._children[parent].add(wwpn)
        self._add(login)
        return login

    def logo(self, wwpn: Wwn) -> tuple[Login, ...]:
        """Logout; returns the logins it ended (NPIV ports first, for a physical port)."""
        login = self._by_wwpn.get(wwpn)
        if login is None:
            raise NotLoggedInError(f"LOGO {wwpn}: the port is not logged in")
        ended: list[Login] = []
        if login.parent is None:
            ended.extend(self.npiv_ports(wwpn))
            for kid in ended:
                self._remove(kid)
            del self._children[wwpn]
            del self._areas[login.area_id]
        else:
            self._children[login.parent].discard(wwpn)
        self._remove(login)
        ended.append(login)
        return tuple(ended)

    # -- dump/load ---------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """Plain data: FLOGI logins before the FDISC logins that depend on them."""
        ordered = sorted(self.logins(), key=lambda lg: (lg.is_npiv, lg.nport_id))
        return {
            "format": LOGINS_FORMAT,
            "version": LOGINS_VERSION,
            "domain_id": self._domain_id,
            "logins": [lg.dump() for lg in ordered],
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> LoginTable:
        """Rebuild a table; every login keeps its N_Port ID, which is checked to be one
        the login server could have assigned."""
        err = FabricConfigError
        if dump_field(data, "format", str, err) != LOGINS_FORMAT:
            raise err(f"not a {LOGINS_FORMAT} dump")
        if dump_field(data, "version", int, err) != LOGINS_VERSION:
            raise err(f"unsupported {LOGINS_FORMAT} version {data['version']}")
        table = cls(dump_field(data, "domain_id", int, err))
        for item in dump_field(data, "logins", list, err):
            if not isinstance(item, Mapping):
                raise err(f"login entry {item!r} is not an object")
            wwpn = parse_wwn(dump_field(item, "wwpn", str, err), "wwpn", err)
            wwnn = parse_wwn(dump_field(item, "wwnn", str, err), "wwnn", err)
            nport_id = dump_field(item, "nport_id", int, err)
            parent_text = item.get("parent")
            parent = None if parent_text is None else parse_wwn(parent_text, "parent", err)
            table._restore(Login(wwpn, wwnn, NPortId(nport_id), parent))
        return table

    # -- internals ---------------------------------------------------------------------

    def _refuse_duplicate(self, wwpn: Wwn) -> None:
        existing = self._by_wwpn.get(wwpn)
        if existing is not None:
            raise DuplicatePortName(
                f"port name {wwpn} is already logged in as N_Port ID "
                f"{nport_id_text(existing.nport_id)}"
            )

    def _add(self, login: Login) -> None:
        self._by_wwpn[login.wwpn] = login
        self._by_nport_id[login.nport_id] = login

    def _remove(self, login: Login) -> None:
        del self._by_wwpn[login.wwpn]
        del self._by_nport_id[login.nport_id]

    def _restore(self, login: Login) -> None:
        err = FabricConfigError
        if login.wwpn in self._by_wwpn:
            raise err(f"dump logs in {login.wwpn} twice")
        if login.nport_id in self._by_nport_id or login.domain_id != self._domain_id:
            raise err(f"dump gives {login.wwpn} an impossible N_Port ID {login.nport_id:#x}")
        if login.parent is None:
            if login.port_id != 0 or login.area_id in self._areas:
                raise err(f"FLOGI {login.wwpn}: N_Port ID {login.nport_id:#x} is not a free area")
            self._areas[login.area_id] = login.wwpn
            self._children[login.wwpn] = set()
        else:
            plogin = self._by_wwpn.get(login.parent)
            if plogin is None or plogin.is_npiv:
                raise err(f"FDISC {login.wwpn}: parent {login.parent} has no FLOGI in the dump")
            if login.port_id == 0 or login.area_id != plogin.area_id:
                raise err(f"FDISC {login.wwpn}: N_Port ID outside its parent's area")
            self._children[login.parent].add(login.wwpn)
        self._add(login)
