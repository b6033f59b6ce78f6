"""The host's live dashboard and its data: ``/dashboard``, ``/v1/cluster``, ``/v1/stream``,
and the Prometheus exposition at ``/metrics``.

Rules of this package:

* the page (``static/``: HTML, plain JavaScript, CSS; the charts are SVG the script draws)
  is package data served by the host itself: nothing is fetched from the network;
* the page gets its data from the host that served it: ``/v1/cluster`` (one snapshot)
  and ``/v1/stream`` (server-sent events, a snapshot a second). A snapshot joins this
  host's view (its adapter through the PF, its VMs' guest IO samples) with every other
  host of the inventory, asked over its own API socket (``/v1/dashboard/host``), and the
  shared inventory (VMs and their mapping tables, vports, migrations with their reports);
* a host that does not answer is shown as unreachable, never as an error of the page;
* routes only read: nothing here changes the inventory, the adapter or a VM.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from datetime import datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.concurrency import run_in_threadpool

from vfdirect.core.rpc import ErrorCode
from vfdirect.host.client import ApiError, HostClient
from vfdirect.host.inventory import InventoryError, MigrationView
from vfdirect.host.metrics import IoSampler, adapter_snapshot, make_registry
from vfdirect.host.service import HostError, HostService

__all__ = ["ASSETS", "STREAM_INTERVAL_S", "STREAM_LIFETIME_S", "cluster_state", "host_state",
           "install"]

#: The page's files and their media types.
ASSETS: dict[str, str] = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}

#: Seconds between two snapshots of the stream.
STREAM_INTERVAL_S = 1.0
#: A stream ends after this long; the browser's EventSource reconnects at once (so that
#: a page left open never holds a stopping host for long).
STREAM_LIFETIME_S = 30.0
#: How long the host waits for another host's answer.
PEER_TIMEOUT_S = 3.0
#: Samples a stream sends again after the previous snapshot (late console lines).
_OVERLAP_MS = 5000.0


def _asset(name: str) -> bytes:
    return (resources.files(__name__) / "static" / name).read_bytes()


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _now_ms() -> float:
    return time.time() * 1000.0


def host_state(service: HostService, sampler: IoSampler, since_ms: float = 0.0) -> dict[str, Any]:
    """What only this host knows: its adapter (PF, VFs with their counters, fabric
    logins) and its guests' IO samples newer than ``since_ms``."""
    sampler.poll()
    out: dict[str, Any] = {"name": service.name, "at": _now_ms(), "adapter": None,
                           "error": None, "io": sampler.samples(since_ms)}
    try:
        out["adapter"] = adapter_snapshot(service)
    except (HostError, OSError) as exc:
        out["error"] = f"adapter: {exc}"
    return out


def _migration(v: MigrationView) -> dict[str, Any]:
    return {"id": v.id, "vm": v.vm, "source": v.source, "destination": v.destination,
            "started_at": _iso(v.started_at), "finished_at": _iso(v.finished_at),
            "outcome": v.outcome, "report": dict(v.phases)}


def _vms(service: HostService) -> list[dict[str, Any]]:
    out = []
    for v in service.inv.vm_list():
        mapping: list[dict[str, Any]] = []
        try:
            info = service.inv.mapping_build(v.name)
        except InventoryError:
            info = None
        if info is not None:
            for e in info.entries:
                mapping.append({
                    "target": int(e.address.target), "lun": e.address.lun,
                    "vdisk": e.vdisk.id, "name": e.vdisk.name,
                    "capacity_blocks": e.vdisk.capacity_blocks,
                    "block_size": e.vdisk.block_size,
                    "extents": list(e.layout.dump().get("placements", []))})
        out.append({"name": v.name, "host": v.host, "state": v.state.value, "pid": v.pid,
                    "vf": None if v.vf is None else int(v.vf),
                    "vport": None if v.vport is None else v.vport.canonical(),
                    "memory_bytes": v.memory_bytes, "vdisks": list(v.vdisks),
                    "mapping": mapping})
    return out


def _peer(address: str, since_ms: float) -> dict[str, Any]:
    try:
        with HostClient(address, timeout=PEER_TIMEOUT_S) as client:
            got = client.get("/v1/dashboard/host", since=since_ms)
    except ApiError as exc:
        return {"error": exc.message}
    if not isinstance(got, dict):
        return {"error": "unexpected answer"}
    return got


