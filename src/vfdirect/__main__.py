"""``python -m vfdirect`` runs the command-line interface."""

from vfdirect.cli.main import main

main()
