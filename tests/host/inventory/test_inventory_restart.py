"""Claim A9: the mapping info, and all the hypervisor created, is kept in storage the
hypervisor reaches and survives its restart."""

from __future__ import annotations

import signal
import subprocess
import sys

from inventory_helpers import CHUNK, WAIT_S, add_datastore, all_extents, assert_disjoint

from vfdirect.core.adapter.mapping import MappingTable
from vfdirect.core.alloc import Datastore
from vfdirect.host.inventory import Inventory, VmState


def _snapshot(inv: Inventory) -> dict[str, object]:
    return {
        "hosts": inv.host_list(), "arrays": inv.array_list(),
        "datastores": inv.datastore_list(), "dump": inv.datastore_dump("ds0"),
        "vdisks": inv.vdisk_list(), "layouts": {v.id: inv.vdisk_layout(v.id)
                                                for v in inv.vdisk_list()},
        "vms": inv.vm_list(), "vports": inv.vport_list(), "vfs": inv.vf_list(),
        "mapping": inv.mapping_build("vm1"), "table": inv.vm_mapping_table("vm1"),
        "events": inv.event_list(),
    }


def test_claim_A9_mapping_info_survives_a_restart(db_url: str) -> None:
    with Inventory.open(db_url) as inv:
        add_datastore(inv, luns=2)
        inv.host_register("h1", api_address="127.0.0.1:8000", run_dir="/run/h1")
        inv.vm_create("vm1", memory_bytes=1 << 26, host="h1")
        for i, (blocks, thin) in enumerate([(100, False), (5000, False), (3 * CHUNK, True)]):
            v = inv.vdisk_create("ds0", f"d{i}", blocks, thin=thin)
            if thin:
                inv.vdisk_inflate(v.id)
            inv.vdisk_attach("vm1", v.id)
        deleted = inv.vdisk_create("ds0", "gone", 2 * CHUNK)
        inv.vdisk_delete(deleted.id)  # leaves dirty ranges
        inv.vport_create(host="h1", vm="vm1")
        inv.vf_assign("h1", 3, "vm1")
        inv.vm_set_state("vm1", VmState.STARTING)
        inv.vm_set_state("vm1", VmState.RUNNING, pid=1234)
        before = _snapshot(inv)
    assert before["dump"]["dirty"]  # type: ignore[index]

    with Inventory.open(db_url) as inv:  # the hypervisor restarted
        assert _snapshot(inv) == before
        MappingTable.load(inv.vm_mapping_table("vm1"))
        # the allocator carries on from the stored state
        model = Datastore.load(inv.datastore_dump("ds0"))
        after = inv.vdisk_create("ds0", "after", 700)
        assert inv.vdisk_layout(after.id) == model.vdisk_create(after.id, 700)
        assert_disjoint(all_extents(inv))


CRASHER = """
import sys
from vfdirect.host.inventory import Inventory
inv = Inventory.open(sys.argv[1])
inv.vm_create("vm-crash", memory_bytes=1 << 20)
v = inv.vdisk_create("ds0", "crash-disk", 100)
inv.vdisk_attach("vm-crash", v.id)
print(v.id, flush=True)
sys.stdin.read()  # killed here, without closing anything
"""


def test_claim_A9_committed_changes_survive_a_killed_hypervisor(db_url: str) -> None:
    with Inventory.open(db_url) as inv:
        add_datastore(inv, luns=1)
    proc = subprocess.Popen([sys.executable, "-c", CRASHER, db_url], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        vdisk_id = proc.stdout.readline().strip()
        assert vdisk_id.startswith("vd-"), proc.stderr.read() if proc.stderr else ""
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=WAIT_S)
    with Inventory.open(db_url) as inv:
        assert inv.vdisk_get("crash-disk").id == vdisk_id
        assert [e.vdisk.id for e in inv.mapping_build("vm-crash").entries] == [vdisk_id]
