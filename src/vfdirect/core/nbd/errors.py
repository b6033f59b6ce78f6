"""The NBD core's one error type."""

from __future__ import annotations

__all__ = ["NbdProtocolError"]


class NbdProtocolError(Exception):
    """The peer broke a mandatory rule of the protocol: the connection must be dropped."""
