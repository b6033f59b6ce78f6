"""The live dashboard in a real browser: two hosts (one inventory, one SAN and fabric),
the page served by h1 opened in headless Chromium (Debian's ``chromium`` driven through
Playwright's Python API, no browser download), checked as an operator would read it.

Screenshots go to pytest's tmp dir and to ``artifacts/`` at the top of the repository
(CI's artifact directory); with ``VFDIRECT_DASHBOARD_PNG=<path>`` the migration test also
writes its screenshot there (how ``docs/dashboard.png`` is made)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host
from playwright.sync_api import sync_playwright

from vfdirect.storage import StorageArray

A = ARRAY_WWN.canonical()
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parents[2]
pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason="Debian's chromium is not installed (./vfd.sh setup installs it)"),
]
WAIT_MS = 60_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _save(page: Any, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    shutil.copy(shot, artifacts / name)
    return shot


@pytest.fixture
def cluster(tmp_path: Path, san: StorageArray,
            hosts: list[Host]) -> tuple[Host, Host, int]:
    """h1 (API also on 127.0.0.1:<port>, for the browser) and h2, one inventory."""
    db = str(tmp_path / "cluster.db")
    port = _free_port()
    h1 = Host(tmp_path / "run1", "h1", arrays=(san.directory,), db=db,
              extra=("--api-port", str(port)))
    h2 = Host(tmp_path / "run2", "h2", arrays=(san.directory,), db=db)
    hosts += [h1, h2]
    h1.start()
    h2.start()
    h1.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
           "--chunk-blocks", "64")
    h1.cli("vdisk", "create", "d1", "--datastore", "ds0", "--blocks", "256")
    h1.cli("vdisk", "create", "d2", "--datastore", "ds0", "--blocks", "256")
    return h1, h2, port


@pytest.fixture
def browser() -> Iterator[Any]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM,
                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            yield b
        finally:
            b.close()


def _open(browser: Any, port: int) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type == "error" else None)
    requests: list[str] = []
    page.on("request", lambda req: requests.append(req.url))
    page.goto(f"http://127.0.0.1:{port}/dashboard")
    page.wait_for_selector("#status[data-state=live]", timeout=WAIT_MS)
    # everything the page loads comes from the host itself: no CDN, no network
    assert all(u.startswith((f"http://127.0.0.1:{port}/", "data:")) for u in requests), \
        requests
    return page, problems


def _vf_rows(page: Any, host: str) -> list[dict[str, str]]:
    rows: list[dict[str, str]] = page.eval_on_selector_all(
        f'table.vf-table[data-host="{host}"] tbody tr',
        "rows => rows.map(r => ({vf: r.dataset.vf, vm: r.dataset.vm, "
        "state: r.children[1].textContent, vport: r.children[3].textContent}))")
    return rows


def _start_vm(h: Host, workload: str) -> dict[str, Any]:
    h.cli("vm", "create", "vm1", "--workload", workload)
    h.cli("vm", "attach", "vm1", "d1")
    h.cli("vm", "attach", "vm1", "d2")
    vm: dict[str, Any] = h.cli_json("vm", "start", "vm1")
    return vm


def test_dashboard_shows_hosts_vfs_vports_vms_and_live_io(
        cluster: tuple[Host, Host, int], browser: Any, tmp_path: Path) -> None:
    h1, _h2, port = cluster
    vm = _start_vm(h1, "load")
    page, problems = _open(browser, port)
    # both hosts, each with its adapter's PF and VF table (h2 asked over its own socket)
    page.wait_for_selector('.host[data-host="h2"] table.vf-table', timeout=WAIT_MS)
    assert page.inner_text('.host[data-host="h1"] .card-head').startswith("h1")
    rows1 = _vf_rows(page, "h1")
    assert len(rows1) == 4 and len(_vf_rows(page, "h2")) == 4
    mine = [r for r in rows1 if r["vm"] == "vm1"]
    assert len(mine) == 1 and mine[0]["vf"] == str(vm["vf"])
    assert mine[0]["state"] == "CONNECTED" and mine[0]["vport"] == vm["vport"]
    assert all(r["vm"] == "" for r in _vf_rows(page, "h2"))
    # the vport is logged in on h1's adapter; the VM's mapping table has both disks
    login = page.inner_text(f'#vport-table tr[data-wwpn="{vm["vport"]}"]')
    assert "h1" in login and "vm1" in login
    assert page.locator('.host[data-host="h1"] table.login-table tbody tr').count() >= 2
    mapping = page.inner_text('#mappings .mapping[data-vm="vm1"]')
    assert "d1" in mapping and "d2" in mapping and A in mapping
    assert "running" in page.inner_text('#vm-table tr[data-vm="vm1"]')
    # live: the IOPS chart fills from the guest's progress events, latency from them too
    page.wait_for_function(
        """() => { const l = document.querySelector('.chart[data-vm="vm1"] .iops-line');
                   return l && l.getAttribute('points').trim().split(' ').length >= 3; }""",
        timeout=WAIT_MS)
    assert page.locator('.chart[data-vm="vm1"] .latency-line').count() >= 1
    iops = page.inner_text('#vm-table tr[data-vm="vm1"] td:nth-child(6)')
    assert float(iops.replace(",", "")) > 0
    shot = _save(page, tmp_path, "dashboard-live.png")
    assert shot.stat().st_size > 10_000
    assert not problems, problems
    page.close()


def _wait_migration(h: Host, ident: str, timeout: float = 180.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        shown: dict[str, Any] = h.api("GET", f"/v1/migrations/{ident}")
        if shown["outcome"] != "running":
            return shown
        assert time.monotonic() < deadline, f"migration {ident} still running: {shown}"
        time.sleep(0.25)


def test_dashboard_migration_timeline_and_the_vf_table_changes_hosts(
        cluster: tuple[Host, Host, int], browser: Any, tmp_path: Path) -> None:
    h1, h2, port = cluster
    _start_vm(h1, "verify")
    page, problems = _open(browser, port)
    page.wait_for_function(
        """() => { const l = document.querySelector('.chart[data-vm="vm1"] .iops-line');
                   return l && l.getAttribute('points').trim().split(' ').length >= 4; }""",
        timeout=WAIT_MS)
    assert any(r["vm"] == "vm1" for r in _vf_rows(page, "h1"))
    started = h1.api("POST", "/v1/vms/vm1/migrate", {"to": "h2"})
    ident = started["migration"]
    shown = _wait_migration(h1, ident)
    assert shown["outcome"] == "committed", shown
    phases = [p for p, _ in shown["report"]["summary"]]
    assert {"prepare", "quiesce", "drain", "handoff", "mediated", "stop_copy", "destination",
            "commit"} <= set(phases), phases
    # the timeline shows this migration, one bar per phase, over the guest's IO rate
    page.wait_for_selector(f'#timeline[data-migration="{ident}"][data-outcome="committed"]',
                           timeout=WAIT_MS)
    bars = page.eval_on_selector_all(
        "#timeline rect.phase",
        "rs => rs.map(r => ({phase: r.dataset.phase, ms: Number(r.dataset.ms), "
        "open: r.dataset.open, w: Number(r.getAttribute('width'))}))")
    assert sorted(b["phase"] for b in bars) == sorted(phases), (bars, phases)
    assert all(b["open"] == "0" and b["w"] > 0 for b in bars), bars
    summary = dict(shown["report"]["summary"])
    for b in bars:
        assert b["ms"] == pytest.approx(summary[b["phase"]], abs=0.01), (b, summary)
    # the VF table changed hosts: vm1 on one of h2's VFs, none of h1's
    page.wait_for_function(
        """() => [...document.querySelectorAll('table.vf-table[data-host="h2"] tbody tr')]
                 .some(r => r.dataset.vm === 'vm1')""", timeout=WAIT_MS)
    page.wait_for_function(
        """() => ![...document.querySelectorAll('table.vf-table[data-host="h1"] tbody tr')]
                 .some(r => r.dataset.vm === 'vm1')""", timeout=WAIT_MS)
    on2 = h2.cli_json("vm", "show", "vm1")["vm"]
    assert next(r for r in _vf_rows(page, "h2") if r["vm"] == "vm1")["vf"] == str(on2["vf"])
    # the guest's IO rate on the destination reaches the timeline (its line for h2)
    page.wait_for_selector('#timeline .io-rate[data-host="h2"]', timeout=WAIT_MS)
    assert page.locator('#timeline .io-rate[data-host="h1"]').count() == 1
    _save(page, tmp_path, "dashboard-migration.png")
    docs_png = os.environ.get("VFDIRECT_DASHBOARD_PNG")
    if docs_png:
        page.screenshot(path=docs_png, full_page=True)
    assert not problems, problems
    page.close()
    # every phase logged one enter and one leave line with the migration and VM ids
    lines = [json.loads(ln) for ln in (h1.run_dir / "host.log").read_text().splitlines()
             if ln.startswith("{")]
    for phase in phases:
        for state in ("enter", "leave"):
            found = [e for e in lines if e["event"] == "migration_phase"
                     and e.get("migration") == ident and e.get("phase") == phase
                     and e.get("state") == state]
            assert len(found) == 1 and found[0]["vm"] == "vm1", (phase, state, found)
