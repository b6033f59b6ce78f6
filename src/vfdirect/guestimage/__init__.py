"""The Linux guest of a QEMU VM: a Debian kernel and a small initramfs.

``scripts/mkinitramfs.sh`` fetches the kernel (``apt-get download`` of the package
``linux-image-amd64`` depends on, unpacked with ``dpkg-deb -x``) into the guest cache and
builds the initramfs there (busybox-static, the kernel's virtio/SCSI/ext4 modules,
e2fsprogs) around :data:`INIT_SCRIPT`. This module finds or builds that image and reads
what the guest's init reports on its console:

* ``VFDIRECT-BOOT {json}``: userspace runs;
* ``VFDIRECT-SCSI h:c:t:l ...``: one line per SCSI device the kernel found;
* ``VFDIRECT-RESULT {json}``: the one result line of a boot, just before it powers off.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: The guest's init (PID 1 of the initramfs).
INIT_SCRIPT = Path(__file__).with_name("init.sh")
#: The builder, in the source tree (``<repo>/scripts``).
MKINITRAMFS = Path(__file__).resolve().parents[3] / "scripts" / "mkinitramfs.sh"

RESULT_PREFIX = "VFDIRECT-RESULT "
BOOT_PREFIX = "VFDIRECT-BOOT "
SCSI_PREFIX = "VFDIRECT-SCSI "
#: Longest build (kernel download included).
BUILD_TIMEOUT_S = 900.0


class GuestImageError(Exception):
    """The guest image cannot be found or built; the message says why."""


@dataclass(frozen=True)
class GuestImage:
    kernel: Path
    initrd: Path

    def dump(self) -> dict[str, str]:
        return {"kernel": str(self.kernel), "initrd": str(self.initrd)}


def cache_dir() -> Path:
    """``$VFDIRECT_GUEST_CACHE``, else ``~/.cache/vfdirect/guest``."""
    env = os.environ.get("VFDIRECT_GUEST_CACHE")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vfdirect" / "guest"


def builder() -> Path:
    """The initramfs builder: ``$VFDIRECT_MKINITRAMFS`` or the source tree's script."""
    env = os.environ.get("VFDIRECT_MKINITRAMFS")
    path = Path(env) if env else MKINITRAMFS
    if not path.is_file():
        raise GuestImageError(f"initramfs builder {path} not found (set VFDIRECT_MKINITRAMFS "
                              "to scripts/mkinitramfs.sh of a vfdirect source tree)")
    return path


def ensure_image(cache: Path | None = None, *, force: bool = False,
                 timeout: float = BUILD_TIMEOUT_S) -> GuestImage:
    """The default guest image: the cached Debian kernel and the initramfs, fetched and
    built if missing or out of date (a no-op, apart from checksumming, when current)."""
    args = ["bash", str(builder()), "--cache", str(cache or cache_dir())]
    if force:
        args.append("--force")
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        raise GuestImageError(f"building the guest image took over {timeout:g} s") from None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise GuestImageError(f"building the guest image failed: {last}")
    found: dict[str, str] = {}
    for line in done.stdout.splitlines():
        key, _, value = line.partition("=")
        if key in ("KERNEL", "INITRD") and value:
            found[key] = value
    if set(found) != {"KERNEL", "INITRD"}:
        raise GuestImageError("the guest image builder did not name a kernel and an initrd")
    return GuestImage(Path(found["KERNEL"]), Path(found["INITRD"]))


def check_image(kernel: Path, initrd: Path) -> GuestImage:
    """A user's kernel and initrd: both must be readable files."""
    for what, path in (("kernel", kernel), ("initrd", initrd)):
        if not path.is_file():
            raise GuestImageError(f"{what} {path} is not a file")
        if not os.access(path, os.R_OK):
            raise GuestImageError(f"{what} {path} is not readable")
    return GuestImage(kernel.resolve(), initrd.resolve())


def _tagged(text: str, prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for line in text.splitlines():
        at = line.find(prefix)
        if at < 0:
            continue
        with contextlib.suppress(ValueError):
            item = json.loads(line[at + len(prefix):].strip(), strict=False)
            if isinstance(item, dict):
                out.append(item)
    return out


def guest_results(text: str) -> list[dict[str, Any]]:
    """Every ``VFDIRECT-RESULT`` object of a console text, oldest first."""
    return _tagged(text, RESULT_PREFIX)


def guest_boots(text: str) -> list[dict[str, Any]]:
    """Every ``VFDIRECT-BOOT`` object of a console text, oldest first."""
    return _tagged(text, BOOT_PREFIX)


__all__ = ["BOOT_PREFIX", "INIT_SCRIPT", "RESULT_PREFIX", "SCSI_PREFIX", "GuestImage",
           "GuestImageError", "builder", "cache_dir", "check_image", "ensure_image",
           "guest_boots", "guest_results"]
