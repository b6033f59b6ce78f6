from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vfdirect.core.rpc import (
    MAX_MESSAGE_BYTES,
    ErrorCode,
    RpcError,
    decode_request,
    decode_response,
    encode_error,
    encode_request,
    encode_result,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


@given(st.binary(max_size=256))
def test_any_bytes_decode_or_rpc_error(data: bytes) -> None:
    with contextlib.suppress(RpcError):
        decode_request(data)


@given(json_values)
def test_any_json_decodes_or_rpc_error(value: object) -> None:
    with contextlib.suppress(RpcError):
        decode_request(json.dumps(value).encode())


@given(
    st.from_regex(r"[a-z][a-z0-9_]{0,30}", fullmatch=True),
    st.dictionaries(st.text(max_size=6), json_values, max_size=4),
    st.integers(0, 2**31) | st.text(max_size=5),
)
def test_request_round_trip(method: str, params: dict[str, object], rid: int | str) -> None:
    req = decode_request(encode_request(method, params, rid))
    assert (req.method, req.params, req.id, req.is_notification) == (method, params, rid, False)


def test_notification_has_no_id() -> None:
    req = decode_request(b'{"jsonrpc":"2.0","method":"vf_reset","params":{"vf":1}}')
    assert req.is_notification and req.id is None


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{", ErrorCode.PARSE_ERROR),
        (b"\xff\xfe", ErrorCode.PARSE_ERROR),
        (b'{"jsonrpc":"2.0","method":"a","params":{"x":NaN},"id":1}', ErrorCode.PARSE_ERROR),
        (b"[]", ErrorCode.INVALID_REQUEST),
        (b"42", ErrorCode.INVALID_REQUEST),
        (b'{"method":"vf_reset","id":1}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"1.0","method":"vf_reset","id":1}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"","id":1}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":5,"id":1}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"a","id":true}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"a","id":1.5}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"a","id":1,"x":2}', ErrorCode.INVALID_REQUEST),
        (b'{"jsonrpc":"2.0","method":"VF-Reset","id":1}', ErrorCode.METHOD_NOT_FOUND),
        (b'{"jsonrpc":"2.0","method":"a","params":[1],"id":1}', ErrorCode.INVALID_PARAMS),
    ],
)
def test_invalid_requests(raw: bytes, code: ErrorCode) -> None:
    with pytest.raises(RpcError) as info:
        decode_request(raw)
    assert info.value.code == code
    assert info.value.message


def test_oversize_refused() -> None:
    with pytest.raises(RpcError) as info:
        decode_request(b" " * (MAX_MESSAGE_BYTES + 1))
    assert info.value.code == ErrorCode.INVALID_REQUEST


def test_responses_round_trip() -> None:
    ok = decode_response(encode_result(7, {"vf": 3}))
    assert ok.id == 7 and ok.result == {"vf": 3} and ok.error is None
    err = RpcError(ErrorCode.WRONG_STATE, "VF 3 is quiesced, not running", {"vf": 3})
    bad = decode_response(encode_error("x", err))
    assert bad.error is not None
    assert (bad.error.code, bad.error.message, bad.error.data) == (
        ErrorCode.WRONG_STATE, "VF 3 is quiesced, not running", {"vf": 3})
    unknown = decode_response(b'{"jsonrpc":"2.0","id":1,"error":{"code":-1,"message":"m"}}')
    assert unknown.error is not None and unknown.error.code == ErrorCode.INTERNAL_ERROR


@pytest.mark.parametrize(
    "raw",
    [b'{"jsonrpc":"2.0","id":1}', b'{"jsonrpc":"2.0","id":1,"result":1,"error":{}}',
     b'{"jsonrpc":"2.0","id":1,"error":{"code":"x","message":"m"}}', b"[1]"],
)
def test_malformed_responses(raw: bytes) -> None:
    with pytest.raises(RpcError):
        decode_response(raw)
