"""``vfdirect host|array|datastore|vdisk|vm|vport|adapter``: the hypervisor daemon and
the virsh-like commands that talk to it over its REST API (Unix socket, httpx).

Every command but ``host start`` finds the host by ``--run-dir`` (its ``api.sock``) or
``--api-socket`` (also from ``VFDIRECT_RUN_DIR`` / ``VFDIRECT_API_SOCKET``). Output is a
readable table, or JSON with ``--json``. A refusal is one line, ``vfdirect: error: ...``,
and exit status 1. Also runnable as ``python -m vfdirect.cli.host <group> <command>``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from vfdirect.cli.common import SIZE, CliError, LazyGroup
from vfdirect.host.client import ApiError, HostClient

#: What a VM can run (``vm-run --workload``; as vfdirect.host.vms.WORKLOADS).
WORKLOADS = ("idle", "selftest", "sequence", "verify", "load")

F = TypeVar("F", bound=Callable[..., Any])

API_SOCKET_NAME = "api.sock"
START_WAIT_S = 60.0


# -- shared options and output -----------------------------------------------------------


def api_options(fn: F) -> F:
    fn = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(fn)
    fn = click.option("--api-socket", envvar="VFDIRECT_API_SOCKET",
                      type=click.Path(dir_okay=False, path_type=Path),
                      help="The host's API socket.")(fn)
    return click.option("--run-dir", envvar="VFDIRECT_RUN_DIR",
                        type=click.Path(file_okay=False, path_type=Path),
                        help="The host's run directory (its api.sock).")(fn)


def _client(run_dir: Path | None, api_socket: Path | None) -> HostClient:
    if api_socket is None:
        if run_dir is None:
            raise CliError("say which host: --run-dir DIR or --api-socket PATH")
        api_socket = run_dir / API_SOCKET_NAME
    return HostClient(api_socket)


def _call(run_dir: Path | None, api_socket: Path | None,
          fn: Callable[[HostClient], Any]) -> Any:
    with _client(run_dir, api_socket) as c:
        try:
            return fn(c)
        except ApiError as exc:
            raise CliError(exc.message) from None


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(v: Any) -> str:
        if v is None:
            return "-"
        if isinstance(v, list):
            return ",".join(str(x) for x in v) or "-"
        return str(v)
    grid = [[c.upper() for c in columns]] + [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in grid) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in grid)


def _out(data: Any, as_json: bool, columns: Sequence[str] | None = None) -> None:
    if as_json:
        click.echo(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif columns is not None and isinstance(data, list):
        click.echo(_table(data, columns))
    elif isinstance(data, dict):
        width = max((len(k) for k in data), default=0)
        for k, v in data.items():
            text = json.dumps(v, default=str) if isinstance(v, dict | list) else v
            click.echo(f"{k.ljust(width)}  {'-' if text is None else text}")
    else:
        click.echo(str(data))


# -- host --------------------------------------------------------------------------------


@click.group("host")
def host() -> None:
    """The hypervisor daemon of one host."""


@host.command("start")
@click.option("--name", required=True, help="The host's name in the inventory.")
@click.option("--run-dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Sockets, logs, VM memory and consoles live here.")
@click.option("--db", help="Inventory: SQLite file or URL (default <run-dir>/inventory.db).")
@click.option("--api-socket", type=click.Path(dir_okay=False, path_type=Path),
              help="The API's Unix socket (default <run-dir>/api.sock).")
@click.option("--api-port", type=click.IntRange(1, 65535),
              help="Also serve the API on 127.0.0.1:PORT.")
@click.option("--array", "arrays", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A storage array directory to import and attach (repeatable).")
@click.option("--fabric-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The shared fabric directory (default: 'fabric' beside the first array).")
@click.option("--vfs", type=click.IntRange(1, 256), default=8, show_default=True,
              help="VFs to enable on the adapter.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--vm-workload", type=click.Choice(WORKLOADS),
              default="idle", show_default=True, help="What a started VM runs by default.")
@click.option("--foreground", is_flag=True, help="Run in this process (logs to stderr).")
@click.option("--audit", is_flag=True, envvar="VFDIRECT_AUDIT",
              help="Start the adapter with --audit (VFDIRECT_AUDIT=1 in its environment).")
def host_start(  # noqa: PLR0917 (click passes one argument per option)
    name: str, run_dir: Path, db: str | None, api_socket: Path | None, api_port: int | None,
    arrays: tuple[Path, ...], fabric_dir: Path | None, vfs: int, log_format: str,
    vm_workload: str, foreground: bool, audit: bool = False,
) -> None:
    """Start the host daemon: inventory, adapter, VMs, REST API."""
    run_dir = run_dir.resolve()
    sock = (api_socket or run_dir / API_SOCKET_NAME).resolve()
    if foreground:
        from vfdirect.host.daemon import run_host  # noqa: PLC0415
        from vfdirect.host.service import HostConfig  # noqa: PLC0415
        if audit:  # the adapter inherits the host's environment
            os.environ["VFDIRECT_AUDIT"] = "1"

        config = HostConfig(name=name, run_dir=run_dir, db=db or str(run_dir / "inventory.db"),
                            api_socket=sock, api_port=api_port,
                            arrays=tuple(a.resolve() for a in arrays),
                            fabric_dir=None if fabric_dir is None else fabric_dir.resolve(),
                            vfs=vfs, log_format=log_format, vm_workload=vm_workload)
        sys.exit(run_host(config))
    run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sock.exists():
        with HostClient(sock, timeout=5.0) as c, contextlib.suppress(ApiError):
            running = c.get("/v1/host")
            raise CliError(f"another host ({running['name']}, pid {running['pid']}) "
                           f"serves {run_dir}")
    args = [sys.executable, "-m", "vfdirect.cli.host", "host", "start", "--foreground",
            "--name", name, "--run-dir", str(run_dir), "--api-socket", str(sock),
            "--vfs", str(vfs), "--log-format", log_format, "--vm-workload", vm_workload]
    if db:
        args += ["--db", db]
    if api_port is not None:
        args += ["--api-port", str(api_port)]
    for a in arrays:
        args += ["--array", str(a.resolve())]
    if fabric_dir is not None:
        args += ["--fabric-dir", str(fabric_dir.resolve())]
    if audit:
        args.append("--audit")
    log_path = run_dir / "host.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    deadline = time.monotonic() + START_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise CliError(f"the host exited with status {proc.returncode}: "
                           f"{tail[0] if tail else 'see ' + str(log_path)}")
        if sock.exists():
            with HostClient(sock, timeout=5.0) as c:
                try:
                    status = c.get("/v1/host")
                except ApiError:
                    pass
                else:
                    if status["pid"] != proc.pid:
                        raise CliError(f"another host (pid {status['pid']}) serves {run_dir}")
                    click.echo(f"host {name} started (pid {status['pid']}, adapter pid "
                               f"{status['adapter']['pid']}, API {sock})")
                    return
        time.sleep(0.1)
    raise CliError(f"the host did not answer in {START_WAIT_S:g} s; see {log_path}")


@host.command("status")
@api_options
def host_status(run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """The host, its adapter and inventory."""
    _out(_call(run_dir, api_socket, lambda c: c.get("/v1/host")), as_json)


@host.command("stop")
@click.option("--keep-running", is_flag=True,
              help="Leave the VMs and the adapter running (to restart the host).")
@click.option("--wait", "wait_s", type=float, default=60.0, show_default=True)
@api_options
def host_stop(keep_running: bool, wait_s: float, run_dir: Path | None,
              api_socket: Path | None, as_json: bool) -> None:
    """Stop the host daemon (and, unless --keep-running, its VMs and adapter)."""
    status = _call(run_dir, api_socket, lambda c: c.get("/v1/host"))
    _call(run_dir, api_socket,
          lambda c: c.post("/v1/host/stop", {"keep_running": keep_running}))
    pid = int(status["pid"])
    deadline = time.monotonic() + wait_s
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() >= deadline:
            raise CliError(f"the host (pid {pid}) did not stop in {wait_s:g} s")
        time.sleep(0.05)
    _out({"stopped": status["name"], "pid": pid, "keep_running": keep_running}, as_json)


# -- storage -----------------------------------------------------------------------------


@click.group("array")
def array() -> None:
    """Storage arrays and their physical LUNs."""


@array.command("create")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.option("--wwn", help="The array's WWN (default: a new NAA 5 name).")
@click.option("--ports", type=click.IntRange(1, 16), default=1, show_default=True,
              help="How many target ports the array has.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def array_create(directory: Path, wwn: str | None, ports: int, as_json: bool) -> None:
    """Create an empty storage array in DIRECTORY (the SAN that hosts attach with
    'host start --array'); its LUNs are then made with 'array lun create'."""
    from vfdirect.core.wwn import Wwn, WwnError  # noqa: PLC0415
    from vfdirect.storage import StorageArray, StorageError  # noqa: PLC0415

    try:
        name = Wwn.parse(wwn) if wwn else Wwn.naa5(int.from_bytes(os.urandom(4), "big"))
        made = StorageArray.create(directory, name, port_count=ports)
    except (WwnError, StorageError, OSError) as exc:
        raise CliError(f"cannot create an array in {directory}: {exc}") from exc
    info = {"wwn": made.wwn.canonical(), "directory": str(made.directory),
            "target_ports": [p.canonical() for p in made.target_ports]}
    _out([info] if not as_json else info, as_json, ("wwn", "directory", "target_ports"))


@array.group("lun")
def array_lun() -> None:
    """Physical LUNs."""


LUN_COLUMNS = ("array", "lun", "block_size", "num_blocks", "datastore", "path")


@array_lun.command("create")
@click.option("--array", "array_wwn", required=True, help="The array's WWN.")
@click.option("--size", type=SIZE, required=True, help="Capacity (4MiB, 1GiB...).")
@click.option("--block-size", type=click.Choice(["512", "4096"]), default="512",
              show_default=True)
@click.option("--lun", type=click.IntRange(0, 16383), help="LUN number (default: next).")
@api_options
def lun_create(*, array_wwn: str, size: int, block_size: str, lun: int | None,
               run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """Create a physical LUN (a sparse file) on an array."""
    bs = int(block_size)
    if size < bs or size % bs:
        raise CliError(f"size {size} is not a positive multiple of the block size {bs}")
    made = _call(run_dir, api_socket, lambda c: c.post("/v1/luns", {
        "array": array_wwn, "num_blocks": size // bs, "block_size": bs, "lun": lun}))
    _out([made] if not as_json else made, as_json, LUN_COLUMNS)


@array_lun.command("list")
@click.option("--array", "array_wwn", help="Only this array's LUNs.")
@api_options
def lun_list(array_wwn: str | None, run_dir: Path | None, api_socket: Path | None,
             as_json: bool) -> None:
    """Physical LUNs."""
    _out(_call(run_dir, api_socket, lambda c: c.get("/v1/luns", array=array_wwn)), as_json,
         LUN_COLUMNS)


@click.group("datastore")
def datastore() -> None:
    """Datastores: physical LUNs pooled for vdisks."""


DS_COLUMNS = ("name", "block_size", "chunk_blocks", "total_blocks", "free_blocks", "vdisks",
              "luns")


@datastore.command("create")
@click.argument("name")
@click.option("--lun", "luns", multiple=True, required=True,
              help="A member LUN, '<array WWN>:<lun>' (repeatable).")
@click.option("--block-size", type=click.Choice(["512", "4096"]), default="512",
              show_default=True)
@click.option("--chunk-blocks", type=click.IntRange(1), help="Allocation unit in blocks.")
@api_options
def datastore_create(*, name: str, luns: tuple[str, ...], block_size: str,
                     chunk_blocks: int | None, run_dir: Path | None,
                     api_socket: Path | None, as_json: bool) -> None:
    """Create a datastore over physical LUNs."""
    made = _call(run_dir, api_socket, lambda c: c.post("/v1/datastores", {
        "name": name, "luns": list(luns), "block_size": int(block_size),
        "chunk_blocks": chunk_blocks}))
    _out(made if as_json else [made], as_json, DS_COLUMNS)


@datastore.command("list")
@api_options
def datastore_list(run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """Datastores and their free space."""
    _out(_call(run_dir, api_socket, lambda c: c.get("/v1/datastores")), as_json, DS_COLUMNS)


# -- vdisks (claim A1) -------------------------------------------------------------------


@click.group("vdisk")
def vdisk() -> None:
    """Virtual disks (claim A1)."""


VDISK_COLUMNS = ("id", "name", "datastore", "capacity_blocks", "block_size", "thin", "vm",
                 "target", "lun")


def _vdisk_rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**v, "target": (v.get("address") or {}).get("target"),
             "lun": (v.get("address") or {}).get("lun")} for v in items]


@vdisk.command("create")
@click.argument("name")
@click.option("--datastore", required=True)
@click.option("--size", type=SIZE, help="Capacity (64MiB, 1GiB...).")
@click.option("--blocks", type=click.IntRange(1), help="Capacity in blocks.")
@click.option("--thin", is_flag=True, help="Allocate on first write (inflated at VM start).")
@api_options
def vdisk_create(*, name: str, datastore: str, size: int | None, blocks: int | None, thin: bool,
                 run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """Create a vdisk on a datastore (claim A1)."""
    if (size is None) == (blocks is None):
        raise CliError("give exactly one of --size and --blocks")

    def go(c: HostClient) -> Any:
        count = blocks
        if count is None:
            assert size is not None
            stores = {d["name"]: d for d in c.get("/v1/datastores")}
            if datastore not in stores:
                raise CliError(f"datastore {datastore!r} not found")
            bs = int(stores[datastore]["block_size"])
            if size < bs or size % bs:
                raise CliError(f"size {size} is not a positive multiple of the datastore's "
                               f"block size {bs}")
            count = size // bs
        return c.post("/v1/vdisks", {"datastore": datastore, "name": name,
                                     "capacity_blocks": count, "thin": thin})
    made = _call(run_dir, api_socket, go)
    _out(made if as_json else _vdisk_rows([made]), as_json, VDISK_COLUMNS)


@vdisk.command("list")
@click.option("--datastore")
@click.option("--vm")
@api_options
def vdisk_list(datastore: str | None, vm: str | None, run_dir: Path | None,
               api_socket: Path | None, as_json: bool) -> None:
    """Vdisks, where they are attached."""
    items = _call(run_dir, api_socket,
                  lambda c: c.get("/v1/vdisks", datastore=datastore, vm=vm))
    _out(items if as_json else _vdisk_rows(items), as_json, VDISK_COLUMNS)


@vdisk.command("delete")
@click.argument("name")
@api_options
def vdisk_delete(name: str, run_dir: Path | None, api_socket: Path | None,
                 as_json: bool) -> None:
    """Delete a detached vdisk (its space is zeroed before reuse)."""
    _out(_call(run_dir, api_socket, lambda c: c.delete(f"/v1/vdisks/{name}")), as_json)


# -- VMs (claims A2-A8) ------------------------------------------------------------------


@click.group("vm")
def vm() -> None:
    """Virtual machines: lifecycle, disks, console."""


VM_COLUMNS = ("name", "host", "state", "pid", "vf", "vport", "vdisks")


@vm.command("create")
@click.argument("name")
@click.option("--memory", type=SIZE, default=None,
              help="Guest memory  [default: 16MiB, 256MiB with --runtime qemu]")
@click.option("--workload", type=click.Choice(WORKLOADS),
              help="What the VM runs when started (default: the host's --vm-workload).")
@click.option("--runtime", type=click.Choice(("python", "qemu")), default="python",
              show_default=True,
              help="python: the vfdirect guest runtime; qemu: a QEMU process running a "
                   "Linux kernel whose virtio-scsi driver uses the VF (docs/qemu-guest.md).")
@click.option("--kernel", type=click.Path(dir_okay=False, path_type=Path),
              help="QEMU VM: the kernel (default: the cached Debian kernel).")
@click.option("--initrd", type=click.Path(dir_okay=False, path_type=Path),
              help="QEMU VM: the initrd (default: scripts/mkinitramfs.sh's, built if missing).")
@api_options
def vm_create(  # noqa: PLR0917 (click passes one argument per option)
    name: str, memory: int | None, workload: str | None, runtime: str,
    kernel: Path | None, initrd: Path | None, run_dir: Path | None,
    api_socket: Path | None, as_json: bool,
) -> None:
    """Define a VM on this host."""
    if memory is None:
        memory = (256 << 20) if runtime == "qemu" else (16 << 20)
    body: dict[str, Any] = {"name": name, "memory_bytes": memory}
    if workload is not None:
        body["workload"] = workload
    if runtime != "python" or kernel is not None or initrd is not None:
        body["runtime"] = runtime
        for key, path in (("kernel", kernel), ("initrd", initrd)):
            if path is not None:
                body[key] = str(path.absolute())
    made = _call(run_dir, api_socket, lambda c: c.post("/v1/vms", body))
    _out(made if as_json else [made], as_json, VM_COLUMNS)


@vm.command("start")
@click.argument("name")
@click.option("--workload", type=click.Choice(WORKLOADS),
              help="Overrides the VM's own (vm create --workload).")
@api_options
def vm_start(name: str, workload: str | None, run_dir: Path | None, api_socket: Path | None,
             as_json: bool) -> None:
    """Start a VM: process, VF, mapping, vport, firmware table (claims A4-A8)."""
    made = _call(run_dir, api_socket,
                 lambda c: c.post(f"/v1/vms/{name}/start", {"workload": workload}))
    _out(made if as_json else [made], as_json, VM_COLUMNS)


@vm.command("stop")
@click.argument("name")
@api_options
def vm_stop(name: str, run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """Stop a VM (its VF is released)."""
    made = _call(run_dir, api_socket, lambda c: c.post(f"/v1/vms/{name}/stop"))
    _out(made if as_json else [made], as_json, VM_COLUMNS)


@vm.command("pause")
@click.argument("name")
@api_options
def vm_pause(name: str, run_dir: Path | None, api_socket: Path | None,
             as_json: bool) -> None:
    """Freeze a running VM (its VF stays assigned)."""
    made = _call(run_dir, api_socket, lambda c: c.post(f"/v1/vms/{name}/pause"))
    _out(made if as_json else [made], as_json, VM_COLUMNS)


@vm.command("resume")
@click.argument("name")
@api_options
def vm_resume(name: str, run_dir: Path | None, api_socket: Path | None,
              as_json: bool) -> None:
    """Let a paused VM run on."""
    made = _call(run_dir, api_socket, lambda c: c.post(f"/v1/vms/{name}/resume"))
    _out(made if as_json else [made], as_json, VM_COLUMNS)


@vm.command("delete")
@click.argument("name")
@api_options
def vm_delete(name: str, run_dir: Path | None, api_socket: Path | None,
              as_json: bool) -> None:
    """Forget a stopped VM (its vdisks are detached, its vport deleted)."""
    _out(_call(run_dir, api_socket, lambda c: c.delete(f"/v1/vms/{name}")), as_json)


@vm.command("list")
@api_options
def vm_list(run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """VMs and their state."""
    _out(_call(run_dir, api_socket, lambda c: c.get("/v1/vms")), as_json, VM_COLUMNS)


@vm.command("show")
@click.argument("name")
@api_options
def vm_show(name: str, run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """A VM, its disks and addresses, and its VF's mapping table."""
    shown = _call(run_dir, api_socket, lambda c: c.get(f"/v1/vms/{name}"))
    if as_json:
        _out(shown, True)
        return
    _out({**{k: v for k, v in shown["vm"].items() if k != "vdisks"},
          "workload": shown.get("workload")}, False)
    qemu = shown.get("qemu")
    if qemu:
        result = qemu.get("last_result") or {}
        _out({"qemu_accel": f"{qemu.get('accel') or '-'} ({qemu.get('accel_reason') or '-'})",
              "qemu_kernel": qemu.get("kernel"), "qemu_initrd": qemu.get("initrd"),
              "qemu_addresses": ",".join(qemu.get("addresses") or []) or "-",
              "guest_result": "-" if not result else
              f"ok={result.get('ok')} boot={result.get('boot', '-')} "
              f"found={','.join(result.get('found') or []) or '-'}"}, False)
    click.echo("")
    click.echo(_table(_vdisk_rows(shown["disks"]), VDISK_COLUMNS))
    agree = shown["vf_mapping"] == shown["inventory_mapping"]
    click.echo(f"\nVF mapping: {'none' if shown['vf_mapping'] is None else 'loaded'}"
               f"{' (matches the inventory)' if shown['vf_mapping'] and agree else ''}")
    exports = shown.get("exports") or []
    if exports:
        click.echo("\nNBD exports:")
        click.echo(_table(exports, EXPORT_COLUMNS))
    migrations = shown.get("migrations") or []
    if migrations:
        click.echo("\nMigrations (newest first):")
        click.echo(_table([_migration_row(m) for m in migrations], MIGRATION_COLUMNS))


