"""The ``vfdirect`` command."""

from __future__ import annotations

import click

from vfdirect import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="vfdirect")
def cli() -> None:
    """vfdirect: direct VM storage access through SR-IOV virtual functions."""


def main() -> None:
    cli()
