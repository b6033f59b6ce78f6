"""Hosts, VMs and their states, vdisk attachment (claim A3) and addresses (claim A2),
virtual ports (claims A5, A6), VF assignments and the event log."""

from __future__ import annotations

import pytest
from inventory_helpers import add_datastore

from vfdirect.core.wwn import Wwn
from vfdirect.host.inventory import (
    VM_TRANSITIONS,
    AlreadyAttachedError,
    ConflictError,
    DuplicateWwnError,
    HostState,
    InvalidArgumentError,
    Inventory,
    NotFoundError,
    VmRuntime,
    VmState,
    WrongStateError,
)

MiB = 1 << 20


def _vm(inv: Inventory, name: str = "vm1", host: str = "h1") -> None:
    if host not in {h.name for h in inv.host_list()}:
        inv.host_register(host, api_address="127.0.0.1:8000", run_dir=f"/run/{host}")
    inv.vm_create(name, memory_bytes=64 * MiB, host=host)


def test_hosts(inventory: Inventory) -> None:
    h = inventory.host_register("h1", api_address="127.0.0.1:8000", run_dir="/run/h1")
    assert (h.state, h.api_address, h.run_dir) == (HostState.UP, "127.0.0.1:8000", "/run/h1")
    assert h.heartbeat_at is not None and h.heartbeat_at.tzinfo is not None
    beat = inventory.host_heartbeat("h1")
    assert beat.heartbeat_at is not None and beat.heartbeat_at >= h.heartbeat_at
    assert inventory.host_set_state("h1", HostState.DOWN).state is HostState.DOWN
    again = inventory.host_register("h1", api_address="127.0.0.1:9000")
    assert (again.state, again.api_address, again.created_at) == (
        HostState.UP, "127.0.0.1:9000", h.created_at)
    assert [x.name for x in inventory.host_list()] == ["h1"]
    with pytest.raises(NotFoundError, match="no host 'h2'"):
        inventory.host_get("h2")


def test_vm_create_get_list(inventory: Inventory) -> None:
    _vm(inventory, "vm1")
    inventory.vm_create("vm2", memory_bytes=MiB, runtime=VmRuntime.QEMU)
    vm = inventory.vm_get("vm1")
    assert (vm.host, vm.state, vm.runtime, vm.pid, vm.vf, vm.vport, vm.vdisks) == (
        "h1", VmState.DEFINED, VmRuntime.PYTHON, None, None, None, ())
    assert [v.name for v in inventory.vm_list()] == ["vm1", "vm2"]
    assert [v.name for v in inventory.vm_list(host="h1")] == ["vm1"]
    with pytest.raises(ConflictError, match="VM 'vm1' already exists"):
        inventory.vm_create("vm1", memory_bytes=MiB)
    with pytest.raises(NotFoundError, match="no host 'nowhere'"):
        inventory.vm_create("vm3", memory_bytes=MiB, host="nowhere")
    with pytest.raises(InvalidArgumentError, match="memory"):
        inventory.vm_create("vm3", memory_bytes=0)


def test_vm_state_changes_follow_the_table(inventory: Inventory) -> None:
    _vm(inventory)
    assert inventory.vm_set_state("vm1", VmState.STARTING).state is VmState.STARTING
    running = inventory.vm_set_state("vm1", VmState.RUNNING, pid=4242)
    assert (running.state, running.pid) == (VmState.RUNNING, 4242)
    with pytest.raises(WrongStateError, match="VM 'vm1' is running: it cannot become defined"):
        inventory.vm_set_state("vm1", VmState.DEFINED)
    with pytest.raises(WrongStateError, match="is running, not paused"):
        inventory.vm_set_state("vm1", VmState.STOPPED, expect=VmState.PAUSED)
    assert inventory.vm_get("vm1").state is VmState.RUNNING
    stopped = inventory.vm_set_state("vm1", VmState.STOPPED)
    assert (stopped.state, stopped.pid) == (VmState.STOPPED, None)
    moves = [(e.detail["from"], e.detail["to"]) for e in inventory.event_list(kind="vm_state")]
    assert moves == [("defined", "starting"), ("starting", "running"), ("running", "stopped")]
    assert all(VmState.ERROR in targets or s is VmState.ERROR
               for s, targets in VM_TRANSITIONS.items())


