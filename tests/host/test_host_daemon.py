"""The host daemon as a process: it starts its adapter, serves the API on its Unix socket
(and on 127.0.0.1 when asked), answers ``host status``, and stops cleanly: no process,
socket or lock holder left."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import httpx
from host_helpers import Host, cli, wait_gone

from vfdirect.storage import StorageArray


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_host_starts_its_adapter_and_stops_clean(tmp_path: Path, san: StorageArray,
                                                 hosts: list[Host]) -> None:
    port = _free_port()
    h = Host(tmp_path / "run", arrays=(san.directory,), extra=("--api-port", str(port)))
    hosts.append(h)
    h.start()
    status = h.cli_json("host", "status")
    assert status["name"] == "h1"
    assert status["adapter"]["pid"] == h.adapter_pid
    assert status["adapter"]["attached"] is False
    assert status["adapter"]["vfs_enabled"] == 4
    text = h.cli("host", "status").stdout
    assert "h1" in text and "adapter" in text
    # the adapter is a process of its own, serving pf.sock in the run directory
    assert Path(f"/proc/{h.adapter_pid}").exists()
    assert (h.run_dir / "pf.sock").exists()
    assert (h.sock.stat().st_mode & 0o777) == 0o600
    # the same API on TCP, with its OpenAPI document
    doc = httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=10).json()
    assert {"/v1/vms", "/v1/vdisks", "/v1/vms/{name}/start"} <= set(doc["paths"])
    assert httpx.get(f"http://127.0.0.1:{port}/v1/host", timeout=10).json()["name"] == "h1"
    # the array given at start is in the inventory, with its LUNs
    luns = h.cli_json("array", "lun", "list")
    assert [(x["lun"], x["num_blocks"]) for x in luns] == [(0, 8192), (1, 8192)]
    host_pid, adapter_pid = h.pid, h.adapter_pid
    out = h.cli_json("host", "stop")
    assert out["stopped"] == "h1" and out["keep_running"] is False
    assert wait_gone(host_pid) and wait_gone(adapter_pid)
    assert not h.sock.exists() and not (h.run_dir / "pf.sock").exists()
    assert not (h.run_dir / "host.json").exists()
    stopped = [e["event"] for e in h.events()]
    assert "host_ready" in stopped and stopped[-1] == "host_stopped"


def test_a_second_host_on_the_same_run_dir_is_refused(host: Host) -> None:
    proc = cli("host", "start", "--name", "h2", "--run-dir", str(host.run_dir), check=False)
    assert proc.returncode != 0
    assert "another host" in proc.stderr or "exited" in proc.stderr
    assert host.cli_json("host", "status")["name"] == "h1"


def test_status_without_a_host_is_one_line_error(tmp_path: Path) -> None:
    proc = cli("host", "status", "--run-dir", str(tmp_path / "nothing"), check=False)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vfdirect: error: no host answers")


def test_host_json_names_the_processes(host: Host) -> None:
    info = json.loads((host.run_dir / "host.json").read_text())
    assert info["pid"] == host.pid and info["api_socket"] == str(host.sock)
