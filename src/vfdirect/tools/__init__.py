"""Operator tools built from the cores and the storage shell (self-check, later benchmarks)."""