def test_attach_assigns_the_next_free_address(inventory: Inventory) -> None:
    """Claims A2, A3: vdisks are allocated to a VM, each at its own address."""
    add_datastore(inventory)
    _vm(inventory)
    ids = [inventory.vdisk_create("ds0", f"d{i}", 100).id for i in range(4)]
    a0 = inventory.vdisk_attach("vm1", ids[0])
    a1 = inventory.vdisk_attach("vm1", ids[1])
    a2 = inventory.vdisk_attach("vm1", ids[2], target=3)
    assert [(a.target, a.lun) for a in (a0, a1, a2)] == [(0, 0), (0, 1), (3, 0)]
    with pytest.raises(ConflictError, match="target 0 LUN 1 is taken by vdisk"):
        inventory.vdisk_attach("vm1", ids[3], target=0, lun=1)
    inventory.vdisk_detach(ids[0])
    assert (inventory.vdisk_attach("vm1", ids[3]).lun, inventory.vdisk_get(ids[3]).vm) == (
        0, "vm1")
    assert inventory.vm_get("vm1").vdisks == (ids[3], ids[1], ids[2])
    assert [v.id for v in inventory.vdisk_list(vm="vm1")] == sorted(
        [ids[1], ids[2], ids[3]], key=lambda i: inventory.vdisk_get(i).name)
    with pytest.raises(InvalidArgumentError, match="target 256"):
        inventory.vdisk_attach("vm1", ids[0], target=256)
    with pytest.raises(WrongStateError, match="not attached"):
        inventory.vdisk_detach(ids[0])
    assert inventory.event_list(kind="vdisk_attach")[0].claim == "A3"


def test_attaching_a_vdisk_to_a_second_vm_is_refused(inventory: Inventory) -> None:
    add_datastore(inventory)
    _vm(inventory, "vm1")
    _vm(inventory, "vm2")
    v = inventory.vdisk_create("ds0", "shared", 100)
    inventory.vdisk_attach("vm1", v.id)
    events = inventory.event_list()
    with pytest.raises(AlreadyAttachedError, match=r"'shared'\) is already attached to VM 'vm1'"):
        inventory.vdisk_attach("vm2", "shared")
    with pytest.raises(AlreadyAttachedError):
        inventory.vdisk_attach("vm1", "shared")
    assert inventory.vm_get("vm2").vdisks == ()
    assert inventory.vdisk_get("shared").vm == "vm1"
    assert inventory.event_list() == events
    with pytest.raises(ConflictError, match="attached to VM 'vm1'; detach it first"):
        inventory.vdisk_delete("shared")


def test_vport_names_are_generated_naa5_and_unique(inventory: Inventory) -> None:
    """Claim A5: a vport's names are made up unique in the inventory, in NAA 5 form,
    with an alternate WWPN for migration (claim X3)."""
    _vm(inventory)
    ports = [inventory.vport_create(host="h1") for _ in range(20)]
    names = [w for p in ports for w in (p.wwpn, p.wwnn, p.alternate_wwpn)]
    assert all(w is not None and w.naa_type == 5 for w in names)
    assert len(set(names)) == len(names)
    p = ports[0]
    assert p.alternate_wwpn is not None
    assert p.wwpn.canonical().startswith("naa.5")
    assert {p.wwpn.vendor_specific >> 32, p.wwnn.vendor_specific >> 32,
            p.alternate_wwpn.vendor_specific >> 32} == {0xA, 0xB, 0xC}
    assert p.port_names() == (p.wwpn, p.alternate_wwpn)
    assert inventory.vport_get(p.alternate_wwpn) == inventory.vport_get(p.wwpn) == p
    assert inventory.vport_create(alternate=False).alternate_wwpn is None
    assert len(inventory.vport_list(host="h1")) == 20
    assert inventory.event_list(kind="vport_create")[0].claim == "A5"


