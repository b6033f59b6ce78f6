"""NBD exports as the host records them and the VM serves them: a disk reference and an
address (pure data; the VM's server is :mod:`vfdirect.vm.nbd`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["ExportSpec", "ExportSpecError", "parse_disk_ref"]

_DISK_REF = re.compile(r"^(?:sd[a-z]+|\d{1,5}:\d{1,5})$")


class ExportSpecError(Exception):
    """The exports file (or one export) is not valid."""


def parse_disk_ref(text: str) -> str:
    """A disk reference as exports store it: ``sdX`` or ``target:lun`` (normalised)."""
    if not isinstance(text, str) or not _DISK_REF.match(text):
        raise ExportSpecError(f"disk {text!r} is neither a disk name (sda) nor target:lun")
    if ":" in text:
        target, lun = (int(x) for x in text.split(":"))
        if target > 255 or lun > 16383:
            raise ExportSpecError(f"disk {text!r}: target 0..255, LUN 0..16383")
        return f"{target}:{lun}"
    return text


@dataclass(frozen=True)
class ExportSpec:
    """One export: a disk and where it is served (exactly one of ``unix``, ``port``)."""

    disk: str
    unix: str | None = None
    port: int | None = None
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        object.__setattr__(self, "disk", parse_disk_ref(self.disk))
        if (self.unix is None) == (self.port is None):
            raise ExportSpecError(f"export of {self.disk}: give either a Unix socket path "
                                   f"or a TCP port")
        if self.unix is not None and (not isinstance(self.unix, str) or not self.unix
                                      or len(self.unix.encode()) > 107
                                      or "\0" in self.unix):
            raise ExportSpecError(f"export of {self.disk}: bad Unix socket path "
                                   f"{self.unix!r} (1..107 bytes)")
        if self.port is not None and (isinstance(self.port, bool)
                                      or not isinstance(self.port, int)
                                      or not 1 <= self.port <= 65535):
            raise ExportSpecError(f"export of {self.disk}: TCP port {self.port!r} is not "
                                   f"in 1..65535")
        if self.host not in ("127.0.0.1", "::1", "localhost"):
            raise ExportSpecError(f"export of {self.disk}: TCP exports listen on loopback "
                                   f"only, not {self.host!r}")

    @property
    def address(self) -> str:
        if self.unix is not None:
            return f"unix:{self.unix}"
        return f"tcp:{self.host}:{self.port}"

    @property
    def uri(self) -> str:
        """The NBD URI a client uses (when the disk name is the reference itself)."""
        if self.unix is not None:
            return f"nbd+unix:///{self.disk}?socket={self.unix}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.disk}"

    def dump(self) -> dict[str, Any]:
        out: dict[str, Any] = {"disk": self.disk}
        if self.unix is not None:
            out["unix"] = self.unix
        else:
            out["port"] = self.port
            if self.host != "127.0.0.1":
                out["host"] = self.host
        return out

    @classmethod
    def load(cls, data: Any) -> ExportSpec:
        if not isinstance(data, dict):
            raise ExportSpecError(f"an export must be an object, not {data!r}")
        unknown = set(data) - {"disk", "unix", "port", "host"}
        if unknown:
            raise ExportSpecError(f"export: unknown keys {sorted(unknown)}")
        if "disk" not in data:
            raise ExportSpecError("export: no disk")
        host = data.get("host", "127.0.0.1")
        if not isinstance(host, str):
            raise ExportSpecError(f"export: bad host {host!r}")
        return cls(disk=data["disk"], unix=data.get("unix"), port=data.get("port"),
                   host=host)
