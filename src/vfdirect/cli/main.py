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

from vfdirect import __version__


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"vfdirect: error: {message}", err=True)
    sys.exit(code)


class _Group(click.Group):
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


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="vfdirect")
def cli() -> None:
    """vfdirect: VMs reach storage directly through the virtual functions (VFs) of an
    SR-IOV storage adapter, with virtual target addressing, and live-migrate without
    losing an IO."""


def _register() -> None:
    # Imported here so that each command module may import this one.
    from vfdirect.cli.demo import demo  # noqa: PLC0415
    from vfdirect.cli.host import COMMANDS as HOST_COMMANDS  # noqa: PLC0415
    from vfdirect.cli.selfcheck import selfcheck  # noqa: PLC0415
    from vfdirect.cli.vm_run import vm_run  # noqa: PLC0415

    for command in (*HOST_COMMANDS, selfcheck, demo, vm_run):
        cli.add_command(command)


def main(argv: list[str] | None = None) -> NoReturn:
    _register()
    cli.main(args=argv, prog_name="vfdirect")
    sys.exit(0)  # pragma: no cover (cli.main always exits)
