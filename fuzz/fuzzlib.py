"""What every fuzz target shares (the child side): the rig's configuration, counters
written regularly to ``VFDIRECT_FUZZ_STATS``, and the entry point.

A target script runs in one of two roles:

* **standalone** (no ``VFDIRECT_FUZZ_CHILD`` in the environment): it builds the rig of
  :mod:`rig` (adapter with ``--audit``, sentinel VM, ...), runs itself as the child with
  the same libFuzzer flags, checks the invariants and prints the summary line;
* **child**: it reads the rig's configuration (``VFDIRECT_FUZZ_CONFIG``, a JSON file) and
  hands its test function to atheris.

This module imports nothing of vfdirect, so that each target imports vfdirect inside
``atheris.instrument_imports()``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import atheris

ROOT = Path(__file__).resolve().parents[1]
FUZZ_DIR = Path(__file__).resolve().parent
for _sub in ("tests/adapter", "tests/vm"):
    _p = str(ROOT / _sub)
    if _p not in sys.path:
        sys.path.insert(0, _p)
if str(FUZZ_DIR) not in sys.path:
    sys.path.insert(0, str(FUZZ_DIR))

CHILD_ENV = "VFDIRECT_FUZZ_CHILD"
CONFIG_ENV = "VFDIRECT_FUZZ_CONFIG"
STATS_ENV = "VFDIRECT_FUZZ_STATS"
#: Seconds between two writes of the counters.
STATS_PERIOD_S = 0.25


class Violation(AssertionError):
    """An invariant of the target did not hold: the input is a crash input."""


class Stats:
    """Named counters, written as one JSON object to ``VFDIRECT_FUZZ_STATS`` (atomically,
    at most every :data:`STATS_PERIOD_S`, and on :meth:`flush`): libFuzzer may end the
    process without running ``atexit`` handlers."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.counts: dict[str, int] = {"inputs": 0, "processed": 0, "rejected": 0}
        self.path = os.environ.get(STATS_ENV)
        self._last = 0.0

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n

    def peak(self, name: str, value: int) -> None:
        self.counts[name] = max(self.counts.get(name, 0), value)

    def tick(self) -> None:
        now = time.monotonic()
        if now - self._last >= STATS_PERIOD_S:
            self.flush()
            self._last = now

    def flush(self) -> None:
        if not self.path:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump({"target": self.target, **self.counts}, f)
        os.replace(tmp, self.path)


def provider(data: bytes, min_len: int = 512) -> Any:
    """A FuzzedDataProvider over ``data``, extended (deterministically: a SHA-256 stream
    of ``data``) to ``min_len`` bytes. The live targets run tens of inputs a second with
    no coverage feedback from the adapter's process, so libFuzzer's inputs stay short; the
    extension still gives each of them a whole structure, and a saved crash input
    reproduces."""
    if len(data) < min_len:
        out = bytearray(data)
        block = hashlib.sha256(data).digest()
        while len(out) < min_len:
            out += block
            block = hashlib.sha256(block).digest()
        data = bytes(out)
    return atheris.FuzzedDataProvider(data)


def config() -> dict[str, Any]:
    """The rig's configuration for this child (empty for in-process targets run without
    a rig file)."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        return {}
    loaded: dict[str, Any] = json.loads(Path(path).read_text(encoding="utf-8"))
    return loaded


def main(target: str, setup: Callable[[], Callable[[bytes], None]]) -> None:
    """Run ``target``: standalone through the rig, or (as the rig's child) fuzz the test
    function ``setup()`` returns."""
    if os.environ.get(CHILD_ENV) != "1":
        from rig import standalone  # noqa: PLC0415 (the harness: only the parent needs it)

        sys.exit(standalone(target, sys.argv[1:]))
    test_one = setup()
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