def test_duplicate_wwpn_is_refused_against_every_name(inventory: Inventory) -> None:
    storage = add_datastore(inventory)
    v = inventory.vdisk_create("ds0", "d", 100)
    p = inventory.vport_create(wwpn=Wwn.naa5(0x2001), wwnn=Wwn.naa5(0x2002),
                               alternate_wwpn=Wwn.naa5(0x2003))
    assert p.wwpn == Wwn.naa5(0x2001) and p.alternate_wwpn == Wwn.naa5(0x2003)
    before = inventory.vport_list(), inventory.event_list()
    for taken, what in [
        (p.wwpn, "the WWPN of vport"), (p.alternate_wwpn, "the alternate WWPN of vport"),
        (p.wwnn, "the WWNN of vport"), (v.lu_wwn, "the LU name of vdisk"),
        (storage.array, "a storage array's name"),
    ]:
        assert taken is not None
        with pytest.raises(DuplicateWwnError, match=what):
            inventory.vport_create(wwpn=taken)
        with pytest.raises(DuplicateWwnError, match=what):
            inventory.vport_create(alternate_wwpn=taken)
    # any text form of a name is the same name
    with pytest.raises(DuplicateWwnError, match=r"alternate WWPN of vport naa\.50af1de000002001"):
        inventory.vport_create(wwpn="50:AF:1D:E0:00:00:20:03")
    with pytest.raises(InvalidArgumentError, match="must differ"):
        inventory.vport_create(wwpn=Wwn.naa5(0x5), alternate_wwpn=Wwn.naa5(0x5))
    with pytest.raises(InvalidArgumentError, match="WWPN"):
        inventory.vport_create(wwpn="naa.5")
    assert (inventory.vport_list(), inventory.event_list()) == before
    inventory.vport_delete(p.alternate_wwpn)  # its names are free again
    assert inventory.vport_create(wwpn=p.wwpn).wwpn == p.wwpn


def test_vport_association_puts_addresses_under_it(inventory: Inventory) -> None:
    """Claim A6: the vport is associated with the VM's mapping info; the second mapping
    then reads (vport WWPN, target, LUN)."""
    add_datastore(inventory)
    _vm(inventory, "vm1")
    _vm(inventory, "vm2")
    a = inventory.vdisk_create("ds0", "a", 100)
    b = inventory.vdisk_create("ds0", "b", 100)
    inventory.vdisk_attach("vm1", a.id)
    port = inventory.vport_create(host="h1")
    assert inventory.vdisk_get("a").address.vport is None  # type: ignore[union-attr]
    assert inventory.vport_associate(port.wwpn, "vm1").vm == "vm1"
    inventory.vdisk_attach("vm1", b.id)
    for v in (a, b):
        address = inventory.vdisk_get(v.id).address
        assert address is not None and address.vport == port.wwpn
    assert inventory.vm_get("vm1").vport == port.wwpn
    with pytest.raises(ConflictError, match="is associated with VM 'vm1'"):
        inventory.vport_associate(port.wwpn, "vm2")
    other = inventory.vport_create()
    with pytest.raises(ConflictError, match="VM 'vm1' is associated with vport"):
        inventory.vport_associate(other.wwpn, "vm1")
    with pytest.raises(ConflictError, match="is associated with VM 'vm1'"):
        inventory.vport_delete(port.wwpn)
    inventory.vport_dissociate(port.wwpn)
    assert inventory.vdisk_get("a").address.vport is None  # type: ignore[union-attr]
    created = inventory.vport_create(vm="vm2")  # associate at creation
    assert inventory.vm_get("vm2").vport == created.wwpn
    assert [e.claim for e in inventory.event_list(kind="vport_associate")] == ["A6", "A6"]


