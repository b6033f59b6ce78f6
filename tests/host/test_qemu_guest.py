"""A real Linux guest under QEMU on a VF (``vm create --runtime qemu``).

One host, one QEMU VM with two vdisks at explicit addresses, and a third vdisk of the same
datastore that belongs to no VM. The VM boots twice (Debian kernel + the initramfs of
scripts/mkinitramfs.sh, built once in the guest cache): the first boot makes ext4 on one
disk and writes files with known checksums, the second runs ``e2fsck -f -n`` and checks
them. The guest's Linux virtio-scsi driver talks to the VF directly (vhost-user-scsi-pci).
"""

from __future__ import annotations

import json
import mmap
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from host_helpers import ARRAY_WWN, Host, wait_gone

from vfdirect.guestimage import GuestImage, ensure_image, guest_results
from vfdirect.host.qemu import kernel_cmdline, qemu_argv
from vfdirect.storage import StorageArray

A = ARRAY_WWN.canonical()
LUN_BLOCKS = 65536  # 32 MiB of 512-byte blocks per LUN, sparse
#: the guest's addresses: (vdisk, target, LUN); the first holds the filesystem
ADDRESSES = (("d0", 1, 2), ("d1", 3, 0))
TOOLS = ("qemu-system-x86_64", "busybox", "cpio", "depmod", "mke2fs", "e2fsck")

pytestmark = [
    pytest.mark.timeout(900),
    pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                       reason=f"needs {', '.join(TOOLS)} (./vfd.sh setup installs them)"),
]


@pytest.fixture(scope="module")
def image() -> GuestImage:
    """The default guest image (built once per cache; later sessions reuse it)."""
    return ensure_image()


def _wait_result(h: Host, vm: str, boot: int, timeout: float = 300.0) -> dict[str, Any]:
    """The ``VFDIRECT-RESULT`` of the VM's ``boot``-th boot (1-based), from its console."""
    deadline = time.monotonic() + timeout
    while True:
        results = guest_results(h.cli("vm", "console", vm).stdout)
        if len(results) >= boot:
            return results[boot - 1]
        assert time.monotonic() < deadline, f"no guest result of boot {boot} of {vm}"
        time.sleep(0.5)


def _boot(h: Host, vm: str, boot: int) -> dict[str, Any]:
    """Start the VM, see QEMU on the VF, wait for the guest's result and its power-off,
    stop the VM (the host releases the VF)."""
    started = time.monotonic()
    shown = h.cli_json("vm", "start", vm)
    pid = shown["pid"]
    exe = Path(f"/proc/{pid}/exe").resolve().name
    vfs = {v["vf"]: v for v in h.cli_json("adapter", "show")["vfs"]}
    result = _wait_result(h, vm, boot)
    wall = time.monotonic() - started
    assert wait_gone(pid, 60.0), "QEMU did not exit after the guest powered off"
    info = h.cli_json("vm", "show", vm)
    text = h.cli("vm", "show", vm).stdout
    h.cli("vm", "stop", vm)
    return {"result": result, "wall_s": wall, "pid": pid, "exe": exe, "vm": shown,
            "vf": vfs[shown["vf"]], "show": info, "show_text": text}


@pytest.fixture(scope="module")
def guest(image: GuestImage, tmp_path_factory: pytest.TempPathFactory
          ) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("qemu")
    san = StorageArray.create(root / "san" / "array0", ARRAY_WWN)
    for _ in range(2):
        san.lun_create(LUN_BLOCKS, 512)
    h = Host(root / "run", arrays=(san.directory,))
    try:
        h.start()
        h.cli("datastore", "create", "ds0", "--lun", f"{A}:0", "--lun", f"{A}:1",
              "--chunk-blocks", "2048")
        disks = {name: h.cli_json("vdisk", "create", name, "--datastore", "ds0",
                                  "--blocks", str(blocks))
                 for name, blocks in (("d0", 49152), ("d1", 8192), ("spare", 8192))}
        h.cli("vm", "create", "g1", "--runtime", "qemu", "--memory", "256MiB")
        for name, target, lun in ADDRESSES:
            h.cli("vm", "attach", "g1", name, "--target", str(target), "--lun", str(lun))
        mapping = h.api("GET", "/v1/vms/g1/mapping")
        first = _boot(h, "g1", 1)
        second = _boot(h, "g1", 2)
        for n, b in (("first", first), ("second", second)):
            print(f"\nboot {n}: {b['wall_s']:.1f} s from vm start to result, guest uptime "
                  f"{b['result']['uptime_s']} s, accel {b['show']['qemu']['accel']} "
                  f"({b['show']['qemu']['accel_reason']})")
        yield {"host": h, "san": san, "disks": disks, "mapping": mapping,
               "boots": [first, second], "run": root / "run"}
    finally:
        h.cleanup()


