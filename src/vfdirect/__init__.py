"""vfdirect: VMs reach storage directly through the VFs of an emulated SR-IOV storage adapter.

Pure protocol and policy cores live in :mod:`vfdirect.core`; everything that touches
files, sockets, shared memory, threads or the clock lives outside it.
"""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Looked up on first use: importlib.metadata costs every short CLI call ~50 ms.
    if name != "__version__":
        raise AttributeError(f"module 'vfdirect' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        found = version("vfdirect")
    except PackageNotFoundError:  # running from a source tree without installation
        found = "0.0.0+unknown"
    globals()["__version__"] = found
    return found