def cluster_state(service: HostService, sampler: IoSampler,
                  since_ms: float = 0.0) -> dict[str, Any]:
    """One snapshot of the cluster as this host sees it (see the package's rules)."""
    at = _now_ms()
    hosts: list[dict[str, Any]] = []
    io: dict[str, list[dict[str, Any]]] = {}
    for h in service.inv.host_list():
        entry: dict[str, Any] = {
            "name": h.name, "state": h.state.value, "api_address": h.api_address,
            "heartbeat_at": _iso(h.heartbeat_at), "self": h.name == service.name,
            "reachable": False, "adapter": None, "error": None}
        if h.name == service.name:
            got: dict[str, Any] = host_state(service, sampler, since_ms)
        elif h.state.value == "up" and h.api_address:
            got = _peer(h.api_address, since_ms)
        else:
            got = {"error": f"host is {h.state.value}"}
        entry["reachable"] = "adapter" in got
        entry["adapter"] = got.get("adapter")
        entry["error"] = got.get("error")
        for vm, samples in (got.get("io") or {}).items():
            io.setdefault(vm, []).extend(samples)
        hosts.append(entry)
    for samples in io.values():
        samples.sort(key=lambda s: s.get("t", 0))
    logged_in: dict[str, list[str]] = {}
    for entry in hosts:
        for login in (entry["adapter"] or {}).get("logins", []):
            logged_in.setdefault(str(login.get("wwpn")), []).append(entry["name"])
    vports = [{"wwpn": p.wwpn.canonical(), "wwnn": p.wwnn.canonical(),
               "alternate_wwpn": None if p.alternate_wwpn is None
               else p.alternate_wwpn.canonical(), "vm": p.vm, "host": p.host,
               "logged_in_on": sorted(set(logged_in.get(p.wwpn.canonical(), [])
                                          + (logged_in.get(p.alternate_wwpn.canonical(), [])
                                             if p.alternate_wwpn is not None else [])))}
              for p in service.inv.vport_list()]
    return {"at": at, "served_by": service.name, "hosts": hosts, "vms": _vms(service),
            "vports": vports,
            "migrations": [_migration(m) for m in service.inv.migration_list(limit=20)],
            "io": io}


def _server_stopping(request: Request) -> bool:
    """Whether the server asked this connection to end (uvicorn marks the request's
    cycle not keep-alive when it shuts down): a stream then ends at its next tick."""
    cycle = getattr(request.receive, "__self__", None)
    return cycle is not None and getattr(cycle, "keep_alive", True) is False


class _Tools:
    """The sampler and the metrics registry of one app, made on first use (the app can be
    built over a service that is not running, e.g. for its OpenAPI document)."""

    def __init__(self, service: HostService) -> None:
        self.service = service
        self._lock = threading.Lock()
        self._sampler: IoSampler | None = None
        self._registry: CollectorRegistry | None = None

    @property
    def sampler(self) -> IoSampler:
        with self._lock:
            if self._sampler is None:
                self._sampler = IoSampler(self.service.config.run_dir, self.service.name)
            return self._sampler

    @property
    def registry(self) -> CollectorRegistry:
        sampler = self.sampler
        with self._lock:
            if self._registry is None:
                self._registry = make_registry(self.service, sampler)
            return self._registry


def install(app: FastAPI, service: HostService) -> None:
    """Add ``/metrics``, ``/dashboard`` (and its assets), ``/v1/dashboard/host``,
    ``/v1/cluster`` and ``/v1/stream`` to the host's API."""
    tools = _Tools(service)

    @app.get("/metrics", tags=["operator"], response_class=Response,
             responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}})
    def metrics() -> Response:
        """Prometheus text exposition, collected now."""
        return Response(generate_latest(tools.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/dashboard", tags=["operator"], response_class=HTMLResponse)
    def dashboard() -> HTMLResponse:
        """The live dashboard (a page of this package; no network needed)."""
        return HTMLResponse(_asset("index.html"))

    @app.get("/dashboard/static/{name}", tags=["operator"], response_class=Response)
    def dashboard_asset(name: str) -> Response:
        media = ASSETS.get(name)
        if media is None:
            raise HostError(ErrorCode.NOT_FOUND, f"no dashboard asset {name!r}")
        return Response(_asset(name), media_type=media,
                         headers={"Cache-Control": "no-cache"})

    @app.get("/v1/dashboard/host", tags=["operator"])
    def dashboard_host(since: Annotated[float, Query(ge=0)] = 0.0) -> dict[str, Any]:
        """This host's adapter and its guests' IO samples newer than ``since`` (ms since
        the epoch): what another host's ``/v1/cluster`` asks for."""
        return host_state(service, tools.sampler, since)

    @app.get("/v1/cluster", tags=["operator"])
    def cluster(since: Annotated[float, Query(ge=0)] = 0.0) -> dict[str, Any]:
        """Every host of the inventory (each asked over its API), VMs with their mapping
        tables, vports with the hosts they are logged in on, the latest migrations with
        their reports, and the guests' IO samples newer than ``since``."""
        return cluster_state(service, tools.sampler, since)

    # (not in the OpenAPI document: an endless event stream is no request/response pair)
    @app.get("/v1/stream", include_in_schema=False)
    async def stream(request: Request) -> StreamingResponse:
        """Server-sent events: ``cluster`` (a /v1/cluster snapshot, IO samples since the
        previous one) every second; the stream ends after a while and the browser
        reconnects."""
        async def events() -> AsyncIterator[str]:
            started = time.monotonic()
            since = 0.0
            yield f"retry: {int(STREAM_INTERVAL_S * 1000)}\n\n"
            while time.monotonic() - started < STREAM_LIFETIME_S and \
                    not _server_stopping(request):
                try:
                    snap = await run_in_threadpool(cluster_state, service, tools.sampler, since)
                except (InventoryError, HostError) as exc:
                    yield f"event: problem\ndata: {json.dumps({'error': str(exc)})}\n\n"
                else:
                    since = max(0.0, snap["at"] - _OVERLAP_MS)
                    yield f"event: cluster\ndata: {json.dumps(snap, default=str)}\n\n"
                await asyncio.sleep(STREAM_INTERVAL_S)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})