def test_claim_A8_linux_guest_finds_exactly_its_addresses(guest: dict[str, Any]) -> None:
    first = guest["boots"][0]
    result = first["result"]
    expected = sorted(f"{t}:{lun}" for _, t, lun in ADDRESSES)
    # the hypervisor handed the addresses over (claim A8) on the kernel command line ...
    argv = json.loads((guest["run"] / "vms" / "g1" / "qemu-argv.json").read_text())
    cmdline = argv[argv.index("-append") + 1]
    assert f"vfdirect.disks={','.join(f'{t}:{lun}' for _, t, lun in ADDRESSES)}" in cmdline
    assert sorted(first["show"]["qemu"]["addresses"]) == expected
    # ... and Linux's own SCSI scan found exactly those (target, LUN)s, nothing else
    assert result["ok"] is True, result
    assert result["match"] is True and result["found"] == result["expected"] == expected
    hctls = sorted(d["hctl"] for d in result["devices"])
    assert len(hctls) == len(ADDRESSES)
    assert sorted(":".join(h.split(":")[2:]) for h in hctls) == expected
    assert {h.split(":")[1] for h in hctls} == {"0"}  # channel 0
    assert all(d["block"].startswith("sd") for d in result["devices"])
    sizes = {f"{d['target']}:{d['lun']}": d["sectors_512"] for d in result["devices"]}
    blocks = {f"{t}:{lun}": guest["disks"][n]["capacity_blocks"] for n, t, lun in ADDRESSES}
    assert sizes == blocks  # READ CAPACITY through the VF: the vdisks' sizes
    assert result["modules_failed"] == []
    # the process on the VF was QEMU itself, the pid the VF was assigned to
    assert first["exe"].startswith("qemu-system")
    assert first["vf"]["vm"] == {"name": "g1", "pid": first["pid"]}
    # which accelerator ran, and why, is in vm show (and the console)
    accel = first["show"]["qemu"]["accel"]
    assert accel in ("kvm", "tcg") and first["show"]["qemu"]["accel_reason"]
    assert re.search(rf"^qemu_accel +{accel} \(", first["show_text"], re.M)
    assert first["show"]["vm"]["runtime"] == "qemu"


def test_qemu_guest_filesystem_survives_reboot(guest: dict[str, Any]) -> None:
    first, second = (b["result"] for b in guest["boots"])
    assert first["boot"] == "first" and first["ok"] is True, first
    assert second["boot"] == "again", second
    assert second["fsck_rc"] == 0 and second["checksums_ok"] is True, second
    assert second["ok"] is True
    assert second["sha256"] == first["sha256"]
    assert set(first["sha256"]) == {"marker.txt", "random.bin", "dir/hello.txt"}
    assert second["marker"] == first["marker"]
    assert second["device"].startswith("/dev/sd")
    assert guest["boots"][1]["pid"] != guest["boots"][0]["pid"]


def _occurrences(path: Path, needle: bytes) -> list[int]:
    out: list[int] = []
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        at = m.find(needle)
        while at >= 0:
            out.append(at)
            at = m.find(needle, at + 1)
    return out


