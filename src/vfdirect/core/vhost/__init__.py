"""vhost-user cores (pure): the message codec, a streaming parser, the back-end session
state machine a VF runs per connection, and the front-end procedures a VM runs.

* :mod:`.messages`: request codes, protocol features, payload types, header codec and
  :class:`VhostUserProtocolError`;
* :mod:`.parser`: :class:`MessageParser`, bytes + SCM_RIGHTS fds in, messages out;
* :mod:`.session`: :class:`BackendSession`, messages in, actions out;
* :mod:`.frontend`: generator procedures (negotiate, start, stop) for the front end;
* :mod:`.log`: :class:`DirtyLog`, the migration dirty-page bitmap.
"""

from vfdirect.core.vhost.frontend import (
    FrontendVring,
    Negotiated,
    expects_reply,
    negotiate,
    start_device,
    stop_vrings,
)
from vfdirect.core.vhost.log import DirtyLog, DirtyLogError
from vfdirect.core.vhost.messages import (
    VHOST_F_LOG_ALL,
    VHOST_USER_F_PROTOCOL_FEATURES,
    BackendRequest,
    Channel,
    FrontendRequest,
    HeaderFlag,
    ProtocolFeature,
    VhostUserMessage,
    VhostUserProtocolError,
)
from vfdirect.core.vhost.parser import MessageParser
from vfdirect.core.vhost.session import (
    Action,
    BackendConfig,
    BackendSession,
    SessionState,
    VringSetup,
)

__all__ = [
    "VHOST_F_LOG_ALL",
    "VHOST_USER_F_PROTOCOL_FEATURES",
    "Action",
    "BackendConfig",
    "BackendRequest",
    "BackendSession",
    "Channel",
    "DirtyLog",
    "DirtyLogError",
    "FrontendRequest",
    "FrontendVring",
    "HeaderFlag",
    "MessageParser",
    "Negotiated",
    "ProtocolFeature",
    "SessionState",
    "VhostUserMessage",
    "VhostUserProtocolError",
    "VringSetup",
    "expects_reply",
    "negotiate",
    "start_device",
    "stop_vrings",
]
