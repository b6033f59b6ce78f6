"""JSON-RPC 2.0 framing for the PF admin channel (pure).

Rules:

* one message is one JSON object (a packet on a ``SOCK_SEQPACKET`` socket, so file
  descriptors passed with SCM_RIGHTS belong unambiguously to the message they came with);
* requests carry ``params`` as an object (by-name parameters only), method names in the
  ``object_verb`` style;
* every failure is an :class:`RpcError` with a stable numeric code (:class:`ErrorCode`) and
  a message that says what was wrong; nothing else escapes :func:`decode_request`.

Batches are not used on this channel and are refused as invalid requests.
"""

from vfdirect.core.rpc.jsonrpc import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    Request,
    Response,
    RpcError,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
)

__all__ = [
    "MAX_MESSAGE_BYTES",
    "ErrorCode",
    "Request",
    "Response",
    "RpcError",
    "decode_request",
    "decode_response",
    "encode_error",
    "encode_request",
    "encode_result",
]
