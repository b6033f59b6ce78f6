"""The VM tests share the in-process device of tests/core/guest and the adapter test
helpers (tests/adapter)."""

from __future__ import annotations

import sys
from pathlib import Path

_TESTS = Path(__file__).resolve().parents[1]
for sub in ("core/guest", "adapter"):
    path = str(_TESTS / sub)
    if path not in sys.path:
        sys.path.insert(0, path)
