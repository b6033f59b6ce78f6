"""Fuzzing the host's REST API from its own OpenAPI document (schemathesis).

The app is the one the host daemon serves (:func:`vfdirect.host.api.create_app`), run
in-process (ASGI) over a real :class:`~vfdirect.host.service.HostService`: a real inventory
in a temporary directory and a real adapter daemon started by
:class:`~vfdirect.host.adapter_link.AdapterLink`, as ``vfdirect host start`` does.

For every generated request: no 5xx, a response that conforms to the document, and, when
the request is refused (4xx), an inventory left exactly as it was (the listings of LUNs,
datastores, vdisks, VMs and vports).

Bounded for CI: a fixed number of examples per operation, derandomized (fixed seed).
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
import schemathesis
from host_helpers import ARRAY_WWN, make_san
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import response_schema_conformance
from starlette.testclient import TestClient

from vfdirect.host import api
from vfdirect.host.adapter_link import AdapterLink
from vfdirect.host.api import create_app
from vfdirect.host.inventory import Inventory
from vfdirect.host.log import setup_logging
from vfdirect.host.service import HostConfig, HostService

A = ARRAY_WWN.canonical()
EXAMPLES = 20


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HostService]:
    """A HostService as ``vfdirect host start`` builds one (no uvicorn, no sockets)."""
    root = tmp_path_factory.mktemp("fuzz")
    san = make_san(root / "san")
    run_dir = root / "run"
    run_dir.mkdir(mode=0o700)
    config = HostConfig(name="h1", run_dir=run_dir, db=str(run_dir / "inventory.db"),
                        api_socket=run_dir / "api.sock", vfs=4, log_format="json")
    logger = setup_logging("json", stream=io.StringIO())
    inventory = Inventory.open(config.db)
    adapter = AdapterLink(run_dir)
    svc: HostService | None = None
    try:
        inventory.host_register(config.name, api_address=str(config.api_socket),
                                run_dir=str(run_dir))
        adapter.open(vfs=config.vfs, arrays=(), fabric_dir=None, log_format="json")
        svc = HostService(config, inventory, adapter, logger)
        svc.array_attach(san.directory.resolve())
        svc.reconcile()
        yield svc
    finally:
        if svc is not None:
            svc.shutdown_vms()
        adapter.stop()
        adapter.close()
        inventory.close()


def _no_stop(keep_running: bool) -> None:
    raise AssertionError("POST /v1/host/stop is excluded from the fuzzing")


@pytest.fixture(scope="module")
def app(service: HostService) -> Any:
    app = create_app(service, on_stop=_no_stop)
    # Some objects for the fuzzer's requests to meet (a vdisk attached to a VM, a vport).
    with TestClient(app) as c:
        for path, body in (
            ("/v1/datastores", {"name": "ds0", "luns": [f"{A}:0"], "chunk_blocks": 64}),
            ("/v1/vdisks", {"datastore": "ds0", "name": "d1", "capacity_blocks": 128}),
            ("/v1/vms", {"name": "vm1"}),
            ("/v1/vms/vm1/attach", {"vdisk": "d1"}),
            ("/v1/vports", {"vm": "vm1"}),
        ):
            resp = c.post(path, json=body)
            assert resp.status_code in (200, 201), (path, resp.text)
    return app


def _document_app() -> Any:
    """The app as far as its OpenAPI document goes: routes and bodies only, no service
    behind it (the document must be known when pytest collects the tests; the requests go
    to the fixture's app, which has the same routes)."""
    stub = cast(HostService, SimpleNamespace(log=logging.getLogger("vfdirect.fuzz")))
    return create_app(stub, on_stop=_no_stop)


schema = schemathesis.openapi.from_asgi("/openapi.json", _document_app()).exclude(
    # POST /v1/host/stop stops the host (VMs and adapter): the run would end there.
    method="POST", path="/v1/host/stop")


@pytest.fixture(scope="module")
def session(app: Any) -> Iterator[Any]:
    """One in-process client for every generated request (not one per request)."""
    with asgi.get_client(app) as client:
        yield client


def _snapshot(svc: HostService) -> dict[str, Any]:
    """The listings as GET /v1/{luns,datastores,vdisks,vms,vports} answer them (read from
    the service directly: cheaper than five requests per example)."""
    inv = svc.inv
    return {
        "luns": [api.lun_out(v).model_dump() for v in inv.lun_list(None)],
        "datastores": [api.datastore_out(v).model_dump() for v in inv.datastore_list()],
        "vdisks": [api.vdisk_out(v).model_dump() for v in inv.vdisk_list()],
        "vms": [api.vm_out(v).model_dump() for v in inv.vm_list()],
        "vports": [api.vport_out(v).model_dump() for v in inv.vport_list()],
    }


@pytest.fixture(scope="module")
def last_snapshot() -> dict[str, Any]:
    """The snapshot taken after the last refused request (``"value"``), dropped once a
    request was accepted: refused requests in a row cost one snapshot each, not two."""
    return {}


@schema.parametrize()
@settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_api_fuzz(app: Any, session: Any, service: HostService,
                  last_snapshot: dict[str, Any], case: Any) -> None:
    before = last_snapshot.pop("value", None) or _snapshot(service)
    response = case.call(app=app, session=session)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])
    if 400 <= response.status_code < 500:
        body = json.loads(response.content)
        assert set(body) == {"error"} and set(body["error"]) == {"code", "name", "message"}, body
        after = _snapshot(service)
        assert after == before, (
            f"{case.method} {case.formatted_path} refused ({response.status_code}: "
            f"{response.content[:200]!r}) but changed the inventory")
        last_snapshot["value"] = after