MIGRATION_COLUMNS = ("id", "source", "destination", "outcome", "downtime_ms", "quiesce_ms",
                     "drain_ms", "handoff_ms", "mediated_ms", "precopy_ms", "rounds",
                     "outstanding", "stall_ms")


def _ms(report: dict[str, Any], phase: str) -> str | None:
    for name, ms in report.get("summary", []):
        if name == phase and ms is not None:
            return f"{ms:.1f}"
    return None


def _migration_row(m: dict[str, Any]) -> dict[str, Any]:
    r = m.get("report") or {}
    downtime = r.get("downtime_ns")
    stall = r.get("worst_stall_ms")
    return {"id": m["id"], "source": m["source"], "destination": m["destination"],
            "outcome": m["outcome"],
            "downtime_ms": None if downtime is None else f"{downtime / 1e6:.1f}",
            **{f"{p}_ms": _ms(r, p) for p in ("quiesce", "drain", "handoff", "mediated",
                                                "precopy")},
            "rounds": len(r.get("precopy_rounds", [])),
            "outstanding": r.get("outstanding_at_quiesce"),
            "stall_ms": None if stall is None else f"{stall:.1f}"}


@vm.command("migrate")
@click.argument("name")
@click.option("--to", "to", required=True, help="The destination host's name.")
@click.option("--max-downtime", "max_downtime", type=click.IntRange(1, 600_000), default=300,
              show_default=True, help="Downtime budget of stop-and-copy, in ms.")
