"""The fabric between initiator ports and storage arrays (pure core).

* :mod:`.logins`: FLOGI/FDISC/LOGO and N_Port ID assignment (FC-LS, FC-FS);
* :mod:`.zoning`: named zones of WWPNs;
* :mod:`.masking`: LUN masking per initiator WWPN (SPC-4 access controls);
* :mod:`.fabric`: :class:`Fabric`, which holds them all and answers the one IO check,
  :meth:`Fabric.authorize`;
* :mod:`.guard`: :class:`GuardedLun`, a block device that asks that check on every IO.
"""

from vfdirect.core.fabric.errors import (
    DuplicatePortName,
    FabricConfigError,
    FabricDenied,
    FabricError,
    LoginRejected,
    NotLoggedIn,
    NotLoggedInError,
    NotMasked,
    NotZoned,
    NPortIdsExhausted,
    ParentNotLoggedIn,
)
from vfdirect.core.fabric.fabric import Fabric
from vfdirect.core.fabric.guard import Authorizer, GuardedLun
from vfdirect.core.fabric.logins import Login, LoginTable, NPortId, nport_id_text
from vfdirect.core.fabric.masking import LunMasking
from vfdirect.core.fabric.zoning import Zoning

__all__ = [
    "Authorizer",
    "DuplicatePortName",
    "Fabric",
    "FabricConfigError",
    "FabricDenied",
    "FabricError",
    "GuardedLun",
    "Login",
    "LoginRejected",
    "LoginTable",
    "LunMasking",
    "NPortId",
    "NPortIdsExhausted",
    "NotLoggedIn",
    "NotLoggedInError",
    "NotMasked",
    "NotZoned",
    "ParentNotLoggedIn",
    "Zoning",
    "nport_id_text",
]
