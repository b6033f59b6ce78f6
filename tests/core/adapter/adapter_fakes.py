"""In-memory platform for the adapter model tests: a pure Fabric behind the FabricPort
interface, memory LUNs, byte-array IO buffers, and a scripted VF data path."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from vfdirect.core.adapter import (
    AdapterModel,
    ArrayInfo,
    DrainResult,
    SavedQueueState,
    VfRecord,
)
from vfdirect.core.alloc import Datastore, VdiskLayout
from vfdirect.core.array import LunKey, PhysicalLun, target_port_wwpn
from vfdirect.core.block import BlockDevice
from vfdirect.core.fabric import Fabric, Login
from vfdirect.core.ids import LunNumber, VdiskId, VfIndex
from vfdirect.core.rpc import ErrorCode, RpcError
from vfdirect.core.wwn import Wwn
from vfdirect.storage import MemoryBackend, VdiskBlockDevice

ARRAY_WWN = Wwn.naa5(0x1000)
ARRAY_PATH = "/san/array0"
TARGET_PORT = target_port_wwpn(ARRAY_WWN, 0)
LUN_BLOCKS = 4096
CHUNK = 64
VPORT = Wwn.naa5(0x2001)
VPORT_NN = Wwn.naa5(0x2002)
VPORT_ALT = Wwn.naa5(0x2003)
VPORT2 = Wwn.naa5(0x2011)
VPORT2_NN = Wwn.naa5(0x2012)
#: fake descriptor numbers the tests pass; each stands for a shared buffer
FD_BUFFER = 1000
FD_BUFFER_SIZE = 1 << 16


class FakeFabric:
    """One adapter's view of a pure, in-process Fabric (several may share one)."""

    def __init__(self, fabric: Fabric, port: Wwn, node: Wwn) -> None:
        self.fabric = fabric
        self._phys = fabric.flogi(port, node)

    @property
    def directory(self) -> str:
        return "memory"

    def physical_login(self) -> Login:
        return self._phys

    def fdisc(self, wwpn: Wwn, wwnn: Wwn) -> Login:
        return self.fabric.fdisc(self._phys.wwpn, wwpn, wwnn)

    def logo(self, wwpn: Wwn) -> None:
        self.fabric.logo(wwpn)

    def zone_create(self, name: str, members: Sequence[Wwn]) -> frozenset[Wwn]:
        self.fabric.zone_create(name, members)
        return self.fabric.zoning.members(name)

    def zone_member_add(self, name: str, members: Sequence[Wwn]) -> frozenset[Wwn]:
        self.fabric.zone_member_add(name, members)
        return self.fabric.zoning.members(name)

    def mask_grant(self, initiator: Wwn, array: Wwn, luns: Sequence[int]) -> tuple[int, ...]:
        return tuple(n for n in luns
                     if self.fabric.mask_grant(initiator, LunKey(array, LunNumber(n))))

    def mask_revoke(self, initiator: Wwn, array: Wwn, luns: Sequence[int]) -> tuple[int, ...]:
        return tuple(n for n in luns
                     if self.fabric.mask_revoke(initiator, LunKey(array, LunNumber(n))))

    def target_ports_add(self, array: Wwn, ports: Sequence[Wwn]) -> None:
        for p in ports:
            self.fabric.target_port_add(p, array)

    def show(self) -> dict[str, Any]:
        return {"config": self.fabric.dump(),
                "logins": [lg.dump() for lg in self.fabric.logins.logins()], "generation": 0}

    def authorize(self, initiator: Wwn, array: Wwn, lun: LunNumber) -> None:
        self.fabric.authorize(initiator, array, lun)


@dataclass
class FakeDataPath:
    """A VF data path whose in-flight requests the test scripts."""

    heads: list[int] = field(default_factory=list)
    fetching: bool = True
    #: drain completes everything (else it times out with the heads still there)
    drains: bool = True
    last: VfRecord | None = None
    initiator: Wwn | None = None
    restored: tuple[Mapping[str, Any], tuple[int, ...]] | None = None
    resets: int = 0

    def configure(self, vf: VfRecord, initiator: Wwn | None) -> None:
        self.last = vf
        self.initiator = initiator

    def outstanding(self) -> int:
        return len(self.heads)

    def quiesce(self) -> int:
        self.fetching = False
        return len(self.heads)

    def drain(self, timeout_ms: int) -> DrainResult:
        if self.drains:
            self.heads.clear()
        return DrainResult(not self.heads, tuple(self.heads))

    def save(self) -> SavedQueueState:
        return SavedQueueState({"format": "fake-queue-state", "version": 1,
                                "queues": [{"last_avail_idx": 7, "used_idx": 7}]}, (501, 502))

    def restore(self, record: Mapping[str, Any], fds: Sequence[int]) -> None:
        self.restored = (record, tuple(fds))

    def resume(self) -> None:
        self.fetching = True

    def reset(self) -> None:
        self.resets += 1
        self.heads.clear()

    def stats(self) -> Mapping[str, Any]:
        return {"ios": 0}


