"""The fabric: target ports, logins, zoning and LUN masking, and the one IO check.

Rules of this module:

* :meth:`Fabric.authorize` is the single check an IO passes before it reaches a physical
  LUN; it asks, in this order, "is the initiator logged in?", "does it share a zone with
  a target port of the array?", "is the LUN masked to it?", and raises the
  :class:`~vfdirect.core.block.AccessDenied` subclass naming the first rule that refused;
* it reads the current configuration on every call, so a grant, revoke, zoning change or
  logout takes effect on the next IO; the only cache (zone visibility) is dropped on
  every zoning or target-port change;
* target ports are configuration: an array port is taken to be online while it is
  configured (the array is always up in vfdirect), so they do not log in;
* :meth:`Fabric.dump` is the configuration only (target ports, zones, masking). Logins
  are runtime state, :meth:`LoginTable.dump`, kept out of the configuration on purpose:
  restoring a configuration must not resurrect logins of ports whose adapter is gone.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from vfdirect.core.array import LunKey, dump_field, parse_wwn
from vfdirect.core.fabric.errors import (
    DuplicatePortName,
    FabricConfigError,
    NotLoggedIn,
    NotMasked,
    NotZoned,
)
from vfdirect.core.fabric.logins import Login, LoginTable, nport_id_text
from vfdirect.core.fabric.masking import LunMasking
from vfdirect.core.fabric.zoning import Zoning
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn

FABRIC_FORMAT = "vfdirect.fabric"
FABRIC_VERSION = 1


class Fabric:
    """One switched fabric (a single domain) between adapters and storage arrays."""

    def __init__(self, domain_id: int = 0x01) -> None:
        self._logins = LoginTable(domain_id)
        self._zoning = Zoning()
        self._masking = LunMasking()
        #: target port WWPN -> array WWN
        self._targets: dict[Wwn, Wwn] = {}
        #: array WWN -> its target ports
        self._array_ports: dict[Wwn, set[Wwn]] = {}
        self._targets_generation = 0
        # (initiator, array) -> shares a zone with some port of the array
        self._visible: dict[Wwn, dict[Wwn, bool]] = {}
        self._visible_zoning_gen = -1
        self._visible_targets_gen = -1

    @property
    def domain_id(self) -> int:
        return self._logins.domain_id

    @property
    def logins(self) -> LoginTable:
        """The login server state (read it; change it through flogi/fdisc/logo)."""
        return self._logins

    @property
    def zoning(self) -> Zoning:
        return self._zoning

    @property
    def masking(self) -> LunMasking:
        return self._masking

    # -- the IO check ------------------------------------------------------------------

    def authorize(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> None:
        """Let one IO from ``initiator`` to LUN ``lun`` of ``array`` pass, or raise
        :class:`NotLoggedIn`, :class:`NotZoned` or :class:`NotMasked`."""
        if initiator not in self._logins:
            raise NotLoggedIn(f"initiator {initiator} is not logged in to the fabric")
        if not self._sees(initiator, array):
            raise NotZoned(
                f"initiator {initiator} shares no zone with a target port of array {array}"
            )
        if not self._masking.is_masked(initiator, array, lun):
            raise NotMasked(f"LUN {lun} of array {array} is not masked to initiator {initiator}")

    def is_authorized(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> bool:
        return (
            initiator in self._logins
            and self._sees(initiator, array)
            and self._masking.is_masked(initiator, array, lun)
        )

    def visible_luns(self, initiator: Wwn) -> tuple[LunKey, ...]:
        """LUNs the port could address once logged in: masked to it on a zoned array
        (what a migration destination checks before it takes a virtual port over)."""
        return tuple(k for k in self._masking.luns_of(initiator) if self._sees(initiator, k.array))

    # -- logins ------------------------------------------------------------------------

    def flogi(self, wwpn: Wwn, wwnn: Wwn) -> Login:
        """FC-LS FLOGI of a physical initiator port; returns the login with its N_Port ID."""
        self._refuse_target_name(wwpn)
        return self._logins.flogi(wwpn, wwnn)

    def fdisc(self, parent: Wwn, wwpn: Wwn, wwnn: Wwn) -> Login:
        """FC-LS FDISC (NPIV) of virtual port ``wwpn`` through physical port ``parent``."""
        self._refuse_target_name(wwpn)
        return self._logins.fdisc(parent, wwpn, wwnn)

    def logo(self, wwpn: Wwn) -> tuple[Login, ...]:
        """FC-LS LOGO; a physical port's NPIV ports are logged out with it."""
        return self._logins.logo(wwpn)

    # -- target ports ------------------------------------------------------------------

    def target_port_add(self, wwpn: Wwn, array: Wwn) -> None:
        owner = self._targets.get(wwpn)
        if owner == array:
            return
        if owner is not None:
            raise FabricConfigError(f"target port {wwpn} already belongs to array {owner}")
        login = self._logins.get(wwpn)
        if login is not None:
            raise FabricConfigError(
                f"{wwpn} is logged in as initiator N_Port ID {nport_id_text(login.nport_id)}"
            )
        self._targets[wwpn] = array
        self._array_ports.setdefault(array, set()).add(wwpn)
        self._targets_generation += 1

    def target_port_remove(self, wwpn: Wwn) -> None:
        array = self._targets.pop(wwpn, None)
        if array is None:
            raise FabricConfigError(f"{wwpn} is not a target port")
        ports = self._array_ports[array]
        ports.discard(wwpn)
        if not ports:
            del self._array_ports[array]
        self._targets_generation += 1

    def target_ports(self) -> dict[Wwn, Wwn]:
        """Target port WWPN -> array WWN."""
        return dict(sorted(self._targets.items()))

    # -- zoning ------------------------------------------------------------------------

    def zone_create(self, name: str, members: Iterable[Wwn] = ()) -> None:
        self._zoning.zone_create(name, members)

    def zone_delete(self, name: str) -> None:
        self._zoning.zone_delete(name)

    def zone_member_add(self, name: str, members: Iterable[Wwn]) -> None:
        self._zoning.zone_member_add(name, members)

    def zone_member_remove(self, name: str, members: Iterable[Wwn]) -> None:
        self._zoning.zone_member_remove(name, members)

    # -- masking -----------------------------------------------------------------------

    def mask_grant(self, initiator: Wwn, key: LunKey) -> bool:
        """Mask ``key`` to ``initiator`` (hot: the next IO sees it)."""
        return self._masking.grant(initiator, key)

    def mask_revoke(self, initiator: Wwn, key: LunKey) -> bool:
        """Withdraw ``key`` from ``initiator`` (hot: the next IO is refused)."""
        return self._masking.revoke(initiator, key)

    def mask_revoke_all(self, initiator: Wwn) -> tuple[LunKey, ...]:
        return self._masking.revoke_all(initiator)

    # -- dump/load ---------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        """The configuration as plain data; logins are not included (see module doc)."""
        return {
            "format": FABRIC_FORMAT,
            "version": FABRIC_VERSION,
            "domain_id": self.domain_id,
            "target_ports": [
                {"wwpn": w.canonical(), "array": a.canonical()}
                for w, a in sorted(self._targets.items())
            ],
            "zones": self._zoning.dump(),
            "masking": self._masking.dump(),
        }

    @classmethod
    def load(
        cls, data: Mapping[str, Any], logins: Mapping[str, Any] | None = None
    ) -> Fabric:
        """Rebuild from :meth:`dump`; with ``logins`` (a :meth:`LoginTable.dump`) the
        runtime login state is restored too."""
        err = FabricConfigError
        if dump_field(data, "format", str, err) != FABRIC_FORMAT:
            raise err(f"not a {FABRIC_FORMAT} dump")
        if dump_field(data, "version", int, err) != FABRIC_VERSION:
            raise err(f"unsupported {FABRIC_FORMAT} version {data['version']}")
        fabric = cls(dump_field(data, "domain_id", int, err))
        for item in dump_field(data, "target_ports", list, err):
            if not isinstance(item, Mapping):
                raise err(f"target port entry {item!r} is not an object")
            fabric.target_port_add(
                parse_wwn(dump_field(item, "wwpn", str, err), "target port", err),
                parse_wwn(dump_field(item, "array", str, err), "array", err),
            )
        fabric._zoning = Zoning.load(dump_field(data, "zones", list, err))
        fabric._masking = LunMasking.load(dump_field(data, "masking", list, err))
        if logins is not None:
            table = LoginTable.load(logins)
            if table.domain_id != fabric.domain_id:
                raise err("login dump is from another domain")
            for login in table.logins():
                if login.wwpn in fabric._targets:
                    raise err(f"login dump logs in target port {login.wwpn} as an initiator")
            fabric._logins = table
        return fabric

    # -- internals ---------------------------------------------------------------------

    def _refuse_target_name(self, wwpn: Wwn) -> None:
        array = self._targets.get(wwpn)
        if array is not None:
            raise DuplicatePortName(f"port name {wwpn} is a target port of array {array}")

    def _sees(self, initiator: Wwn, array: Wwn) -> bool:
        if (
            self._zoning.generation != self._visible_zoning_gen
            or self._targets_generation != self._visible_targets_gen
        ):
            self._visible.clear()
            self._visible_zoning_gen = self._zoning.generation
            self._visible_targets_gen = self._targets_generation
        row = self._visible.get(initiator)
        if row is None:
            row = self._visible[initiator] = {}
        seen = row.get(array)
        if seen is None:
            seen = row[array] = any(
                self._zoning.share_zone(initiator, port)
                for port in self._array_ports.get(array, ())
            )
        return seen
