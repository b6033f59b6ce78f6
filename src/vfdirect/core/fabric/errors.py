"""Errors of the fabric core.

Two families, kept apart as h11 keeps "you did something illegal" apart from "the peer
did":

* refusals of an IO (:class:`NotLoggedIn`, :class:`NotZoned`, :class:`NotMasked`) are
  :class:`~vfdirect.core.block.AccessDenied`, so whatever executes the IO turns them into
  sense at its one place (a SCSI target answers an unmasked LUN as SPC-4 "LOGICAL UNIT
  NOT SUPPORTED"); each names the rule that refused in :attr:`FabricDenied.rule`;
* refusals of a fabric operation (a login, a zoning or masking change, a bad dump) are
  :class:`FabricError`; a login refusal carries the FC-LS reject it stands for.
"""

from __future__ import annotations

from typing import ClassVar

from vfdirect.core.block import AccessDenied


class FabricDenied(AccessDenied):
    """The fabric refused one IO; :attr:`rule` says which check failed."""

    rule: ClassVar[str] = "fabric"


class NotLoggedIn(FabricDenied):
    """The initiator port has no fabric login (no FLOGI/FDISC accepted, or logged out)."""

    rule = "login"


class NotZoned(FabricDenied):
    """No zone holds both the initiator port and a target port of the array."""

    rule = "zoning"


class NotMasked(FabricDenied):
    """The LUN is not masked to (not in the access list of) the initiator port."""

    rule = "masking"


class FabricError(Exception):
    """A fabric operation (login, configuration change, load) was refused."""


class LoginRejected(FabricError):
    """A fabric login (FLOGI or FDISC) was refused: the fabric's LS_RJT (FC-LS)."""


class DuplicatePortName(LoginRejected):
    """The N_Port_Name (WWPN) is already logged in to the fabric, or names a target
    port. FC-LS lets a fabric reject a login whose port name is already in use; vfdirect
    always does, so that one virtual port is never served by two adapters at once."""


class ParentNotLoggedIn(LoginRejected):
    """FDISC for an NPIV port whose physical N_Port has not done FLOGI (FC-LS: FDISC is
    only accepted from an N_Port already logged in with FLOGI)."""


class NPortIdsExhausted(LoginRejected):
    """No N_Port ID is left in the area (NPIV) or the domain (physical ports)."""


class NotLoggedInError(FabricError):
    """LOGO for a port name that has no login."""


class FabricConfigError(FabricError, ValueError):
    """A zoning, masking or target-port change is malformed or conflicts with the
    configuration (unknown zone, port name already used for something else, bad dump)."""
