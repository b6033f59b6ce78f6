"""Bad input through the CLI and the API: one clear line and exit status 1 from the CLI,
a 4xx with a JSON error body from the API, and nothing changed in the inventory, the
adapter or the fabric."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from host_helpers import ARRAY_WWN, Host, make_san

A = ARRAY_WWN.canonical()


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    root = tmp_path_factory.mktemp("errors")
    san = make_san(root / "san")
    h = Host(root / "run", arrays=(san.directory,))
    try:
        h.start()
        h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--chunk-blocks", "64")
        h.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "128")
        h.cli("vm", "create", "vm1")
        h.cli("vm", "create", "vm2")
        h.cli("vm", "attach", "vm1", "d1")
        h.cli("vport", "create", "--vm", "vm1")
        yield h
    finally:
        h.cleanup()


def snapshot(h: Host) -> dict[str, Any]:
    """Everything a refused request must leave as it was."""
    adapter = h.api("GET", "/v1/adapter")
    return {
        "vms": h.api("GET", "/v1/vms"), "vdisks": h.api("GET", "/v1/vdisks"),
        "vports": h.api("GET", "/v1/vports"), "datastores": h.api("GET", "/v1/datastores"),
        "vfs": adapter["vfs"], "logins": adapter["logins"],
    }


def raw(h: Host, method: str, path: str, body: Any = None) -> httpx.Response:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(h.sock)),
                      base_url="http://host", timeout=30) as c:
        return c.request(method, path, json=body)


def check_cli_error(h: Host, *args: str, says: str) -> None:
    proc = h.cli(*args, check=False)
    assert proc.returncode == 1, proc
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfdirect: error: "), proc.stderr
    assert says in lines[0], lines[0]
    assert proc.stdout == ""


def check_api_error(resp: httpx.Response, status: int, name: str, says: str) -> None:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert err["name"] == name and says in err["message"], err
    assert isinstance(err["code"], int)


def test_unknown_vm(host: Host) -> None:
    before = snapshot(host)
    check_cli_error(host, "vm", "start", "nope", says="no VM 'nope'")
    check_cli_error(host, "vm", "show", "nope", says="no VM 'nope'")
    check_cli_error(host, "vm", "attach", "nope", "d1", says="no VM 'nope'")
    check_api_error(raw(host, "POST", "/v1/vms/nope/start"), 404, "NOT_FOUND", "nope")
    check_api_error(raw(host, "DELETE", "/v1/vms/nope"), 404, "NOT_FOUND", "nope")
    assert snapshot(host) == before


def test_vdisk_larger_than_the_free_space(host: Host) -> None:
    before = snapshot(host)
    check_cli_error(host, "vdisk", "create", "huge", "--datastore", "ds0", "--size", "1GiB",
                    says="free")
    check_api_error(raw(host, "POST", "/v1/vdisks", {"datastore": "ds0", "name": "huge",
                                                     "capacity_blocks": 1 << 21}),
                    409, "RESOURCE_EXHAUSTED", "free")
    assert snapshot(host) == before


def test_duplicate_wwpn(host: Host) -> None:
    taken = host.api("GET", "/v1/vports")[0]["wwpn"]
    before = snapshot(host)
    check_cli_error(host, "vport", "create", "--wwpn", taken, says=taken)
    check_api_error(raw(host, "POST", "/v1/vports", {"wwpn": taken}), 409, "CONFLICT", taken)
    # the array's own name is a WWN of the fabric too
    check_api_error(raw(host, "POST", "/v1/vports", {"wwpn": A}), 409, "CONFLICT", A)
    check_api_error(raw(host, "POST", "/v1/vports", {"wwpn": "naa.zz"}), 400,
                    "INVALID_PARAMS", "WWPN")
    assert snapshot(host) == before


def test_a_vdisk_attached_to_two_vms(host: Host) -> None:
    before = snapshot(host)
    check_cli_error(host, "vm", "attach", "vm2", "d1", says="already attached to VM 'vm1'")
    check_api_error(raw(host, "POST", "/v1/vms/vm2/attach", {"vdisk": "d1"}), 409,
                    "CONFLICT", "already attached")
    check_cli_error(host, "vm", "detach", "vm2", "d1", says="not attached to VM 'vm2'")
    assert snapshot(host) == before


def test_malformed_requests(host: Host) -> None:
    before = snapshot(host)
    check_api_error(raw(host, "POST", "/v1/vdisks", {}), 400, "INVALID_PARAMS",
                    "capacity_blocks")
    check_api_error(raw(host, "POST", "/v1/vms", {"name": "bad name!"}), 400,
                    "INVALID_PARAMS", "name")
    check_api_error(raw(host, "POST", "/v1/datastores", {"name": "ds9", "luns": ["x"]}),
                    400, "INVALID_PARAMS", "LUN")
    check_cli_error(host, "vdisk", "create", "x", "--datastore", "ds0", says="exactly one")
    check_cli_error(host, "vm", "create", "vm1", says="already exists")
    check_cli_error(host, "vdisk", "delete", "d1", says="attached to VM 'vm1'")
    proc = host.cli("vm", "create", "v3", "--memory", "lots", check=False)
    assert proc.returncode == 2 and "is not a size" in proc.stderr
    assert snapshot(host) == before
