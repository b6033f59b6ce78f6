"""JSON-RPC 2.0 request/response codec (https://www.jsonrpc.org/specification).

Standard error codes (-32700..-32600) are used for framing faults; domain errors of the PF
admin command set use the server-error range -32000..-32099, one code per kind of fault,
so that clients can branch on the code and show the message.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

#: Largest message accepted on the admin channel (one packet).
MAX_MESSAGE_BYTES = 1 << 20

_METHOD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


class ErrorCode(IntEnum):
    # JSON-RPC 2.0 section 5.1
    PARSE_ERROR = -32700
    INVALID_REQUEST = -32600
    METHOD_NOT_FOUND = -32601
    INVALID_PARAMS = -32602
    INTERNAL_ERROR = -32603
    # PF admin command set (server-error range)
    NOT_FOUND = -32001  #: the VF, vport, mapping or VM named does not exist
    WRONG_STATE = -32002  #: the object exists but is in a state that forbids the method
    CONFLICT = -32003  #: the request collides with existing configuration (duplicate id)
    PERMISSION_DENIED = -32004  #: the caller may not do this (credentials, ownership)
    RESOURCE_EXHAUSTED = -32005  #: no free VF, no space, too many objects
    FABRIC_REFUSED = -32006  #: the fabric refused a login, zoning or masking operation
    IO_ERROR = -32007  #: a storage IO submitted through the PF failed
    TIMEOUT = -32008  #: a bounded wait (drain, quiesce) ran out
    BAD_FDS = -32009  #: the file descriptors passed do not match what the method takes


class RpcError(Exception):
    """A JSON-RPC error: raised by codecs and method handlers, answered as an error object."""

    def __init__(self, code: ErrorCode, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_obj(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": int(self.code), "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err

    def __repr__(self) -> str:
        return f"RpcError({self.code.name}, {self.message!r})"


RequestId = int | str | None


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    id: RequestId = None  #: None for a notification (no response expected)
    is_notification: bool = False


@dataclass(frozen=True, slots=True)
class Response:
    id: RequestId
    result: Any = None
    error: RpcError | None = None


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def _loads(data: bytes) -> Any:
    if len(data) > MAX_MESSAGE_BYTES:
        raise RpcError(ErrorCode.INVALID_REQUEST, f"message of {len(data)} bytes is over the "
                       f"{MAX_MESSAGE_BYTES}-byte limit")
    try:
        text = data.decode("utf-8")
        return json.loads(text, parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise RpcError(ErrorCode.PARSE_ERROR, f"not a JSON message: {exc}") from None


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode()


def _check_id(obj: dict[str, Any]) -> RequestId:
    rid = obj.get("id")
    if rid is None:
        return None
    if isinstance(rid, bool) or not isinstance(rid, int | str):
        raise RpcError(ErrorCode.INVALID_REQUEST, "id must be a string, an integer or null")
    return rid


def decode_request(data: bytes) -> Request:
    """Decode one request; raise :class:`RpcError` (and only that) when it is not valid."""
    obj = _loads(data)
    if isinstance(obj, list):
        raise RpcError(ErrorCode.INVALID_REQUEST, "batches are not accepted on this channel")
    if not isinstance(obj, dict):
        raise RpcError(ErrorCode.INVALID_REQUEST, "a request is a JSON object")
    if obj.get("jsonrpc") != "2.0":
        raise RpcError(ErrorCode.INVALID_REQUEST, 'member "jsonrpc" must be exactly "2.0"')
    extra = set(obj) - {"jsonrpc", "method", "params", "id"}
    if extra:
        raise RpcError(ErrorCode.INVALID_REQUEST, f"unknown members: {', '.join(sorted(extra))}")
    rid = _check_id(obj)
    method = obj.get("method")
    if not isinstance(method, str) or not method:
        raise RpcError(ErrorCode.INVALID_REQUEST, 'member "method" must be a non-empty string')
    if len(method) > 64 or not set(method) <= _METHOD_CHARS:
        raise RpcError(ErrorCode.METHOD_NOT_FOUND, f"no method {method[:64]!r}")
    params = obj.get("params", {})
    if not isinstance(params, dict):
        raise RpcError(ErrorCode.INVALID_PARAMS, "params must be an object (by-name parameters)")
    return Request(method=method, params=params, id=rid, is_notification="id" not in obj)


def encode_request(method: str, params: dict[str, Any] | None = None,
                   rid: RequestId = None) -> bytes:
    obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params or {}}
    if rid is not None:
        obj["id"] = rid
    return _dumps(obj)


def encode_result(rid: RequestId, result: Any) -> bytes:
    return _dumps({"jsonrpc": "2.0", "id": rid, "result": result})


def encode_error(rid: RequestId, error: RpcError) -> bytes:
    return _dumps({"jsonrpc": "2.0", "id": rid, "error": error.to_obj()})


def decode_response(data: bytes) -> Response:
    """Decode one response (client side); malformed responses raise :class:`RpcError`."""
    obj = _loads(data)
    if not isinstance(obj, dict) or obj.get("jsonrpc") != "2.0":
        raise RpcError(ErrorCode.INVALID_REQUEST, "a response is a JSON-RPC 2.0 object")
    rid = _check_id(obj)
    has_result, has_error = "result" in obj, "error" in obj
    if has_result == has_error:
        raise RpcError(ErrorCode.INVALID_REQUEST,
                       'a response carries exactly one of "result" and "error"')
    if has_result:
        return Response(id=rid, result=obj["result"])
    err = obj["error"]
    if not isinstance(err, dict) or not isinstance(err.get("code"), int) \
            or not isinstance(err.get("message"), str):
        raise RpcError(ErrorCode.INVALID_REQUEST, "an error object has an integer code and a "
                       "string message")
    try:
        code = ErrorCode(err["code"])
    except ValueError:
        code = ErrorCode.INTERNAL_ERROR
    return Response(id=rid, error=RpcError(code, err["message"], err.get("data")))


def finite_number(value: Any) -> bool:
    """True for an int or a finite float that is not a bool (JSON numbers as parameters)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    return isinstance(value, float) and math.isfinite(value)