@click.option("--drain-timeout", "drain_timeout", type=click.IntRange(0, 600_000),
              default=1000, show_default=True,
              help="How long the VF may take to finish outstanding IO, in ms (then the "
                   "rest is handed over to the mediated path).")
@click.option("--max-rounds", type=click.IntRange(1, 1000), default=30, show_default=True,
              help="Most pre-copy rounds.")
@click.option("--no-wait", is_flag=True, help="Print the migration id and return.")
@click.option("--timeout", "timeout_s", type=float, default=600.0, show_default=True,
              help="Give up following the migration after this many seconds.")
@api_options
def vm_migrate(  # noqa: PLR0917 (click passes one argument per option)
    name: str, to: str, max_downtime: int, drain_timeout: int, max_rounds: int,
    no_wait: bool, timeout_s: float, run_dir: Path | None, api_socket: Path | None,
    as_json: bool,
) -> None:
    """Live-migrate a running VM to another host (claims B1-B7): quiesce its VF, hand the
    queues to the mediated path, pre-copy its memory, switch over."""
    body = {"to": to, "max_downtime_ms": max_downtime, "drain_timeout_ms": drain_timeout,
            "max_rounds": max_rounds}
    started = _call(run_dir, api_socket, lambda c: c.post(f"/v1/vms/{name}/migrate", body))
    ident = started["migration"]
    if no_wait:
        _out(started if as_json else {"migration": ident}, as_json)
        return
    tty = sys.stderr.isatty() and not as_json
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        shown = _call(run_dir, api_socket, lambda c: c.get(f"/v1/migrations/{ident}"))
        p = shown.get("progress") or {}
        line = (f"{ident} {p.get('phase', shown['outcome'])}: round {p.get('round', 0)}, "
                f"{p.get('bytes_sent', 0) / 2**20:.1f} MiB sent, "
                f"dirty {p.get('dirty_pages', 0)} pages "
                f"({p.get('dirty_rate_pps', 0.0):.0f}/s), "
                f"outstanding IO {p.get('outstanding', 0)}, "
                f"mediated {p.get('mediated_requests', 0)} requests")
        if not as_json and line != last:
            click.echo(("\r\x1b[K" if tty else "") + line, nl=not tty, err=True)
            last = line
        if shown["outcome"] != "running" or p.get("done"):
            break
        if time.monotonic() > deadline:
            raise CliError(f"migration {ident} still runs after {timeout_s:g} s; follow it "
                           f"with 'vfdirect vm show {name}'")
        time.sleep(0.2)
    if tty:
        click.echo("", err=True)
    if as_json:
        _out(shown, True)
    else:
        row = _migration_row(shown)
        _out(row, False)
        report = shown.get("report") or {}
        for phase, ms in report.get("summary", []):
            click.echo(f"  {phase:<12} {'-' if ms is None else f'{ms:.1f}':>10} ms")
        if shown["outcome"] != "committed":
            error = (shown.get("report") or {}).get("error") or shown["outcome"]
            raise CliError(f"migration {ident} {shown['outcome']}: {error}")