class MemoryPlatform:
    """An AdapterPlatform over memory LUNs and a shared in-process Fabric."""

    def __init__(self, fabric: Fabric | None = None, port_vsid: int = 0x8_0000_0001) -> None:
        self.shared = fabric if fabric is not None else Fabric()
        self._port = (Wwn.naa5(port_vsid), Wwn.naa5(port_vsid | 0x1_0000_0000))
        self._fabric: FakeFabric | None = None
        self.luns: dict[LunKey, MemoryBackend] = {}
        self.geometry: dict[LunKey, PhysicalLun] = {}
        for n in (0, 1):
            key = LunKey(ARRAY_WWN, LunNumber(n))
            self.luns[key] = MemoryBackend(512, LUN_BLOCKS)
            self.geometry[key] = PhysicalLun(key, 512, LUN_BLOCKS)
        self.attached = False
        self.datapaths: dict[int, FakeDataPath] = {}
        self.fd_memory: dict[int, bytearray] = {FD_BUFFER: bytearray(FD_BUFFER_SIZE)}
        self.buffers: dict[int, bytearray] = {}

    @property
    def fabric(self) -> FakeFabric | None:
        return self._fabric

    def array_attach(self, path: str) -> ArrayInfo:
        if path != ARRAY_PATH:
            raise RpcError(ErrorCode.NOT_FOUND, f"array_attach: {path} holds no storage array")
        if self._fabric is None:
            self._fabric = FakeFabric(self.shared, *self._port)
        self._fabric.target_ports_add(ARRAY_WWN, [TARGET_PORT])
        self.attached = True
        return ArrayInfo(ARRAY_WWN, path, (TARGET_PORT,), tuple(self.geometry.values()))

    def lun_geometry(self, key: LunKey) -> PhysicalLun | None:
        return self.geometry.get(key) if self.attached else None

    def vf_socket_path(self, vf: VfIndex) -> str:
        return f"/run/test/vf{int(vf)}.sock"

    def datapath(self, vf: VfIndex) -> FakeDataPath | None:
        return self.datapaths.get(int(vf))

    def io_buffer_attach(self, buffer_id: int, fd: int) -> int:
        mem = self.fd_memory.get(fd)
        if mem is None:
            raise RpcError(ErrorCode.BAD_FDS, f"fd {fd} is not a shared-memory file")
        self.buffers[buffer_id] = mem
        return len(mem)

    def io_buffer_detach(self, buffer_id: int) -> None:
        del self.buffers[buffer_id]

    def io_buffer(self, buffer_id: int) -> memoryview:
        return memoryview(self.buffers[buffer_id])

    def block_device(self, initiator: Wwn, layout: VdiskLayout) -> BlockDevice:
        assert self._fabric is not None
        return VdiskBlockDevice(layout, luns=self.luns.__getitem__, fabric=self._fabric,
                                initiator=initiator)


def datastore() -> Datastore:
    ds = Datastore("ds0", 512, chunk_blocks=CHUNK)
    for n in (0, 1):
        ds.lun_add(PhysicalLun(LunKey(ARRAY_WWN, LunNumber(n)), 512, LUN_BLOCKS), fresh=True)
    return ds


def entry(target: int, lun: int, layout: VdiskLayout, serial: str | None = None,
          wwn: Wwn | None = None) -> dict[str, Any]:
    """A mapping-table entry (wire form) for ``layout`` at (target, lun)."""
    n = target * 1000 + lun
    return {
        "target": target, "lun": lun, "vdisk_id": layout.vdisk_id,
        "block_size": layout.block_size, "capacity_blocks": layout.capacity_blocks,
        "serial": serial or f"VFD{n:08d}", "wwn": (wwn or Wwn.naa5(0x7_0000 + n)).canonical(),
        "layout": layout.dump(),
    }


def mapping(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"format": "vfdirect.vf-mapping", "version": 1,
            "luns": sorted(entries, key=lambda e: (e["target"], e["lun"]))}


def standard_mapping() -> tuple[dict[str, Any], Datastore]:
    """Two thick vdisks at (0, 0) and (0, 1), and one at (1, 0), on LUNs 0 and 1."""
    ds = datastore()
    a = ds.vdisk_create(VdiskId("vd-a"), 200)
    b = ds.vdisk_create(VdiskId("vd-b"), 128)
    c = ds.vdisk_create(VdiskId("vd-c"), 5000)  # spans both LUNs
    return mapping(entry(0, 0, a), entry(0, 1, b), entry(1, 0, c)), ds


def configured_model(platform: MemoryPlatform | None = None, *, max_vfs: int = 4,
                     grant: bool = True) -> tuple[AdapterModel, MemoryPlatform]:
    """Array attached, 4 VFs enabled, VF 0 assigned to vm0 with VPORT bound (masked LUNs
    0 and 1 if ``grant``), zone of VPORT and the array's target port."""
    platform = platform or MemoryPlatform()
    model = AdapterModel(platform, max_vfs=max_vfs)
    model.call("array_attach", {"path": ARRAY_PATH})
    model.call("vf_enable", {"count": max_vfs})
    model.call("vport_create", {"wwpn": VPORT.canonical(), "wwnn": VPORT_NN.canonical(),
                                "alternate_wwpn": VPORT_ALT.canonical()})
    model.call("fabric_zone_create", {"name": "z0", "members": [
        VPORT.canonical(), VPORT_ALT.canonical(), TARGET_PORT.canonical()]})
    if grant:
        model.call("fabric_mask_grant", {"initiator": VPORT.canonical(),
                                         "array": ARRAY_WWN.canonical(), "luns": [0, 1]})
    model.call("vf_assign", {"vf": 0, "vm_name": "vm0", "vm_pid": 4242})
    model.call("vport_bind", {"wwpn": VPORT.canonical(), "vf": 0})
    return model, platform


def rpc_error_of(fn: Any, *args: Any, **kwargs: Any) -> RpcError | None:
    """The RpcError ``fn`` raised, or None if it returned (any other exception escapes)."""
    try:
        fn(*args, **kwargs)
    except RpcError as exc:
        return exc
    return None