def test_openapi_document(app: Any) -> None:
    """The document the fuzzing starts from is the served app's, and covers every route."""
    doc = app.openapi()
    assert doc == _document_app().openapi()
    assert "/v1/host/stop" in doc["paths"]
    assert len(doc["paths"]) >= 15


# -- regressions: what the fuzzing found ---------------------------------------------------

BIG = 1 << 70  # past any 64-bit integer
REFUSED = [
    # a framework refusal (no such method, no route, a body that is not JSON) had
    # FastAPI's {"detail": ...} body, not the API's error body
    ("PUT", "/v1/vms", None, None, 405, "METHOD_NOT_FOUND"),
    ("GET", "/v1/nowhere", None, None, 404, "NOT_FOUND"),
    ("POST", "/v1/vms", None, b"\xff{", 400, "PARSE_ERROR"),
    # integers past 64 bits overflowed in the database or in ftruncate: 500
    ("POST", "/v1/luns", {"array": A, "num_blocks": BIG}, None, 400, "INVALID_PARAMS"),
    ("POST", "/v1/luns", {"array": A, "num_blocks": 1 << 62}, None, 400, "INVALID_PARAMS"),
    ("POST", "/v1/luns", {"array": A, "num_blocks": 1 << 54}, None, 400, "INVALID_PARAMS"),
    ("POST", "/v1/datastores", {"name": "dsx", "chunk_blocks": BIG, "luns": [f"{A}:1"]}, None,
     400, "INVALID_PARAMS"),
    ("POST", "/v1/vdisks", {"datastore": "ds0", "name": "x", "capacity_blocks": BIG}, None,
     400, "INVALID_PARAMS"),
    ("POST", "/v1/vms", {"name": "vmbig", "memory_bytes": BIG}, None, 400, "INVALID_PARAMS"),
    ("GET", f"/v1/events?after={BIG}", None, None, 400, "INVALID_PARAMS"),
    ("GET", f"/v1/events?limit={BIG}", None, None, 400, "INVALID_PARAMS"),
]


@pytest.mark.parametrize(("method", "path", "body", "content", "status", "name"), REFUSED)
def test_refused_cleanly(app: Any, service: HostService, method: str, path: str, body: Any,
                         content: bytes | None, status: int, name: str) -> None:
    array_dir = Path(service.inv.array_get(A).directory)
    array_files = sorted(p.name for p in array_dir.iterdir())
    before = _snapshot(service)
    with TestClient(app, raise_server_exceptions=False) as c:
        if content is not None:
            resp = c.request(method, path, content=content,
                             headers={"content-type": "application/json"})
        else:
            resp = c.request(method, path, json=body)
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"code", "name", "message"} and error["name"] == name, error
    assert _snapshot(service) == before
    assert sorted(p.name for p in array_dir.iterdir()) == array_files  # no LUN file left
