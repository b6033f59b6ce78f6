"""Command-line interface (a process shell over the cores and, later, the host API)."""