def test_vf_assignments_and_moving_a_vm(inventory: Inventory) -> None:
    _vm(inventory, "vm1", "h1")
    _vm(inventory, "vm2", "h1")
    inventory.host_register("h2")
    port = inventory.vport_create(host="h1", vm="vm1")
    assert inventory.vf_assign("h1", 0, "vm1").vf == 0
    assert inventory.vm_get("vm1").vf == 0
    with pytest.raises(ConflictError, match="VF 0 of host 'h1' is assigned to VM 'vm1'"):
        inventory.vf_assign("h1", 0, "vm2")
    with pytest.raises(ConflictError, match="already holds VF 0"):
        inventory.vf_assign("h1", 1, "vm1")
    inventory.vf_assign("h2", 0, "vm1")  # a destination reserves a VF before migrating
    assert [(a.host, a.vf, a.vm) for a in inventory.vf_list()] == [
        ("h1", 0, "vm1"), ("h2", 0, "vm1")]
    moved = inventory.vm_set_host("vm1", "h2")
    assert (moved.host, moved.vf) == ("h2", 0)
    assert inventory.vport_get(port.wwpn).host == "h2"  # the vport follows the VM
    inventory.vf_release("h1", 0)
    assert [a.host for a in inventory.vf_list(host="h1")] == []
    with pytest.raises(NotFoundError, match="VF 0 of host 'h1' is not assigned"):
        inventory.vf_release("h1", 0)
    with pytest.raises(InvalidArgumentError, match="VF index"):
        inventory.vf_assign("h1", 256, "vm2")


def test_vm_delete_refuses_while_in_use(inventory: Inventory) -> None:
    add_datastore(inventory)
    _vm(inventory)
    v = inventory.vdisk_create("ds0", "d", 100)
    inventory.vdisk_attach("vm1", v.id)
    port = inventory.vport_create(vm="vm1")
    inventory.vf_assign("h1", 2, "vm1")
    inventory.vm_set_state("vm1", VmState.STARTING)
    with pytest.raises(WrongStateError, match="stop it first"):
        inventory.vm_delete("vm1")
    inventory.vm_set_state("vm1", VmState.STOPPED)
    with pytest.raises(ConflictError, match="vdisks attached"):
        inventory.vm_delete("vm1")
    inventory.vdisk_detach(v.id)
    with pytest.raises(ConflictError, match="associated with vport"):
        inventory.vm_delete("vm1")
    inventory.vport_dissociate(port.wwpn)
    with pytest.raises(ConflictError, match="still holds VF 2"):
        inventory.vm_delete("vm1")
    inventory.vf_release("h1", 2)
    inventory.vm_delete("vm1")
    assert inventory.vm_list() == ()


def test_event_log(inventory: Inventory) -> None:
    e1 = inventory.event_append("migration_phase", claim="B1", vm="vm1", migration="m-1",
                                detail={"phase": "quiesce", "ms": 1.5})
    e2 = inventory.event_append("claim_step", claim="A4", vm="vm1", detail={"vf": 0})
    assert e2.id > e1.id and e2.at >= e1.at
    assert inventory.event_list(vm="vm1") == (e1, e2)
    assert inventory.event_list(claim="B1") == (e1,)
    assert inventory.event_list(after_id=e1.id) == (e2,)
    assert inventory.event_list(limit=1) == (e1,)
    assert e1.detail == {"phase": "quiesce", "ms": 1.5} and e1.migration == "m-1"
    with pytest.raises(InvalidArgumentError):
        inventory.event_append("")


def _migration(inv: Inventory) -> str:
    _vm(inv, "vm1", "h1")
    inv.host_register("h2", api_address="127.0.0.1:8001", run_dir="/run/h2")
    return inv.migration_begin("mig-1", "vm1", source="h1", destination="h2").id


def test_migration_commit_moves_the_vm_once_decided(inventory: Inventory) -> None:
    ident = _migration(inventory)
    assert inventory.migration_commit(ident, "vm1", "h2") is True
    assert inventory.vm_get("vm1").host == "h2"
    # decided: the destination's give-up finds the commit; a repeat commit is harmless
    assert inventory.migration_give_up(ident) is True
    assert inventory.migration_commit(ident, "vm1", "h2") is True
    inventory.migration_update(ident, detail={"note": "merged"})  # never loses it
    assert inventory.migration_get(ident).detail["decision"] == "committed"


def test_migration_given_up_refuses_the_commit(inventory: Inventory) -> None:
    ident = _migration(inventory)
    assert inventory.migration_give_up(ident) is False
    assert inventory.migration_give_up(ident) is False
    assert inventory.migration_commit(ident, "vm1", "h2") is False
    assert inventory.vm_get("vm1").host == "h1"
    inventory.migration_update(ident, detail={"note": "merged"})
    assert inventory.migration_get(ident).detail["decision"] == "aborted"
