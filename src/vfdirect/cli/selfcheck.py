"""``vfdirect selfcheck``: the SCSI target core over a physical LUN."""

from __future__ import annotations

import json

import click

from vfdirect.cli.common import SIZE, CliError
from vfdirect.tools.selfcheck import Check, SelfCheckError, run_selfcheck


def _run(size: int, block_size: int, device: str | None, directory: str | None,
         as_json: bool) -> int:
    def show(c: Check) -> None:
        mark = click.style(" ok ", fg="green") if c.ok else click.style("FAIL", fg="red")
        click.echo(f"  [{mark}] {c.name:<36} {c.detail}")

    if not as_json:
        click.echo("vfdirect self-check: SCSI target core over a physical LUN, through the fabric")
    try:
        report = run_selfcheck(size_bytes=size, block_size=block_size, device=device,
                               directory=directory, progress=None if as_json else show)
    except SelfCheckError as exc:
        raise CliError(str(exc)) from exc
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        passed = sum(c.ok for c in report.checks)
        click.echo(f"backing: {report.backing}; vdisk {report.vdisk_blocks} blocks of "
                   f"{report.block_size} bytes on a LUN of {report.lun_blocks} blocks")
        click.echo(f"{passed} passed, {len(report.checks) - passed} failed")
    return 0 if report.ok else 1


_options = [
    click.option("--size", type=SIZE, default="64MiB", show_default=True,
                 help="Size of the file-backed physical LUN (e.g. 64MiB, 1GiB)."),
    click.option("--block-size", type=click.Choice(["512", "4096"]), default="512",
                 show_default=True, help="Logical block size of the LUN."),
    click.option("--device", type=click.Path(exists=True, dir_okay=False),
                 help="Use this block device as the physical LUN (its data is destroyed)."),
    click.option("--dir", "directory", type=click.Path(file_okay=False),
                 help="Keep the storage array in this directory instead of a temporary one."),
    click.option("--json", "as_json", is_flag=True, help="Print the report as JSON."),
]


def _with_options(f: click.decorators.FC) -> click.decorators.FC:
    for opt in reversed(_options):
        f = opt(f)
    return f


@click.command()
@_with_options
def selfcheck(size: int, block_size: str, device: str | None, directory: str | None,
              as_json: bool) -> int:
    """Check the SCSI target core over a real physical LUN, through the fabric.

    Builds a storage array with one LUN, logs a virtual port into the fabric, masks the
    LUN to it, carves a virtual disk out of it, then runs discovery (REPORT LUNS,
    INQUIRY and its VPD pages, READ CAPACITY), FUA writes read back byte for byte, and
    the refusals SPC-4/SBC-3 require. Exits 0 only if every check passes."""
    return _run(size, int(block_size), device, directory, as_json)

