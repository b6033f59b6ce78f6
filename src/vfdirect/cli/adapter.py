"""``vfdirect adapter``: run the adapter daemon of one host (the PF side of the emulated
SR-IOV storage adapter). Also runnable as ``python -m vfdirect.cli.adapter``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vfdirect.adapter.daemon import AdapterConfig, run_adapter
from vfdirect.core.adapter.methods import MAX_PID, MAX_VFS_LIMIT
from vfdirect.core.wwn import Wwn, WwnError


def _wwn(ctx: click.Context, param: click.Parameter, value: str | None) -> Wwn | None:
    if value is None:
        return None
    try:
        return Wwn.parse(value)
    except WwnError as exc:
        raise click.BadParameter(str(exc)) from None


@click.command("adapter")
@click.option("--run-dir", required=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="The host's run directory: pf.sock and the VF sockets live here.")
@click.option("--vfs", default=16, show_default=True, type=click.IntRange(1, MAX_VFS_LIMIT),
              help="VFs the adapter offers (TotalVFs); vf_enable turns them on.")
@click.option("--hypervisor-pid", type=click.IntRange(1, MAX_PID),
              help="Only this process may use the PF socket.")
@click.option("--hypervisor-uid", type=click.IntRange(0, (1 << 32) - 2),
              help="Only this user may use the PF socket (default: the adapter's own uid "
                   "when no --hypervisor-pid is given either).")
@click.option("--array", "arrays", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A storage array directory to attach at start (repeatable).")
@click.option("--fabric-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The shared fabric directory (default: 'fabric' beside the first array).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="One line per event, as text or JSON.")
@click.option("--port-wwpn", callback=_wwn,
              help="WWPN of the physical port (default: derived from --run-dir).")
@click.option("--port-wwnn", callback=_wwn,
              help="WWNN of the physical port (default: derived from --run-dir).")
@click.option("--vf-poll-us", default=200, show_default=True, type=click.IntRange(0, 100_000),
              help="How long a VF thread busy-polls its rings after activity before it "
                   "re-enables kicks and sleeps (0: never poll).")
@click.option("--io-threads", "io_threads", default=0, show_default=True,
              type=click.IntRange(0, 64), envvar="VFDIRECT_VF_IO_THREADS",
              help="IO threads per VF: requests of a VF execute concurrently and complete "
                   "out of order (0: one at a time on the VF thread). Also from "
                   "VFDIRECT_VF_IO_THREADS (a host passes its environment on).")
@click.option("--audit/--no-audit", "audit", default=False, envvar="VFDIRECT_AUDIT",
              help="Audit every guest-memory access of the VFs against the memory tables "
                   "granted and every physical IO (VFs and PF IO path) against the "
                   "extents of the mapping it serves; counters in adapter_get_stats "
                   "(audit). Also from VFDIRECT_AUDIT=1 (a host passes its environment on).")
def adapter(  # noqa: PLR0917 (click passes one argument per option)
    run_dir: Path,
    vfs: int,
    hypervisor_pid: int | None,
    hypervisor_uid: int | None,
    arrays: tuple[Path, ...],
    fabric_dir: Path | None,
    log_format: str,
    port_wwpn: Wwn | None,
    port_wwnn: Wwn | None,
    vf_poll_us: int,
    io_threads: int,
    audit: bool,
) -> None:
    """Run the adapter daemon: PF admin socket, VFs, vport logins, IO engine."""
    config = AdapterConfig(
        run_dir=run_dir, vfs=vfs, hypervisor_pid=hypervisor_pid,
        hypervisor_uid=hypervisor_uid, arrays=arrays, fabric_dir=fabric_dir,
        log_format=log_format, port_wwpn=port_wwpn, port_wwnn=port_wwnn,
        vf_poll_us=vf_poll_us, vf_io_threads=io_threads, audit=audit,
    )
    sys.exit(run_adapter(config))


if __name__ == "__main__":  # pragma: no cover
    adapter()
