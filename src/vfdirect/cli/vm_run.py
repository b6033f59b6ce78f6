"""``vfdirect vm-run``: run one VM process (its guest runtime over a memory file, its VF
reached through vhost-user). Also runnable as ``python -m vfdirect.cli.vm_run``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from vfdirect.cli.common import SIZE
from vfdirect.core.guest.fwtable import (
    FWTABLE_MAGIC,
    FirmwareTable,
    FirmwareTableError,
    decode_fwtable,
    encode_fwtable,
)
from vfdirect.core.guest.layout import GuestLayoutError, LayoutParams
from vfdirect.vm.process import WORKLOADS, VmOptions, run_vm


def _load_fwtable(path: Path | None) -> bytes | None:
    """The page-0 bytes: the file is either an encoded table or its JSON form."""
    if path is None:
        return None
    raw = path.read_bytes()
    try:
        if raw[:4] == FWTABLE_MAGIC.to_bytes(4, "little"):
            decode_fwtable(raw)  # checked before it reaches guest memory
            return raw
        return encode_fwtable(FirmwareTable.load(json.loads(raw.decode("utf-8"))))
    except (FirmwareTableError, ValueError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--fwtable") from None


@click.command("vm-run")
@click.option("--memory-file", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The guest memory file (created if missing; /dev/shm/... is typical).")
@click.option("--memory-size", type=SIZE, default=None,
              help="Guest memory size (default: the existing file's size, else 16MiB).")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="The VF's vhost-user socket (default: vf_socket of the firmware table).")
@click.option("--fwtable", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Firmware table written into page 0 when the memory is new (encoded "
                   "page or its JSON form); otherwise page 0 is used as found.")
@click.option("--workload", type=click.Choice(WORKLOADS), default="idle", show_default=True)
@click.option("--restart", is_flag=True,
              help="Resume on an existing memory file: attach to the driver state there.")
@click.option("--paused", is_flag=True,
              help="Wait for SIGUSR1 before connecting (the hypervisor assigns the VF to "
                   "this pid first).")
@click.option("--start-timeout", type=float, default=60.0, show_default=True,
              help="Seconds to wait for SIGUSR1 with --paused.")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to keep trying the VF socket.")
@click.option("--command-timeout", type=float, default=30.0, show_default=True,
              help="Seconds before a SCSI command is aborted (ABORT TASK), as Linux's sd.")
@click.option("--spin-us", type=float, default=200.0, show_default=True,
              help="Busy-poll window before sleeping on the call eventfd.")
@click.option("--count", type=click.IntRange(1), default=None,
              help="sequence: numbered writes to make (default 1000); verify, load: IOs to "
                   "make (default: until SIGTERM).")
@click.option("--depth", type=click.IntRange(1), default=8, show_default=True,
              help="sequence, verify, load: IOs outstanding at once.")
@click.option("--interval-ms", type=click.FloatRange(0), default=0.0, show_default=True,
              help="sequence: pause between two submissions.")
@click.option("--read-pct", type=click.FloatRange(0, 100), default=50.0, show_default=True,
              help="verify, load: share of reads among the IOs.")
@click.option("--bs", type=click.IntRange(1), default=1, show_default=True,
              help="load: blocks per IO.")
@click.option("--window", type=click.IntRange(1), default=256, show_default=True,
              help="verify: blocks of each disk (from LBA 0) the IOs go to.")
@click.option("--progress-ms", type=click.FloatRange(10), default=1000.0, show_default=True,
              help="verify, load: period of the progress events.")
@click.option("--name", help="VM name (default: the firmware table's).")
@click.option("--request-queues", type=click.IntRange(1, 16), default=2, show_default=True,
              help="Request virtqueues laid out at first boot.")
@click.option("--queue-size", type=click.IntRange(2, 4096), default=64, show_default=True)
@click.option("--tags", type=click.IntRange(1, 1024), default=64, show_default=True,
              help="Commands outstanding at once (one data slot each).")
@click.option("--slot-size", type=SIZE, default="64KiB", show_default=True,
              help="Largest transfer of one command.")
@click.option("--journal-size", type=SIZE, default="1MiB", show_default=True,
              help="Workload journal laid out at first boot (32 bytes an entry).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True)
@click.option("--exports-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="idle: serve the NBD exports this JSON file lists (re-read on SIGHUP; "
                   "see docs/nbd.md).")
@click.option("--incoming", is_flag=True,
              help="A migration's destination (needs --restart --paused): start before "
                   "the memory is complete; the first SIGUSR1 boots, the second connects.")
@click.option("--dirty-log", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Dirty map of the guest's own writes into its memory, for live "
                   "migration: one byte per 4 KiB page (PageMarks), created zeroed if "
                   "missing; every store marks its pages before and after.")
@click.option("--fua-pct", type=click.FloatRange(0, 100), default=0.0, show_default=True,
              help="verify: share of the writes sent with FUA (durability).")
@click.option("--flush-every", type=click.IntRange(0), default=0, show_default=True,
              help="verify: a SYNCHRONIZE CACHE to every disk after this many writes "
                   "(0: never).")
@click.option("--recover-from", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None,
              help="verify: the memory file of the VM running at a power cut; first read "
                   "back and judge every block against its journal (this VM boots on "
                   "fresh memory).")
def vm_run(  # noqa: PLR0917 (click passes one argument per option)
    memory_file: Path, memory_size: int | None, socket_path: str | None,
    fwtable: Path | None, workload: str, restart: bool, paused: bool, start_timeout: float,
    connect_timeout: float, command_timeout: float, spin_us: float, count: int | None,
    depth: int, interval_ms: float, read_pct: float, bs: int, window: int,
    progress_ms: float, name: str | None, request_queues: int, queue_size: int, tags: int,
    slot_size: int, journal_size: int, log_format: str, incoming: bool,
    dirty_log: Path | None,
    exports_file: Path | None,
    fua_pct: float, flush_every: int, recover_from: Path | None,
) -> None:
    """Run a VM: boot or resume its guest runtime, connect to its VF, scan, run a
    workload (idle, selftest, sequence, verify, load). The result is one JSON line on stdout."""
    if incoming and not (restart and paused):
        raise click.UsageError("--incoming needs --restart and --paused")
    size = memory_size if memory_size is not None else LayoutParams().memory_size
    try:
        params = LayoutParams(memory_size=size, request_queues=request_queues,
                              queue_size=queue_size, tags=tags, slot_size=slot_size,
                              journal_size=journal_size)
    except GuestLayoutError as exc:
        raise click.BadParameter(str(exc)) from None
    options = VmOptions(
        memory_file=memory_file, memory_size=memory_size, socket=socket_path,
        fwtable=_load_fwtable(fwtable), workload=workload, restart=restart, paused=paused,
        start_timeout=start_timeout, connect_timeout=connect_timeout,
        command_timeout=command_timeout, spin_us=spin_us, count=count, depth=depth,
        interval_ms=interval_ms, read_pct=read_pct, bs=bs, window=window,
        progress_ms=progress_ms, name=name, log_format=log_format, params=params,
        dirty_log=dirty_log, exports_file=exports_file, incoming=incoming,
        fua_pct=fua_pct, flush_every=flush_every, recover_from=recover_from)
    sys.exit(run_vm(options))


if __name__ == "__main__":  # pragma: no cover
    vm_run()
