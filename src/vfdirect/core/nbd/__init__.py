"""NBD (Network Block Device) protocol, server side, sans-IO: the fixed newstyle
handshake (:mod:`.handshake`) and the transmission phase with simple replies
(:mod:`.transmission`). The IO shell is :mod:`vfdirect.vm.nbd`."""

from vfdirect.core.nbd.constants import (
    CommandFlag,
    CommandType,
    Errno,
    InfoType,
    Option,
    OptionReply,
    TransmissionFlag,
)
from vfdirect.core.nbd.errors import NbdProtocolError
from vfdirect.core.nbd.handshake import ExportInfo, HandshakePhase, ServerHandshake, encode_option
from vfdirect.core.nbd.transmission import (
    Request,
    RequestDecoder,
    check_request,
    encode_request,
    simple_reply,
)

__all__ = [
    "CommandFlag",
    "CommandType",
    "Errno",
    "ExportInfo",
    "HandshakePhase",
    "InfoType",
    "NbdProtocolError",
    "Option",
    "OptionReply",
    "Request",
    "RequestDecoder",
    "ServerHandshake",
    "TransmissionFlag",
    "check_request",
    "encode_option",
    "encode_request",
    "simple_reply",
]
