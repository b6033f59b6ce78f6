"""Child-side helpers of the live targets (``virtqueue``, ``vhost_user``, ``pf_rpc``): the
fuzz VF assigned to this process, front ends whose guest memory has canaries past the
memory they grant, and the settle/reset step after each input.

It imports vfdirect: a target imports what it instruments first (the adapter runs in
another process, so instrumenting this harness would guide nothing)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from fuzzlib import Stats, Violation
from vf_frontend_helpers import (
    MEM_SIZE,
    FrontEnd,
)
from vf_test_helpers import assign_vf0, wait_for

from vfdirect.adapter.pf_client import PfClient

#: Bytes of the memory file past the granted memory, filled with :data:`CANARY`.
CANARY_SIZE = 64 << 10
CANARY = bytes(range(256)) * (CANARY_SIZE // 256)


class CanaryFrontEnd(FrontEnd):
    """A :class:`FrontEnd` whose memory file is :data:`CANARY_SIZE` bytes longer than the
    memory it grants the VF (SET_MEM_TABLE covers the first :data:`MEM_SIZE` bytes); the
    tail holds a pattern that must never change."""

    def __init__(self, sock_path: str, mem_path: Path) -> None:
        super().__init__(sock_path, mem_path, mem_size=MEM_SIZE + CANARY_SIZE)
        self.shm.buffer[MEM_SIZE:] = CANARY

    def granted_bytes(self) -> int:
        return MEM_SIZE  # the canary past it is not granted


class FuzzVf:
    """The fuzz VF (VF 0) assigned to this process, and the rounds of front ends on it."""

    def __init__(self, cfg: dict[str, Any], stats: Stats, *, assign: bool = True) -> None:
        self.cfg = cfg
        self.stats = stats
        self.vf = int(cfg["vf"])
        self.sentinel_vf = int(cfg["sentinel_vf"])
        self.pf = PfClient(cfg["pf"], timeout=30.0)
        self.round = 0
        self.tmp = Path(cfg["tmp"])
        if assign:
            self.assign()

    def assign(self) -> None:
        assign_vf0(self.pf, self.cfg["mapping"], os.getpid())

    @property
    def socket_path(self) -> str:
        return str(self.pf.vf_get(self.vf)["socket_path"])

    def mem_path(self) -> Path:
        self.round += 1
        return Path("/dev/shm") / f"vfd-fuzz-{os.getpid()}-r{self.round % 4}.mem"

    def front_end(self, *, setup: bool = True) -> CanaryFrontEnd:
        path = self.mem_path()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fe = CanaryFrontEnd(self.socket_path, path)
        if setup:
            try:
                fe.setup()
            except BaseException:
                self.finish(fe)
                raise
        return fe

    def sample_inflight(self) -> None:
        """Requests the sentinel VF has in flight as this input is injected."""
        n = int(self.pf.vf_get(self.sentinel_vf).get("outstanding") or 0)
        self.stats.add("inflight_sum", n)
        self.stats.peak("inflight_max", n)

    def state(self) -> str:
        return str(self.pf.vf_get(self.vf)["state"])

    def finish(self, fe: FrontEnd) -> None:
        """Close the front end, let the VF settle (reset it from ERROR), then check the
        canary past the granted memory."""
        self.close_checked(fe, settle=True)

    def close_checked(self, fe: FrontEnd, *, settle: bool = False) -> None:
        """Close the front end (with ``settle``, wait for the VF as :meth:`finish`), then
        check the canary past the granted memory."""
        path = fe.shm.path
        fe.close(unlink=False)
        if settle:
            self.settle()
        if path is None:
            return
        try:
            with open(path, "rb") as f:
                f.seek(MEM_SIZE)
                tail = f.read(CANARY_SIZE)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self.stats.add("canary_checks")
        if tail != CANARY:
            self.stats.add("canary_violations")
            self.stats.flush()
            raise Violation("guest memory past the granted region changed (canary)")

    def settle(self) -> None:
        """The VF is done with the front end: ASSIGNED again, or ERROR (then vf_reset and
        assigned again)."""
        def settled() -> bool:
            io = self.pf.adapter_get_stats()["vfs"][self.vf]["io"]
            state = self.pf.vf_get(self.vf)["state"]
            if io is None:
                return state in ("ERROR", "ASSIGNED")
            if io["front_end_pid"] is not None:
                return False
            # the PF hears of the VF thread's events a little later: wait for them
            return bool(state == ("ERROR" if io["fault"] else "ASSIGNED"))

        try:
            wait_for("the fuzz VF to settle after its front end left", settled, timeout=20.0)
        except AssertionError as exc:
            self.stats.add("hangs")
            self.stats.flush()
            raise Violation(f"{exc} (state {self.state()})") from None
        vf = self.pf.vf_get(self.vf)
        if vf["state"] == "ERROR":
            if not vf["error"]:
                raise Violation("the VF is in ERROR without a reason")
            self.stats.add("vf_errors")
            if self.pf.vf_reset(self.vf)["state"] != "IDLE":
                raise Violation("vf_reset did not bring the VF back to IDLE")
            self.assign()
            self.stats.add("vf_resets")
        if self.pf.vf_get(self.sentinel_vf)["state"] != "CONNECTED":
            raise Violation("the sentinel VF is no longer CONNECTED")
