"""The ``vfdirect`` command: entry point, command groups and error presentation.

Every failure the user can cause (a bad option, a missing file, a refused operation) is
printed as one line, ``vfdirect: error: ...``, with a non-zero exit status; tracebacks are
kept for bugs and only shown with ``VFDIRECT_DEBUG=1``.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NoReturn

import click

import vfdirect
from vfdirect.cli.common import LazyGroup


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"vfdirect: error: {message}", err=True)
    sys.exit(code)


class _Group(LazyGroup):
    """A click group whose user errors are one readable line."""

    def main(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            _fail("interrupted", 130)
        except click.UsageError as exc:
            where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            _fail(exc.format_message().replace("\n", " ") + where, exc.exit_code)
        except click.ClickException as exc:
            _fail(exc.format_message().replace("\n", " "), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except OSError as exc:
            if os.environ.get("VFDIRECT_DEBUG"):
                raise
            _fail(str(exc), 1)
        sys.exit(rv if isinstance(rv, int) else 0)


def _version(ctx: click.Context) -> None:
    click.echo(f"vfdirect, version {vfdirect.__version__}")
    ctx.exit(0)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]},
             lazy={"selfcheck": "vfdirect.cli.selfcheck:selfcheck",
                   "demo": "vfdirect.cli.demo:demo", "vm-run": "vfdirect.cli.vm_run:vm_run"})
@click.option("-V", "--version", is_flag=True, expose_value=False, is_eager=True,
              help="Show the version and exit.",
              callback=lambda ctx, _param, value: _version(ctx) if value else None)
def cli() -> None:
    """vfdirect: VMs reach storage directly through the virtual functions (VFs) of an
    SR-IOV storage adapter, with virtual target addressing, and live-migrate without
    losing an IO."""


def _register() -> None:
    # Imported here so that each command module may import this one.
    from vfdirect.cli.host import COMMANDS as HOST_COMMANDS  # noqa: PLC0415

    for command in HOST_COMMANDS:
        cli.add_command(command)


def main(argv: list[str] | None = None) -> NoReturn:
    _register()
    cli.main(args=argv, prog_name="vfdirect")
    sys.exit(0)  # pragma: no cover (cli.main always exits)
