"""Issue 8, fuzz targets: each of the six atheris targets of ``fuzz/`` runs through its
rig for ``VFDIRECT_FUZZ_SECONDS`` (default 6) with ``VFDIRECT_FUZZ_SEED`` (default 1):
the SCSI CDB decoder over a real block backend, descriptor chains and virtio-scsi headers
in live guest memory, vhost-user messages, PF admin JSON-RPC, the migration stream loader
and a VM's NBD export. Invariants (``fuzz/rig.py``, ``fuzz/README.md``): the target ends
without a crash; the adapter and the VMs live and answer; a sentinel VM on VF 1 verifies
throughout and ends ok; the adapter's auditor ran checks and counted 0 violations; the
canaries past the fuzzed front ends' granted memory and the LUN bytes outside the
vdisks' extents are unchanged. Each prints its counters (``-s``) and writes them to
``artifacts/proof/fuzz-<target>.json``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
for _sub in ("fuzz", "tests/adapter", "tests/vm"):
    _p = str(_ROOT / _sub)
    if _p not in sys.path:
        sys.path.insert(0, _p)

import rig  # noqa: E402 (after the path set-up above)

SECONDS = float(os.environ.get("VFDIRECT_FUZZ_SECONDS", "6"))
SEED = int(os.environ.get("VFDIRECT_FUZZ_SEED", "1"))

pytestmark = pytest.mark.timeout(int(SECONDS) + 240)


@pytest.mark.parametrize("target", rig.TARGETS)
def test_fuzz_target(target: str, tmp_path: Path) -> None:
    result = rig.run_target(target, seconds=SECONDS, seed=SEED, work=tmp_path / "fz")
    result.write_artifact()
    print(result.summary())
    assert result.ok, "\n".join(result.failures)
    counters = result.counters()
    assert counters["execs"] > 0 and counters["inputs"] > 0
    assert counters["violations"] == 0
    if target in rig.LIVE:
        assert counters["audit_checks"] > 0
        assert result.sentinel.get("ok") is True
