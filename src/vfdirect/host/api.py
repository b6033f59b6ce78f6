"""The host's REST API (FastAPI): the inventory's objects and the claim A operations.

Rules of this module:

* routes are thin: they check the body's shape (pydantic models) and call
  :class:`~vfdirect.host.service.HostService`; they never touch the inventory's rows or
  the PF themselves;
* every refusal is ``{"error": {"code", "name", "message"}}`` with a 4xx status chosen
  from the stable JSON-RPC code (:data:`HTTP_STATUS`); a malformed body is 400 in the same
  shape; anything else escaping a route is a bug, answered 500 in that shape and logged;
* the OpenAPI document is at ``/openapi.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from vfdirect import __version__
from vfdirect.core.array import ArrayModelError, LunKey
from vfdirect.core.ids import LunNumber
from vfdirect.core.rpc import ErrorCode
from vfdirect.core.wwn import Wwn, WwnError
from vfdirect.host.dashboard import install as install_dashboard
from vfdirect.host.inventory import (
    DatastoreView,
    InventoryError,
    LunView,
    MigrationView,
    VdiskAddress,
    VdiskView,
    VmView,
    VportView,
)
from vfdirect.host.log import log_event
from vfdirect.host.service import HostError, HostService, parse_wwn

HTTP_STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_PARAMS: 400,
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.PARSE_ERROR: 400,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.METHOD_NOT_FOUND: 404,
    ErrorCode.WRONG_STATE: 409,
    ErrorCode.CONFLICT: 409,
    ErrorCode.RESOURCE_EXHAUSTED: 409,
    ErrorCode.FABRIC_REFUSED: 409,
    ErrorCode.TIMEOUT: 503,
    ErrorCode.IO_ERROR: 502,
    ErrorCode.BAD_FDS: 500,
    ErrorCode.INTERNAL_ERROR: 500,
}

NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
#: The largest integer the inventory (SQLite, PostgreSQL BIGINT) can store: a larger one
#: in a body or a query is refused (400) instead of overflowing in the database (500).
INT64_MAX = (1 << 63) - 1


# -- bodies ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    code: int
    name: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class LunCreate(BaseModel):
    array: str = Field(description="the array's WWN")
    num_blocks: int = Field(ge=1, le=INT64_MAX)
    block_size: int = Field(default=512, ge=1, le=INT64_MAX)
    lun: int | None = Field(default=None, ge=0, le=16383)


class LunOut(BaseModel):
    array: str
    lun: int
    block_size: int
    num_blocks: int
    backing: str | None = None
    path: str | None = None
    datastore: str | None = None


class DatastoreCreate(BaseModel):
    name: str = Field(pattern=NAME)
    block_size: int = Field(default=512, ge=1, le=INT64_MAX)
    chunk_blocks: int | None = Field(default=None, ge=1, le=INT64_MAX)
    luns: list[str] = Field(default_factory=list,
                            description="physical LUNs as '<array WWN>:<lun>'")


class DatastoreOut(BaseModel):
    name: str
    block_size: int
    chunk_blocks: int
    luns: list[str]
    total_blocks: int
    free_blocks: int
    vdisks: int


class VdiskCreate(BaseModel):
    datastore: str
    name: str = Field(pattern=NAME)
    capacity_blocks: int = Field(ge=1, le=INT64_MAX)
    thin: bool = False


class AddressOut(BaseModel):
    vdisk: str
    vm: str
    vport: str | None
    target: int
    lun: int


class VdiskOut(BaseModel):
    id: str
    name: str
    datastore: str
    capacity_blocks: int
    block_size: int
    thin: bool
    allocated_blocks: int
    serial: str
    lu_wwn: str
    vm: str | None
    address: AddressOut | None


WORKLOAD = r"^(idle|selftest|sequence|verify|load)$"


class VmCreate(BaseModel):
    name: str = Field(pattern=NAME)
    memory_bytes: int = Field(default=16 << 20, ge=1 << 20, le=INT64_MAX)
    #: what ``start`` runs unless told otherwise (kept in the VM's spec file)
    workload: str | None = Field(default=None, pattern=WORKLOAD)
    #: ``qemu``: a QEMU process running a Linux kernel on the VF (host/qemu.py)
    runtime: str = Field(default="python", pattern=r"^(python|qemu)$")
    #: a QEMU VM's kernel and initrd on the host (default: the cached guest image)
    kernel: str | None = Field(default=None, min_length=1, max_length=4096)
    initrd: str | None = Field(default=None, min_length=1, max_length=4096)


class VmStart(BaseModel):
    workload: str | None = Field(default=None, pattern=WORKLOAD)


class VmAttach(BaseModel):
    vdisk: str
    target: int | None = Field(default=None, ge=0, le=255)
    lun: int | None = Field(default=None, ge=0, le=16383)


class VmDetach(BaseModel):
    vdisk: str


class VmExport(BaseModel):
    disk: str = Field(description="sda, sdb... or target:lun")
    unix: str | None = Field(default=None, description="absolute Unix socket path")
    port: int | None = Field(default=None, ge=1, le=65535, description="loopback TCP port")


class VmOut(BaseModel):
    name: str
    host: str | None
    state: str
    pid: int | None
    memory_bytes: int
    runtime: str
    vf: int | None
    vport: str | None
    vdisks: list[str]
    updated_at: datetime


class MigrationOut(BaseModel):
    id: str
    vm: str
    source: str | None
    destination: str | None
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    report: dict[str, Any]
    detail: dict[str, Any]
    progress: dict[str, Any] | None = None


class VmShowOut(BaseModel):
    vm: VmOut
    workload: str
    disks: list[VdiskOut]
    vf_mapping: dict[str, Any] | None
    inventory_mapping: dict[str, Any] | None
    fwtable: dict[str, Any] | None
    #: the VM's latest live migrations, newest first (claim X4)
    migrations: list[MigrationOut] = []
    #: a QEMU VM's image, accelerator (kvm or tcg, and why) and last guest result
    qemu: dict[str, Any] | None = None
    #: the VM's NBD exports (docs/nbd.md)
    exports: list[dict[str, Any]] = []


class VportOut(BaseModel):
    wwpn: str
    wwnn: str
    alternate_wwpn: str | None
    vm: str | None
    host: str | None


class VportCreate(BaseModel):
    wwpn: str | None = Field(default=None, description="default: made up, unique")
    wwnn: str | None = None
    alternate_wwpn: str | None = None
    vm: str | None = Field(default=None, description="associate with this VM (claim A6)")


class EventOut(BaseModel):
    id: int
    at: datetime
    kind: str
    claim: str | None
    host: str | None
    vm: str | None
    vdisk: str | None
    vport: str | None
    detail: dict[str, Any]


class VmMigrate(BaseModel):
    to: str = Field(min_length=1, max_length=64, description="the destination host")
    max_downtime_ms: int = Field(default=300, ge=1, le=600_000)
    drain_timeout_ms: int = Field(default=1000, ge=0, le=600_000)
    max_rounds: int = Field(default=30, ge=1, le=1000)


class MigrationIncoming(BaseModel):
    migration: str = Field(min_length=1, max_length=64)
    vm: str = Field(min_length=1, max_length=64)
    source: str = Field(min_length=1, max_length=64)
    source_port_name: str = Field(min_length=1, max_length=64)


class HostStop(BaseModel):
    keep_running: bool = Field(
        default=False, description="leave the VMs and the adapter running (host restart)")


# -- views -> bodies ---------------------------------------------------------------------


def migration_out(v: MigrationView, progress: dict[str, Any] | None = None) -> MigrationOut:
    return MigrationOut(id=v.id, vm=v.vm, source=v.source, destination=v.destination,
                        started_at=v.started_at, finished_at=v.finished_at,
                        outcome=v.outcome, report=dict(v.phases), detail=dict(v.detail),
                        progress=progress)


def lun_out(v: LunView) -> LunOut:
    return LunOut(array=v.key.array.canonical(), lun=int(v.key.lun), block_size=v.lun.block_size,
                  num_blocks=v.lun.num_blocks, backing=v.backing.value, path=v.path,
                  datastore=v.datastore)


def datastore_out(v: DatastoreView) -> DatastoreOut:
    usage = v.usage
    return DatastoreOut(name=v.name, block_size=v.block_size, chunk_blocks=v.chunk_blocks,
                        luns=[str(lun.key) for lun in v.luns],
                        total_blocks=usage.total_blocks,
                        free_blocks=usage.free_blocks, vdisks=v.vdisks)


def address_out(a: VdiskAddress) -> AddressOut:
    return AddressOut(vdisk=a.vdisk_id, vm=a.vm,
                      vport=None if a.vport is None else a.vport.canonical(),
                      target=int(a.target), lun=a.lun)


def vdisk_out(v: VdiskView) -> VdiskOut:
    return VdiskOut(id=v.id, name=v.name, datastore=v.datastore,
                    capacity_blocks=v.capacity_blocks, block_size=v.block_size, thin=v.thin,
                    allocated_blocks=v.allocated_blocks, serial=v.serial,
                    lu_wwn=v.lu_wwn.canonical(), vm=v.vm,
                    address=None if v.address is None else address_out(v.address))


def vm_out(v: VmView) -> VmOut:
    return VmOut(name=v.name, host=v.host, state=v.state.value, pid=v.pid,
                 memory_bytes=v.memory_bytes, runtime=v.runtime.value,
                 vf=None if v.vf is None else int(v.vf),
                 vport=None if v.vport is None else v.vport.canonical(),
                 vdisks=list(v.vdisks), updated_at=v.updated_at)


def vport_out(v: VportView) -> VportOut:
    return VportOut(wwpn=v.wwpn.canonical(), wwnn=v.wwnn.canonical(),
                    alternate_wwpn=None if v.alternate_wwpn is None
                    else v.alternate_wwpn.canonical(), vm=v.vm, host=v.host)


def _error(code: ErrorCode, message: str) -> JSONResponse:
    body = ErrorBody(error=ErrorDetail(code=int(code), name=code.name, message=message))
    return JSONResponse(status_code=HTTP_STATUS.get(code, 500), content=body.model_dump())


#: The error code of a refusal by the framework itself (no route, no such method, a body
#: that is not JSON): the HTTP status stays the framework's.
FRAMEWORK_CODES: dict[int, ErrorCode] = {
    400: ErrorCode.PARSE_ERROR,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_FOUND,
}


def _lun_key(text: str) -> LunKey:
    array, sep, lun = text.rpartition(":")
    if not sep or not lun.isdigit():
        raise HostError(ErrorCode.INVALID_PARAMS,
                        f"LUN {text!r} is not '<array WWN>:<lun number>'")
    try:
        return LunKey(Wwn.parse(array), LunNumber(int(lun)))
    except (ValueError, WwnError, ArrayModelError) as exc:
        raise HostError(ErrorCode.INVALID_PARAMS, f"LUN {text!r}: {exc}") from None


def create_app(service: HostService, *, on_stop: Callable[[bool], None]) -> FastAPI:
    """The API of one host."""
    app = FastAPI(title="vfdirect host", version=__version__,
                  description="The hypervisor of one vfdirect host: storage, vdisks, "
                              "mapping info, vports, VMs (claim A).",
                  responses={400: {"model": ErrorBody}, 404: {"model": ErrorBody},
                             409: {"model": ErrorBody}})
    log = service.log

    @app.exception_handler(InventoryError)
    async def _inventory_error(request: Request, exc: InventoryError) -> JSONResponse:
        return _error(exc.code, str(exc))

    @app.exception_handler(HostError)
    async def _host_error(request: Request, exc: HostError) -> JSONResponse:
        return _error(exc.code, exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = FRAMEWORK_CODES.get(exc.status_code, ErrorCode.INVALID_REQUEST)
        body = ErrorBody(error=ErrorDetail(code=int(code), name=code.name,
                                           message=str(exc.detail)))
        return JSONResponse(status_code=exc.status_code, content=body.model_dump(),
                            headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
            parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
        return _error(ErrorCode.INVALID_PARAMS, "; ".join(parts) or "invalid request")

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log_event(log, "api_internal_error", level=logging.ERROR, path=request.url.path,
                  exc_info=exc)
        return _error(ErrorCode.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")

    # -- host and adapter --------------------------------------------------------------

    @app.get("/v1/host", tags=["host"])
    def host_status() -> dict[str, Any]:
        return service.status()

    @app.post("/v1/host/stop", tags=["host"])
    def host_stop(body: HostStop) -> dict[str, Any]:
        on_stop(body.keep_running)
        return {"stopping": True, "keep_running": body.keep_running}

    @app.get("/v1/adapter", tags=["adapter"])
    def adapter_show() -> dict[str, Any]:
        return service.adapter_show()

    @app.get("/v1/events", tags=["host"])
    def events(claim: str | None = None, vm: str | None = None,
               after: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
               limit: Annotated[int, Query(ge=1, le=INT64_MAX)] = 1000) -> list[EventOut]:
        return [EventOut(id=e.id, at=e.at, kind=e.kind, claim=e.claim, host=e.host, vm=e.vm,
                         vdisk=e.vdisk, vport=e.vport, detail=dict(e.detail))
                for e in service.inv.event_list(claim=claim, vm=vm, after_id=after,
                                                limit=limit)]

    # -- storage -----------------------------------------------------------------------

    @app.get("/v1/luns", tags=["storage"])
    def lun_list(array: str | None = None) -> list[LunOut]:
        return [lun_out(v) for v in service.inv.lun_list(array)]

    @app.post("/v1/luns", status_code=201, tags=["storage"])
    def lun_create(body: LunCreate) -> LunOut:
        made = service.lun_create(parse_wwn(body.array, "array"), body.num_blocks,
                                  body.block_size, body.lun)
        return LunOut(**made)

    @app.get("/v1/datastores", tags=["storage"])
    def datastore_list() -> list[DatastoreOut]:
        return [datastore_out(v) for v in service.inv.datastore_list()]

    @app.post("/v1/datastores", status_code=201, tags=["storage"])
    def datastore_create(body: DatastoreCreate) -> DatastoreOut:
        keys = [_lun_key(t) for t in body.luns]
        with service._op():
            view = service.inv.datastore_create(body.name, block_size=body.block_size,
                                                chunk_blocks=body.chunk_blocks, luns=keys)
        log_event(log, "datastore_create", datastore=body.name, luns=body.luns)
        return datastore_out(view)

    # -- vdisks (claim A1) ---------------------------------------------------------------

    @app.get("/v1/vdisks", tags=["vdisks"])
    def vdisk_list(datastore: str | None = None, vm: str | None = None) -> list[VdiskOut]:
        return [vdisk_out(v) for v in service.inv.vdisk_list(datastore=datastore, vm=vm)]

    @app.post("/v1/vdisks", status_code=201, tags=["vdisks"])
    def vdisk_create(body: VdiskCreate) -> VdiskOut:
        return vdisk_out(service.vdisk_create(body.datastore, body.name, body.capacity_blocks,
                                              body.thin))

    @app.get("/v1/vdisks/{vdisk}", tags=["vdisks"])
    def vdisk_get(vdisk: str) -> VdiskOut:
        return vdisk_out(service.inv.vdisk_get(vdisk))

    @app.delete("/v1/vdisks/{vdisk}", tags=["vdisks"])
    def vdisk_delete(vdisk: str) -> dict[str, Any]:
        service.vdisk_delete(vdisk)
        return {"deleted": vdisk}

    # -- VMs (claims A2-A8) ----------------------------------------------------------------

    @app.get("/v1/vms", tags=["vms"])
    def vm_list() -> list[VmOut]:
        return [vm_out(v) for v in service.inv.vm_list()]

    @app.post("/v1/vms", status_code=201, tags=["vms"])
    def vm_create(body: VmCreate) -> VmOut:
        return vm_out(service.vm_create(
            body.name, body.memory_bytes, body.workload, runtime=body.runtime,
            kernel=None if body.kernel is None else Path(body.kernel),
            initrd=None if body.initrd is None else Path(body.initrd)))

    @app.get("/v1/vms/{name}", tags=["vms"])
    def vm_show(name: str) -> VmShowOut:
        shown = service.vm_show(name)
        return VmShowOut(vm=vm_out(shown["vm"]), workload=shown["workload"],
                         disks=[vdisk_out(d) for d in shown["disks"]],
                         vf_mapping=shown["vf_mapping"],
                         inventory_mapping=shown["inventory_mapping"],
                         fwtable=shown["fwtable"],
                         migrations=[migration_out(m) for m in shown["migrations"]],
                         qemu=shown.get("qemu"), exports=shown.get("exports", []))

    @app.delete("/v1/vms/{name}", tags=["vms"])
    def vm_delete(name: str) -> dict[str, Any]:
        service.vm_delete(name)
        return {"deleted": name}

    @app.post("/v1/vms/{name}/start", tags=["vms"])
    def vm_start(name: str, body: VmStart | None = None) -> VmOut:
        return vm_out(service.vm_start(name, None if body is None else body.workload))

    @app.post("/v1/vms/{name}/stop", tags=["vms"])
    def vm_stop(name: str) -> VmOut:
        return vm_out(service.vm_stop(name))

    @app.post("/v1/vms/{name}/pause", tags=["vms"])
    def vm_pause(name: str) -> VmOut:
        return vm_out(service.vm_pause(name))

    @app.post("/v1/vms/{name}/resume", tags=["vms"])
    def vm_resume(name: str) -> VmOut:
        return vm_out(service.vm_resume(name))

    @app.post("/v1/vms/{name}/attach", tags=["vms"])
    def vm_attach(name: str, body: VmAttach) -> AddressOut:
        return address_out(service.vm_attach(name, body.vdisk, body.target, body.lun))

    @app.post("/v1/vms/{name}/detach", tags=["vms"])
    def vm_detach(name: str, body: VmDetach) -> AddressOut:
        return address_out(service.vm_detach(name, body.vdisk))

    @app.post("/v1/vms/{name}/exports", tags=["vms"])
    def vm_export(name: str, body: VmExport) -> dict[str, Any]:
        return dict(service.vm_export(name, body.disk, unix=body.unix, port=body.port))

    @app.delete("/v1/vms/{name}/exports/{disk}", tags=["vms"])
    def vm_unexport(name: str, disk: str) -> list[dict[str, Any]]:
        return list(service.vm_export(name, disk, remove=True))

    @app.get("/v1/vms/{name}/console", response_class=PlainTextResponse, tags=["vms"])
    def vm_console(name: str) -> str:
        return service.vm_console(name)

    @app.get("/v1/vms/{name}/mapping", tags=["vms"])
    def vm_mapping(name: str) -> dict[str, Any]:
        """Claim A2: the VM's mapping info as the inventory keeps it (both mappings)."""
        info = service.mapping_build(name)
        return {"vm": info.vm,
                "vport": None if info.vport is None else info.vport.wwpn.canonical(),
                "entries": [{"vdisk": e.vdisk.id, "name": e.vdisk.name,
                             "target": int(e.address.target), "lun": e.address.lun,
                             "layout": e.layout.dump()} for e in info.entries],
                "physical_luns": [str(k) for k in info.physical_luns()]}

    # -- live migration (claims B1-B7, X1-X5) -------------------------------------------

    @app.post("/v1/vms/{name}/migrate", status_code=202, tags=["migration"])
    def vm_migrate(name: str, body: VmMigrate) -> dict[str, Any]:
        """Start a live migration; follow it with GET /v1/migrations/{id}."""
        return service.vm_migrate(name, body.to, max_downtime_ms=body.max_downtime_ms,
                                  drain_timeout_ms=body.drain_timeout_ms,
                                  max_rounds=body.max_rounds)

    @app.get("/v1/migrations", tags=["migration"])
    def migration_list(vm: str | None = None,
                       limit: int = Query(default=100, ge=1, le=1000)) -> list[MigrationOut]:
        return [migration_out(v) for v in service.inv.migration_list(vm=vm, limit=limit)]

    @app.get("/v1/migrations/{ident}", tags=["migration"])
    def migration_show(ident: str) -> MigrationOut:
        shown = service.migration_show(ident)
        return migration_out(shown["migration"], shown["progress"])

    @app.post("/v1/migrations/incoming", tags=["migration"])
    def migration_incoming(body: MigrationIncoming) -> dict[str, Any]:
        """Destination side of a migration's prepare step (called by the source host)."""
        return service.migration_incoming(body.migration, body.vm, body.source,
                                          body.source_port_name)

    # -- vports ------------------------------------------------------------------------

    @app.get("/v1/vports", tags=["vports"])
    def vport_list() -> list[VportOut]:
        return [vport_out(v) for v in service.inv.vport_list()]

    @app.post("/v1/vports", status_code=201, tags=["vports"])
    def vport_create(body: VportCreate) -> VportOut:
        return vport_out(service.vport_create(body.wwpn, body.wwnn, body.alternate_wwpn,
                                              body.vm))

    # -- operator: /metrics, /dashboard, /v1/cluster, /v1/stream -----------------------

    install_dashboard(app, service)

    return app