def test_qemu_guest_data_lands_in_its_vdisks_extents_only(guest: dict[str, Any]) -> None:
    """The marker the guest wrote is found, through the mapping (vdisk layout -> physical
    LUN extents), in the extents of the filesystem's vdisk and nowhere else."""
    marker = guest["boots"][0]["result"]["marker"].encode()
    san: StorageArray = guest["san"]
    layouts = {e["name"]: e["layout"] for e in guest["mapping"]["entries"]}
    assert set(layouts) == {"d0", "d1"}

    def owner(lun: int, offset: int) -> str | None:
        for name, layout in layouts.items():
            block_size = layout["block_size"]
            for p in layout["placements"]:
                lo = p["start"] * block_size
                if p["lun"] == lun and lo <= offset < lo + p["count"] * block_size:
                    return name
        return None

    hits: list[tuple[int, int, str | None]] = []
    for lun in (0, 1):
        hits += [(lun, off, owner(lun, off))
                 for off in _occurrences(san.lun_path(lun), marker)]
    assert hits, "the guest's marker is in no LUN file"
    assert {o for _, _, o in hits} == {"d0"}, hits
    # 128 marker lines in one file: each in the filesystem's data once, the journal
    # holds metadata only
    assert len(hits) >= 128


def test_qemu_vm_create_refusals(image: GuestImage, host: Host) -> None:
    """Bad runtime options are refused with one line each, and nothing is made."""
    kernel, initrd = str(image.kernel), str(image.initrd)
    cases = [
        (("--runtime", "qemu", "--kernel", "/nonexistent/vmlinuz", "--initrd", initrd),
         "kernel /nonexistent/vmlinuz is not a file"),
        (("--runtime", "qemu", "--kernel", kernel), "give both --kernel and --initrd"),
        (("--runtime", "qemu", "--memory", "16MiB"), "at least 64 MiB"),
        (("--kernel", kernel, "--initrd", initrd), "are for --runtime qemu"),
    ]
    for args, message in cases:
        proc = host.cli("vm", "create", "q1", *args, check=False)
        assert proc.returncode != 0, args
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("vfdirect: error: "), proc.stderr
        assert message in lines[0], (args, lines[0])
    assert host.cli_json("vm", "list") == []


def test_qemu_argv_shares_memory_and_uses_the_vf(tmp_path: Path, image: GuestImage) -> None:
    line = kernel_cmdline("g1", [(1, 2), (3, 0)], fs=(3, 0))
    assert "vfdirect.disks=1:2,3:0" in line.split() and "vfdirect.fs=3:0" in line.split()
    assert "vfdirect.disks=-" in kernel_cmdline("g1", []).split()
    argv = qemu_argv(binary="/usr/bin/qemu-system-x86_64", name="g1", accel="tcg",
                     memory_bytes=256 << 20, memory_path=tmp_path / "memory",
                     vf_socket="/run/vf0.sock", image=image, cmdline=line,
                     console=tmp_path / "console.log")
    joined = " ".join(argv)
    assert (f"memory-backend-file,id=mem,size=256M,mem-path={tmp_path / 'memory'},share=on"
            in argv)
    assert "pc,memory-backend=mem" in argv
    assert "socket,id=vf,path=/run/vf0.sock" in argv
    assert "vhost-user-scsi-pci,chardev=vf,num_queues=1" in argv
    assert "-no-reboot" in argv and "-nographic" in argv and "-accel tcg" in joined
    assert argv[argv.index("-append") + 1] == line


def test_qemu_vm_start_failure_rolls_back(image: GuestImage, host: Host,
                                          tmp_path: Path) -> None:
    """QEMU refusing to boot (a kernel that is none) fails the start with QEMU's reason;
    the VF is released and no process is left."""
    bogus = tmp_path / "not-a-kernel"
    bogus.write_bytes(b"\0" * 4096)
    host.cli("datastore", "create", "ds0", "--lun", f"{A}:0")
    host.cli("vdisk", "create", "d0", "--datastore", "ds0", "--blocks", "256")
    host.cli("vm", "create", "q2", "--runtime", "qemu", "--kernel", str(bogus),
             "--initrd", str(image.initrd))
    host.cli("vm", "attach", "q2", "d0")
    proc = host.cli("vm", "start", "q2", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "QEMU exited" in lines[0], proc.stderr
    shown = host.cli_json("vm", "show", "q2")
    assert shown["vm"]["state"] == "error" and shown["vm"]["vf"] is None
    assert all(v["state"] == "IDLE" for v in host.cli_json("adapter", "show")["vfs"])
    console = host.cli("vm", "console", "q2").stdout
    assert "qemu_exec" in console