@vm.command("attach")
@click.argument("name")
@click.argument("vdisk_name", metavar="VDISK")
@click.option("--target", type=click.IntRange(0, 255))
@click.option("--lun", type=click.IntRange(0, 16383))
@api_options
def vm_attach(*, name: str, vdisk_name: str, target: int | None, lun: int | None,
              run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """Allocate a vdisk to a VM (claim A3); hot on a running VM."""
    made = _call(run_dir, api_socket, lambda c: c.post(
        f"/v1/vms/{name}/attach", {"vdisk": vdisk_name, "target": target, "lun": lun}))
    _out(made, as_json)


@vm.command("detach")
@click.argument("name")
@click.argument("vdisk_name", metavar="VDISK")
@api_options
def vm_detach(name: str, vdisk_name: str, run_dir: Path | None, api_socket: Path | None,
              as_json: bool) -> None:
    """Take a vdisk away from a VM; hot on a running VM."""
    _out(_call(run_dir, api_socket,
               lambda c: c.post(f"/v1/vms/{name}/detach", {"vdisk": vdisk_name})), as_json)


EXPORT_COLUMNS = ("disk", "address", "uri")


@vm.command("export")
@click.argument("name")
@click.argument("disk")
@click.option("--unix", "unix_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve on this Unix socket.")
@click.option("--port", type=click.IntRange(1, 65535), help="Serve on this loopback TCP port.")
@click.option("--remove", is_flag=True, help="Stop exporting DISK (at every address).")
@api_options
def vm_export(*, name: str, disk: str, unix_path: Path | None, port: int | None,
              remove: bool, run_dir: Path | None, api_socket: Path | None,
              as_json: bool) -> None:
    """Export DISK (sda, sdb... or target:lun) of VM NAME over NBD, served by the VM
    through its VF; recorded in the VM's spec (kept across restarts and migrations)."""
    if remove:
        if unix_path is not None or port is not None:
            raise CliError("--remove takes no --unix or --port")
        gone = _call(run_dir, api_socket,
                     lambda c: c.delete(f"/v1/vms/{name}/exports/{disk}"))
        _out(gone, as_json, EXPORT_COLUMNS)
        return
    if (unix_path is None) == (port is None):
        raise CliError("give one of --unix PATH or --port N")
    body: dict[str, Any] = {"disk": disk}
    if unix_path is not None:
        body["unix"] = str(unix_path.absolute())
    else:
        body["port"] = port
    made = _call(run_dir, api_socket, lambda c: c.post(f"/v1/vms/{name}/exports", body))
    _out(made if as_json else [made], as_json, EXPORT_COLUMNS)


@vm.command("console")
@click.argument("name")
@api_options
def vm_console(name: str, run_dir: Path | None, api_socket: Path | None,
               as_json: bool) -> None:
    """The VM's console log (its stdout and stderr)."""
    text = _call(run_dir, api_socket, lambda c: c.get(f"/v1/vms/{name}/console"))
    click.echo(json.dumps({"console": text}) if as_json else text, nl=False)


# -- vports and the adapter --------------------------------------------------------------


@click.group("vport")
def vport() -> None:
    """Virtual ports (claims A5-A7)."""


@vport.command("list")
@api_options
def vport_list(run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """Virtual ports and the VMs they serve."""
    _out(_call(run_dir, api_socket, lambda c: c.get("/v1/vports")), as_json,
         ("wwpn", "wwnn", "alternate_wwpn", "vm", "host"))


@vport.command("create")
@click.option("--wwpn", help="Its WWPN (default: made up, unique in the inventory).")
@click.option("--wwnn", help="Its WWNN (default: made up).")
@click.option("--alternate-wwpn", help="Its alternate WWPN for migration (default: made up).")
@click.option("--vm", help="Associate it with this VM's mapping info (claim A6).")
@api_options
def vport_create(*, wwpn: str | None, wwnn: str | None, alternate_wwpn: str | None,
                 vm: str | None, run_dir: Path | None, api_socket: Path | None,
                 as_json: bool) -> None:
    """Create a virtual port (claim A5)."""
    made = _call(run_dir, api_socket, lambda c: c.post("/v1/vports", {
        "wwpn": wwpn, "wwnn": wwnn, "alternate_wwpn": alternate_wwpn, "vm": vm}))
    _out(made if as_json else [made], as_json,
         ("wwpn", "wwnn", "alternate_wwpn", "vm", "host"))


@click.group("adapter", cls=LazyGroup, lazy={"run": "vfdirect.cli.adapter:adapter"})
def adapter_group() -> None:
    """The host's adapter: 'run' is the daemon, 'show' asks the host about it."""


@adapter_group.command("show")
@api_options
def adapter_show(run_dir: Path | None, api_socket: Path | None, as_json: bool) -> None:
    """The adapter's identity, VFs and fabric logins, as its host sees them."""
    shown = _call(run_dir, api_socket, lambda c: c.get("/v1/adapter"))
    if as_json:
        _out(shown, True)
        return
    ident = shown["identify"]
    _out({"pid": shown["pid"], "model": f"{ident.get('vendor')} {ident.get('model')}",
          "version": ident.get("version"), "vfs_enabled": ident.get("vfs_enabled"),
          "max_vfs": ident.get("max_vfs")}, False)
    click.echo("")
    rows = [{**v, "vm": (v.get("vm") or {}).get("name")} for v in shown["vfs"]
            if v.get("state") != "DISABLED"]
    click.echo(_table(rows, ("vf", "state", "vm", "vport", "mapping_luns", "socket_path")))
    click.echo("")
    click.echo(_table(shown["logins"], ("wwpn", "nport_id", "pid")))
    for item in shown.get("handed_over") or []:
        click.echo(f"\nVF {item['vf']} queue state handed to the hypervisor (migration "
                   f"{item['migration']} of {item['vm']}):")
        state = item["state"]
        click.echo(_table([{"vring": q["index"], "size": q["state"]["size"],
                            "last_avail_idx": q["state"]["last_avail_idx"],
                            "used_idx": q["state"]["used_idx"],
                            "in_flight": q["state"]["in_flight"]}
                           for q in state.get("queues", [])],
                          ("vring", "size", "last_avail_idx", "used_idx", "in_flight")))


#: What ``vfdirect`` registers from this module (the lead's cli/main.py).
COMMANDS = (host, array, datastore, vdisk, vm, vport, adapter_group)


def _standalone() -> click.Group:
    from vfdirect.cli.main import _Group  # noqa: PLC0415

    @click.group(cls=_Group)
    def cli() -> None:
        """The host commands of vfdirect (as registered in 'vfdirect')."""

    for command in COMMANDS:
        cli.add_command(command)
    return cli


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    _standalone().main(prog_name="vfdirect")
