"""vfdirect: VMs reach storage directly through the VFs of an emulated SR-IOV storage adapter.

Pure protocol and policy cores live in :mod:`vfdirect.core`; everything that touches
files, sockets, shared memory, threads or the clock lives outside it.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vfdirect")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
