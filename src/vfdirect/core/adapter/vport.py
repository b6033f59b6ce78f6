"""Virtual ports (NPIV) as the adapter holds them: names, login, binding.

Rules of this module:

* a vport is a WWPN/WWNN pair created by the hypervisor (claim A5), optionally with an
  alternate WWPN that a migration destination logs in before switch-over (claim X3);
* it is logged in with exactly one of its two port names at a time
  (:class:`VportLogin`), and bound to at most one VF (claim A7); the VF record names the
  vport back, and :class:`~.model.AdapterModel` keeps the two sides consistent;
* records are immutable values that dump to plain data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vfdirect.core.adapter.mapping import MappingError
from vfdirect.core.array import dump_field, parse_wwn
from vfdirect.core.fabric.logins import nport_id_text
from vfdirect.core.ids import VfIndex
from vfdirect.core.wwn import Wwn


@dataclass(frozen=True, slots=True)
class VportLogin:
    """An accepted FDISC: the port name used and the N_Port ID the fabric assigned."""

    port_name: Wwn
    nport_id: int

    def dump(self) -> dict[str, Any]:
        return {"port_name": self.port_name.canonical(), "nport_id": self.nport_id}

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> VportLogin:
        err = MappingError
        return cls(
            parse_wwn(dump_field(data, "port_name", str, err), "port_name", err),
            dump_field(data, "nport_id", int, err),
        )


@dataclass(frozen=True, slots=True)
class VportRecord:
    wwpn: Wwn
    wwnn: Wwn
    alternate_wwpn: Wwn | None = None
    login: VportLogin | None = None
    vf: VfIndex | None = None

    def names(self) -> tuple[Wwn, ...]:
        """The port names it may log in with."""
        return (self.wwpn,) if self.alternate_wwpn is None else (self.wwpn, self.alternate_wwpn)

    def view(self) -> dict[str, Any]:
        """The wire form the admin methods return."""
        return {
            "wwpn": self.wwpn.canonical(),
            "wwnn": self.wwnn.canonical(),
            "alternate_wwpn": None if self.alternate_wwpn is None else
            self.alternate_wwpn.canonical(),
            "logged_in": self.login is not None,
            "port_name": None if self.login is None else self.login.port_name.canonical(),
            "nport_id": None if self.login is None else nport_id_text(self.login.nport_id),
            "vf": None if self.vf is None else int(self.vf),
        }

    def dump(self) -> dict[str, Any]:
        return {
            "wwpn": self.wwpn.canonical(),
            "wwnn": self.wwnn.canonical(),
            "alternate_wwpn": None if self.alternate_wwpn is None else
            self.alternate_wwpn.canonical(),
            "login": None if self.login is None else self.login.dump(),
            "vf": None if self.vf is None else int(self.vf),
        }

    @classmethod
    def load(cls, data: Mapping[str, Any]) -> VportRecord:
        err = MappingError
        alt = data.get("alternate_wwpn")
        login = data.get("login")
        vf = data.get("vf")
        if login is not None and not isinstance(login, Mapping):
            raise err(f"vport login must be an object or null, not {login!r}")
        if vf is not None and (isinstance(vf, bool) or not isinstance(vf, int)):
            raise err(f"vport vf must be an integer or null, not {vf!r}")
        record = cls(
            wwpn=parse_wwn(dump_field(data, "wwpn", str, err), "wwpn", err),
            wwnn=parse_wwn(dump_field(data, "wwnn", str, err), "wwnn", err),
            alternate_wwpn=None if alt is None else parse_wwn(alt, "alternate_wwpn", err),
            login=None if login is None else VportLogin.load(login),
            vf=None if vf is None else VfIndex(vf),
        )
        if record.login is not None and record.login.port_name not in record.names():
            raise err(f"vport {record.wwpn} is logged in as {record.login.port_name}, "
                      "which is neither of its names")
        return record
