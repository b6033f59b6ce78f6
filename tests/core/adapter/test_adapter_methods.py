"""The PF admin method table: naming, parameter validation, fd counts, generated docs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from adapter_fakes import rpc_error_of
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.adapter.pf_client import PfClient
from vfdirect.core.adapter.methods import METHODS, methods_markdown, validate
from vfdirect.core.adapter.model import AdapterModel
from vfdirect.core.rpc import ErrorCode, RpcError

DOCS = Path(__file__).resolve().parents[3] / "docs" / "pf-admin.md"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)


def test_method_names_are_object_verb_and_unique() -> None:
    names = [m.name for m in METHODS]
    assert len(names) == len(set(names))
    for name in names:
        assert re.fullmatch(r"[a-z]+(_[a-z]+)+", name), name


def test_every_method_has_a_handler_and_a_client_method() -> None:
    for m in METHODS:
        assert callable(getattr(AdapterModel, "_m_" + m.name, None)), m.name
        assert callable(getattr(PfClient, m.name, None)), m.name


def test_brief_methods_are_all_declared() -> None:
    wanted = {
        "adapter_identify", "adapter_get_stats", "adapter_dump", "array_attach",
        "fabric_zone_create", "fabric_zone_member_add", "fabric_mask_grant",
        "fabric_mask_revoke", "fabric_show", "vf_enable", "vf_list", "vf_get", "vf_assign",
        "vf_unassign", "vf_reset", "vport_create", "vport_delete", "vport_login",
        "vport_logout", "vport_bind", "vport_unbind", "mapping_load", "mapping_unload",
        "mapping_get", "vf_quiesce", "vf_drain", "vf_state_save", "vf_state_restore",
        "vf_resume", "pf_io_buffer_attach", "pf_io_submit",
    }
    assert wanted <= {m.name for m in METHODS}


def test_docs_are_generated_from_the_table() -> None:
    assert DOCS.read_text() == methods_markdown() + "\n", (
        "docs/pf-admin.md is stale: python -m vfdirect.tools.pfdoc > docs/pf-admin.md"
    )


def _err(method: str, params: dict[str, Any], fds: int = 0) -> RpcError:
    with pytest.raises(RpcError) as info:
        validate(method, params, fds)
    return info.value


@pytest.mark.parametrize(
    ("method", "params", "fds", "code", "text"),
    [
        ("vf_nope", {}, 0, ErrorCode.METHOD_NOT_FOUND, "no method 'vf_nope'"),
        ("vf_get", {}, 0, ErrorCode.INVALID_PARAMS, "missing required parameter 'vf'"),
        ("vf_get", {"vf": 1, "x": 2}, 0, ErrorCode.INVALID_PARAMS,
         "unknown parameter 'x' (it takes: vf)"),
        ("vf_get", {"vf": True}, 0, ErrorCode.INVALID_PARAMS, "must be an integer, not True"),
        ("vf_get", {"vf": 256}, 0, ErrorCode.INVALID_PARAMS, "must be in 0..255, not 256"),
        ("vf_get", {"vf": "1"}, 0, ErrorCode.INVALID_PARAMS, "must be an integer"),
        ("vf_assign", {"vf": 0, "vm_name": "a b", "vm_pid": 1}, 0, ErrorCode.INVALID_PARAMS,
         "'vm_name'"),
        ("vf_assign", {"vf": 0, "vm_name": "vm", "vm_pid": 0}, 0, ErrorCode.INVALID_PARAMS,
         "'vm_pid' must be in 1..4194304"),
        ("vport_create", {"wwpn": "naa.5", "wwnn": "naa.50af1de000000001"}, 0,
         ErrorCode.INVALID_PARAMS, "'wwpn'"),
        ("fabric_zone_create", {"name": "1bad"}, 0, ErrorCode.INVALID_PARAMS, "zone name"),
        ("fabric_mask_grant", {"initiator": "naa.50af1de000000001",
                               "array": "naa.50af1de000000002", "luns": [1, 1]}, 0,
         ErrorCode.INVALID_PARAMS, "names a value twice"),
        ("fabric_mask_grant", {"initiator": "naa.50af1de000000001",
                               "array": "naa.50af1de000000002", "luns": []}, 0,
         ErrorCode.INVALID_PARAMS, "must have 1..1024 items"),
        ("array_attach", {"path": "relative/dir"}, 0, ErrorCode.INVALID_PARAMS,
         "absolute path"),
        ("pf_io_submit", {"wwpn": "naa.50af1de000000001", "target": 0, "lun": 0,
                          "cdb": "0g"}, 0, ErrorCode.INVALID_PARAMS, "hex digits"),
        ("pf_io_submit", {"wwpn": "naa.50af1de000000001", "target": 0, "lun": 0,
                          "cdb": "00"}, 0, ErrorCode.INVALID_PARAMS, "6..32 bytes"),
        ("pf_io_submit", {"wwpn": "naa.50af1de000000001", "target": 0, "lun": 0,
                          "cdb": "000000000000", "sg": [[0]]}, 0, ErrorCode.INVALID_PARAMS,
         "[offset, length] pair"),
        ("pf_io_submit", {"wwpn": "naa.50af1de000000001", "target": 0, "lun": 0,
                          "cdb": "000000000000", "direction": "up"}, 0,
         ErrorCode.INVALID_PARAMS, "must be one of none, to_device, from_device"),
        ("pf_io_buffer_attach", {}, 0, ErrorCode.BAD_FDS,
         "pf_io_buffer_attach takes 1 file descriptor(s), the request carried 0"),
        ("vf_get", {"vf": 0}, 1, ErrorCode.BAD_FDS, "vf_get takes 0 file descriptor(s)"),
        ("mapping_load", {"vf": 0, "mapping": []}, 0, ErrorCode.INVALID_PARAMS,
         "'mapping' must be an object"),
    ],
)
def test_validation_names_what_is_wrong(
    method: str, params: dict[str, Any], fds: int, code: ErrorCode, text: str
) -> None:
    err = _err(method, params, fds)
    assert err.code is code
    assert text in err.message
    if code is ErrorCode.INVALID_PARAMS:
        assert err.message.startswith(f"{method}: ")


def test_valid_params_are_parsed_to_typed_values() -> None:
    _, p = validate("pf_io_submit", {
        "wwpn": "50:0a:f1:de:00:00:00:01", "target": 3, "lun": 300, "cdb": "2800000000000000"
        "0100", "sg": [[0, 512]], "direction": "from_device", "buffer": 2}, 0)
    assert p["wwpn"].canonical() == "naa.500af1de00000001"
    assert p["cdb"] == bytes.fromhex("28000000000000000100")
    assert p["sg"] == ((0, 512),)
    _, p = validate("vport_create", {"wwpn": "naa.50af1de000000001",
                                     "wwnn": "naa.50af1de000000002"}, 0)
    assert p["alternate_wwpn"] is None


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([m.name for m in METHODS] + ["x_y", ""]),
       st.dictionaries(st.sampled_from(["vf", "wwpn", "count", "luns", "sg", "cdb", "mapping",
                                        "members", "name", "path", "vm_pid", "junk"]),
                       json_values, max_size=5),
       st.integers(0, 3))
def test_validation_raises_only_rpc_errors(method: str, params: dict[str, Any],
                                           fds: int) -> None:
    err = rpc_error_of(validate, method, params, fds)
    if err is not None:
        assert err.code in (ErrorCode.METHOD_NOT_FOUND, ErrorCode.INVALID_PARAMS,
                            ErrorCode.BAD_FDS)
        assert err.message
