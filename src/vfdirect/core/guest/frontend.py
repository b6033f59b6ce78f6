"""What the VM's vhost-user front end asks for and decides, sans-IO (the procedures of
:mod:`vfdirect.core.vhost.frontend` plus the pieces a virtio-scsi front end needs).

Rules of this module:

* :data:`WANTED_FEATURES`: VIRTIO_F_VERSION_1 (required), VIRTIO_RING_F_EVENT_IDX
  (required: the driver state in guest memory was laid out with used_event/avail_event,
  VIRTIO 1.x 2.7.10, and a driver that suppresses notifications that way must not meet
  a device that ignores them), VIRTIO_RING_F_INDIRECT_DESC (used when offered), and the
  virtio-scsi HOTPLUG and CHANGE bits (events for rescans, 5.6.3);
* :data:`WANTED_PROTOCOL_FEATURES`: MQ, REPLY_ACK (every request acknowledged, so a
  refusal is seen at once), CONFIG (GET_CONFIG for the virtio-scsi configuration);
* :func:`read_config` is a generator in the style of the core procedures: it yields
  GET_CONFIG and returns the decoded configuration, or ``None`` when the back end
  answers with the empty payload that means "refused" (vhost-user.rst, GET_CONFIG);
* :func:`check_negotiated` raises :class:`FrontendError` when a required feature is
  missing; :func:`request_queue_count` picks how many request queues to start;
* the reconnect rule (applied by the shell with
  :meth:`~vfdirect.core.guest.virtscsi.VirtioScsiDriver.used_index`): a vring's base is
  the used index found in guest memory (the back end completes every request it took
  before it lets a connection go, so ``used.idx`` equals the available index it will
  resume from).
"""

from __future__ import annotations

from collections.abc import Generator

from vfdirect.core.vhost.frontend import Negotiated
from vfdirect.core.vhost.messages import (
    ConfigSpace,
    Empty,
    FrontendRequest,
    ProtocolFeature,
    VhostUserMessage,
    VhostUserProtocolError,
)
from vfdirect.core.virtio.features import VirtioFeature, has, mask
from vfdirect.core.virtio.scsi import CONFIG_SIZE, REQUESTQ_BASE, ScsiFeature, VirtioScsiConfig

__all__ = [
    "REQUIRED_FEATURES",
    "WANTED_FEATURES",
    "WANTED_PROTOCOL_FEATURES",
    "FrontendError",
    "check_negotiated",
    "read_config",
    "request_queue_count",
]

REQUIRED_FEATURES = mask((VirtioFeature.VERSION_1, VirtioFeature.RING_EVENT_IDX))
WANTED_FEATURES = REQUIRED_FEATURES | mask((VirtioFeature.RING_INDIRECT_DESC,
                                            ScsiFeature.HOTPLUG, ScsiFeature.CHANGE))
WANTED_PROTOCOL_FEATURES = mask((ProtocolFeature.MQ, ProtocolFeature.REPLY_ACK,
                                 ProtocolFeature.CONFIG))


class FrontendError(Exception):
    """The back end cannot serve this guest (a required feature is missing)."""


def check_negotiated(negotiated: Negotiated) -> None:
    missing = REQUIRED_FEATURES & ~negotiated.features
    if missing:
        names = [f.name for f in VirtioFeature if has(missing, f)]
        raise FrontendError(f"the back end does not offer {', '.join(names)}")


def read_config(negotiated: Negotiated) -> Generator[
        VhostUserMessage, VhostUserMessage | None, VirtioScsiConfig | None]:
    """GET_CONFIG for the whole virtio-scsi configuration space (5.6.4); ``None`` when
    CONFIG was not negotiated or the back end refused."""
    if not has(negotiated.protocol_features, ProtocolFeature.CONFIG):
        return None
    reply = yield VhostUserMessage.request_of(FrontendRequest.GET_CONFIG,
                                              ConfigSpace(0, bytes(CONFIG_SIZE)))
    if reply is None or int(reply.request) != FrontendRequest.GET_CONFIG or \
            not reply.is_reply:
        raise VhostUserProtocolError("no GET_CONFIG reply")
    if isinstance(reply.payload, Empty):
        return None
    if not isinstance(reply.payload, ConfigSpace):
        raise VhostUserProtocolError("GET_CONFIG reply is not a config space")
    if reply.payload.offset != 0 or len(reply.payload.data) < CONFIG_SIZE:
        raise VhostUserProtocolError(f"GET_CONFIG reply of {len(reply.payload.data)} "
                                     f"bytes at offset {reply.payload.offset}")
    return VirtioScsiConfig.decode(reply.payload.data)


def request_queue_count(guest_queues: int, config: VirtioScsiConfig | None,
                        negotiated: Negotiated) -> int:
    """How many request queues to start: what the guest laid out, no more than the
    device's ``num_queues`` (5.6.4) nor its vring count beyond control and event."""
    count = guest_queues
    if config is not None:
        count = min(count, config.num_queues)
    if negotiated.num_queues is not None:
        count = min(count, negotiated.num_queues - REQUESTQ_BASE)
    if count < 1:
        raise FrontendError("the back end serves no request queue")
    return count
