"""What the commands share: the user-error type and parameter types."""

from __future__ import annotations

import re

import click


class CliError(click.ClickException):
    """An operation the user asked for cannot be done; the message says why."""

    exit_code = 1


_UNITS = {
    "": 1, "b": 1,
    "k": 1 << 10, "kb": 1000, "kib": 1 << 10,
    "m": 1 << 20, "mb": 1000**2, "mib": 1 << 20,
    "g": 1 << 30, "gb": 1000**3, "gib": 1 << 30,
    "t": 1 << 40, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([a-z]*)\s*$")


def parse_size(text: str) -> int:
    """``512``, ``4k``, ``64MiB``, ``1GB``... -> bytes; ``ValueError`` with the reason."""
    m = _SIZE_RE.match(text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise ValueError(f"{text!r} is not a size (examples: 4096, 64MiB, 1GiB)")
    return int(m.group(1)) * _UNITS[m.group(2)]


class SizeType(click.ParamType):  # type: ignore[type-arg]
    name = "size"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE = SizeType()


class LazyGroup(click.Group):
    """A group some of whose commands are imported only when used: ``lazy`` maps a
    command name to ``"module:attribute"``. A command that needs the heavy parts of
    vfdirect (the adapter daemon, the guest runtime) then costs nothing to the others:
    every ``vfdirect`` call imports the modules of the command it runs, not all of them."""

    def __init__(self, *args: object, lazy: dict[str, str] | None = None,
                 **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = self.lazy.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        import importlib  # noqa: PLC0415

        module, _, attr = target.partition(":")
        command = getattr(importlib.import_module(module), attr)
        if not isinstance(command, click.Command):  # pragma: no cover (a wiring bug)
            raise TypeError(f"{target} is not a click command")
        return command
