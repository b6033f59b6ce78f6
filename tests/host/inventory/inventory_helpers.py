"""Helpers of the inventory tests: storage set-up, schemas on the PostgreSQL test server,
worker processes, and checks on what the inventory holds."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from vfdirect.core.alloc import Extent
from vfdirect.core.array import LunKey, target_port_wwpn
from vfdirect.core.ids import LunNumber
from vfdirect.core.wwn import Wwn
from vfdirect.host.inventory import Inventory

LUN_BLOCKS = 4096
CHUNK = 64
#: every bounded wait of these tests, in seconds
WAIT_S = 120


@contextlib.contextmanager
def pg_schema_url(server_url: str) -> Iterator[str]:
    """A URL whose connections work in a new, empty schema of the server's database;
    the schema is dropped afterwards."""
    schema = f"vfdtest_{secrets.token_hex(6)}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f"CREATE SCHEMA {schema}"))
        url = make_url(server_url).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()


@dataclass(frozen=True)
class Storage:
    array: Wwn
    luns: tuple[LunKey, ...]


def add_storage(inv: Inventory, *, array_vsid: int = 0x1000, luns: int = 2,
                blocks: int = LUN_BLOCKS, block_size: int = 512) -> Storage:
    """Register an array (one target port) with ``luns`` file LUNs of ``blocks`` blocks."""
    array = Wwn.naa5(array_vsid)
    inv.array_register(array, f"/san/array-{array_vsid:x}", [target_port_wwpn(array, 0)])
    keys = []
    for n in range(luns):
        inv.lun_register(array, n, block_size=block_size, num_blocks=blocks,
                         path=f"lun-{n:05d}.img")
        keys.append(LunKey(array, LunNumber(n)))
    return Storage(array, tuple(keys))


def add_datastore(inv: Inventory, name: str = "ds0", *, array_vsid: int = 0x1000,
                  luns: int = 2, blocks: int = LUN_BLOCKS, chunk: int = CHUNK) -> Storage:
    storage = add_storage(inv, array_vsid=array_vsid, luns=luns, blocks=blocks)
    inv.datastore_create(name, chunk_blocks=chunk, luns=storage.luns)
    return storage


def all_extents(inv: Inventory, datastore: str | None = None) -> list[tuple[Extent, str]]:
    return [(p.extent, v.id) for v in inv.vdisk_list(datastore=datastore)
            for p in inv.vdisk_layout(v.id).placements]


def assert_disjoint(extents: Iterable[tuple[Extent, str]]) -> None:
    """No block belongs to two extents."""
    ordered = sorted(extents)
    for (a, va), (b, vb) in pairwise(ordered):
        assert not a.overlaps(b), f"{va} and {vb} share blocks: {a} and {b}"


# A worker process: opens the inventory itself, waits for "go" on stdin (so that the
# workers really run at once), then creates, grows, deletes and scrubs vdisks on one
# datastore, and prints the ids of the vdisks it kept.
WORKER = r"""
import json, sys
from vfdirect.host.inventory import Inventory, OutOfSpaceError
url, datastore, prefix, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
inv = Inventory.open(url, busy_timeout_s=60)
print("ready", flush=True)
sys.stdin.readline()
kept, refused, scrapped = [], 0, 0

def scrap(vdisk_id):
    for extent in inv.vdisk_delete(vdisk_id):
        inv.datastore_mark_zeroed(datastore, extent)

for i in range(count):
    try:
        v = inv.vdisk_create(datastore, f"{prefix}-{i}", 64 * (1 + i % 3), thin=i % 2 == 1)
    except OutOfSpaceError:
        refused += 1
        continue
    try:
        if v.thin:
            inv.vdisk_allocate(v.id, v.capacity_blocks - 1, 1)
            inv.vdisk_inflate(v.id)
    except OutOfSpaceError:
        scrap(v.id)
        scrapped += 1
        continue
    if i % 4 == 3:
        scrap(v.id)
    else:
        kept.append(v.id)
inv.close()
print(json.dumps({"kept": kept, "refused": refused, "scrapped": scrapped}), flush=True)
"""


class Worker:
    def __init__(self, url: str, datastore: str, prefix: str, count: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WORKER, url, datastore, prefix, str(count)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            self.proc.kill()
            _, err = self.proc.communicate(timeout=WAIT_S)
            raise AssertionError(f"worker did not start: {line!r} {err}")

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self) -> dict[str, object]:
        try:
            out, err = self.proc.communicate(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise
        assert self.proc.returncode == 0, err
        result: dict[str, object] = json.loads(out.strip().splitlines()[-1])
        return result

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
