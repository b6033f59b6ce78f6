"""Fuzz target ``pf_rpc``: JSON-RPC 2.0 requests to the real adapter's PF socket.

Two kinds of input: raw bytes sent as one packet, and structured requests generated over
the real method table (:data:`~vfdirect.core.adapter.methods.METHODS`): a real method
name (or a bad one), each declared parameter given a value from a pool of valid and
invalid values of its kind, parameters dropped or added, the id of every JSON type.
State-changing calls only name the fuzz objects (VF 0, 2, 3..., the fuzz vport, vports
the fuzzer creates, LUN 2 of the array, which only the fuzz vport may be masked to), never
the sentinel's VF or vport, so that the sentinel is not legitimately reconfigured. Each
request is followed by a probe (``adapter_identify``) that must be answered.

Invariants (a violation is a crash input): every reply is a JSON-RPC 2.0 response, a
result or an error with a stable code of :class:`~vfdirect.core.rpc.ErrorCode` other than
INTERNAL_ERROR, with the request's id (null only for requests whose id could not be
read); the adapter answers the probe. The rig checks the sentinel, the auditor and the
LUN bytes outside the extents (LUN 2 belongs to the fuzzer here).

Run: ``.venv/bin/python fuzz/fuzz_pf_rpc.py -max_total_time=60 -seed=1 [corpus]``.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Callable
from typing import Any

import atheris
import fuzzlib
from fuzzlib import Stats, Violation

# Coverage of the adapter (another process) cannot reach libFuzzer: only the reply decoder
# is instrumented; the rest of the harness is imported plainly (instrumenting it costs
# seconds of start-up and guides nothing).
with atheris.instrument_imports(include=["vfdirect.core.rpc"]):
    from vfdirect.core.rpc import MAX_MESSAGE_BYTES, ErrorCode, RpcError, decode_response

from live import FuzzVf

from vfdirect.adapter.pf_client import PfError
from vfdirect.core.adapter.methods import MAX_FDS, METHODS
from vfdirect.core.adapter.params import ParamKind, ParamSpec
from vfdirect.core.wwn import Wwn

TARGET = "pf_rpc"
REPLY_WAIT_S = 30.0
PROBE_ID = "probe"


class Pools:
    """Values of each parameter kind, valid and invalid, none naming the sentinel."""

    def __init__(self, cfg: dict[str, Any], buffer_id: int) -> None:
        sentinel_vf = int(cfg["sentinel_vf"])
        self.sentinel_wwpn = Wwn.parse(cfg["sentinel_vport"])
        # mostly VF 0 (the fuzz VF, with a front end connected), never the sentinel's
        self.vfs = [v for v in (0, 0, 0, 0, 2, 3, 15, 256, -1, 1 << 31) if v != sentinel_vf]
        self.wwns: list[Any] = [cfg["vport"], cfg["array_wwn"], "naa.bad", "", 7, None]
        self.buffer_id = buffer_id
        self.array = cfg["array"]
        self.tmp = cfg["tmp"]
        self.mapping = cfg["mapping"]
        #: queue-state records the fuzz VF handed over (vf_state_save), to restore
        self.saved: list[Any] = []

    def wwn(self, fdp: Any) -> Any:
        if fdp.ConsumeIntInRange(0, 2) == 0:  # a fresh one: creates fuzz vports
            w = Wwn.naa5(0xF00000 + fdp.ConsumeIntInRange(0, 15))
            return w.canonical() if w != self.sentinel_wwpn else self.wwns[0]
        return fdp.PickValueInList(self.wwns)

    def value(self, spec: ParamSpec, fdp: Any) -> Any:
        bad = [None, True, 1.5, "x", [], {}, -1]
        if fdp.ConsumeIntInRange(0, 7) == 0:
            return fdp.PickValueInList(bad)
        kind = spec.kind
        if kind is ParamKind.INT:
            if spec.name == "vf":
                return fdp.PickValueInList(self.vfs)
            if spec.name == "timeout_ms":
                return fdp.PickValueInList([0, 10, 100, 200, -1, 60_001])
            if spec.name == "buffer":
                return fdp.PickValueInList([0, self.buffer_id, 999, 1 << 31])
            if spec.name == "vm_pid":
                return fdp.PickValueInList([os.getpid(), 1, 1 << 22, 0, -5])
            return fdp.PickValueInList([0, 1, 2, 4, 16, 255, 256, 4096,
                                        fdp.ConsumeInt(4)])
        if kind is ParamKind.BOOL:
            return fdp.PickValueInList([True, False, 0, "true"])
        if kind in (ParamKind.NAME, ParamKind.STR):
            return fdp.PickValueInList(["fz", "vm-x", "", "bad name!", "a" * 65,
                                        fdp.ConsumeUnicodeNoSurrogates(12)])
        if kind is ParamKind.WWN:
            return self.wwn(fdp)
        if kind is ParamKind.ZONE:
            return fdp.PickValueInList(["vms", "fz_zone", "", "1bad", "z" * 70,
                                        fdp.ConsumeUnicodeNoSurrogates(8)])
        if kind is ParamKind.PATH:
            return fdp.PickValueInList([self.array, f"{self.tmp}/nope", self.tmp, "relative",
                                        "", "/nonexistent/array"])
        if kind is ParamKind.HEX:
            return fdp.PickValueInList([
                "00" * 6, "280000000000000100" + "00", "2a0000000000000100" + "00",
                "12000000600000", fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40)).hex(), "zz",
                "0"])
        if kind is ParamKind.ENUM:
            return fdp.PickValueInList([*spec.choices, "sideways", 3])
        if kind is ParamKind.OBJECT:
            return self.obj(fdp)
        if kind is ParamKind.WWN_LIST:
            return [self.wwn(fdp) for _ in range(fdp.ConsumeIntInRange(0, 4))]
        if kind is ParamKind.INT_LIST:  # LUN numbers: never LUN 0 or 1 (the sentinel's)
            return fdp.PickValueInList([[2], [2, 3], [5], [], [-1], [1 << 20], "2",
                                        [2] * 3])
        if kind is ParamKind.SG_LIST:
            return fdp.PickValueInList([[], [[0, 512]], [[0, 1 << 20]],
                                        [[4096, 512], [0, 512]], [[-1, 5]], [[0, 1 << 31]],
                                        "x", [[0]]])
        return fdp.PickValueInList(bad)

    def obj(self, fdp: Any) -> Any:
        source = self.mapping
        if self.saved and fdp.ConsumeBool():  # a real queue-state record
            source = fdp.PickValueInList(self.saved)
        base = json.loads(json.dumps(source))
        if fdp.ConsumeIntInRange(0, 3) == 0:
            return base
        choice = fdp.ConsumeIntInRange(0, 3)
        if choice == 0:
            return fdp.PickValueInList([{}, [], {"format": "x"}, {"version": 2}])
        # one value somewhere in the table replaced
        node: Any = base
        for _ in range(fdp.ConsumeIntInRange(1, 5)):
            if isinstance(node, dict) and node:
                key = fdp.PickValueInList(sorted(node))
                if fdp.ConsumeIntInRange(0, 2) == 0 or not isinstance(node[key],
                                                                      dict | list):
                    node[key] = fdp.PickValueInList([None, -1, 0, 1 << 40, "x", [], {},
                                                     True, fdp.ConsumeInt(4)])
                    break
                node = node[key]
            elif isinstance(node, list) and node:
                i = fdp.ConsumeIntInRange(0, len(node) - 1)
                if not isinstance(node[i], dict | list):
                    node[i] = fdp.PickValueInList([None, -1, "x", fdp.ConsumeInt(4)])
                    break
                node = node[i]
            else:
                break
        return base


def _safe_raw(packet: bytes, pools: Pools, sentinel_vf: int) -> bool:
    """Raw bytes that happen to be a request naming the sentinel are not sent."""
    try:
        obj = json.loads(packet)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return True
    text = json.dumps(obj)
    params = obj.get("params") if isinstance(obj, dict) else None
    if isinstance(params, dict) and params.get("vf") == sentinel_vf:
        return False
    return pools.sentinel_wwpn.canonical() not in text.lower()


def setup() -> Callable[[bytes], None]:
    stats = Stats(TARGET)
    cfg = fuzzlib.config()
    vf = FuzzVf(cfg, stats)  # VF 0 assigned to this process, the fuzz vport bound
    memfd = os.memfd_create("vfd-fuzz-pfio", os.MFD_CLOEXEC)
    os.ftruncate(memfd, 1 << 20)
    buffer_id = int(vf.pf.call_with_fds("pf_io_buffer_attach", {}, [memfd])[0]["buffer"])
    pools = Pools(cfg, buffer_id)
    sentinel_vf = int(cfg["sentinel_vf"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    sock.settimeout(REPLY_WAIT_S)
    sock.connect(cfg["pf"])
    methods = [m.name for m in METHODS]
    by_name = {m.name: m for m in METHODS}
    counter = [0]
    front: list[Any] = [None]

    def refresh() -> None:
        """Give the fuzz VF its VM, vport, mapping and a connected front end again (the
        fuzzer quiesces, saves, resets and unassigns it)."""
        if front[0] is not None and vf.state() == "CONNECTED":
            return
        if front[0] is not None:
            vf.close_checked(front[0])
            front[0] = None
        with contextlib.suppress(PfError):
            if vf.state() not in ("IDLE", "ASSIGNED"):
                vf.pf.vf_reset(vf.vf)
                stats.add("vf_resets")
            if vf.state() == "IDLE":
                vf.assign()
        try:
            front[0] = vf.front_end()
            stats.add("front_ends")
        except (OSError, ConnectionError, TimeoutError, AssertionError):
            front[0] = None

    refresh()

    def test_one(data: bytes) -> None:
        fdp = fuzzlib.provider(data)
        stats.add("inputs")
        counter[0] += 1
        if counter[0] % 50 == 0:
            refresh()
        fds: list[int] = []
        expect_id: Any = "?"
        if fdp.ConsumeIntInRange(0, 4) == 0:
            # (not empty: on SOCK_SEQPACKET an empty record reads as the end of the connection)
            packet = fdp.ConsumeBytes(fdp.ConsumeIntInRange(1, 600)) or b"\0"
            if not _safe_raw(packet, pools, sentinel_vf):
                stats.add("skipped_unsafe")
                return
            stats.add("raw_packets")
        else:
            method = fdp.PickValueInList(methods) if fdp.ConsumeIntInRange(0, 9) else \
                fdp.PickValueInList(["nope", "", "VF_LIST", "vf list", 7, None])
            spec = by_name.get(method) if isinstance(method, str) else None
            params: Any = {}
            if spec is not None:
                for p in spec.params:
                    if p.required or fdp.ConsumeBool():
                        params[p.name] = pools.value(p, fdp)
                if params and fdp.ConsumeIntInRange(0, 7) == 0:
                    params.pop(fdp.PickValueInList(sorted(params)))
                if fdp.ConsumeIntInRange(0, 9) == 0:
                    params["extra"] = 1
                if method == "pf_io_buffer_attach" and fdp.ConsumeBool():
                    fds = [os.dup(memfd)]
            if fdp.ConsumeIntInRange(0, 11) == 0:
                params = fdp.PickValueInList([[], "x", None, 3])
            rid = fdp.PickValueInList([counter[0], f"r{counter[0]}", counter[0], counter[0],
                                       counter[0], counter[0], None, "missing", True, 1.5])
            obj: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
            if params != {} or fdp.ConsumeBool():
                obj["params"] = params
            if rid != "missing":
                obj["id"] = rid
            if fdp.ConsumeIntInRange(0, 15) == 0:
                obj["jsonrpc"] = "1.0"
            packet = json.dumps(obj).encode()
            expect_id = rid if isinstance(rid, int | str) and not isinstance(rid, bool) \
                and rid != "missing" else None
            stats.add("requests")
            if isinstance(method, str) and spec is not None:
                stats.add(f"method_{method}")
        vf.sample_inflight()
        try:
            if fds:
                socket.send_fds(sock, [packet], fds)
            else:
                sock.send(packet)
            sock.send(json.dumps({"jsonrpc": "2.0", "method": "adapter_identify",
                                  "id": PROBE_ID}).encode())
        finally:
            for fd in fds:
                os.close(fd)
        result = _replies(sock, expect_id, stats)
        if isinstance(result, dict) and isinstance(result.get("state"), dict) \
                and len(pools.saved) < 8:
            pools.saved.append(result["state"])
            stats.add("saved_records")
        stats.tick()

    return test_one


def _replies(sock: socket.socket, expect_id: Any, stats: Stats) -> Any:
    """Read the reply to the fuzzed request (if it gets one) and the probe's; the result
    of the fuzzed request, if any."""
    result = None
    while True:
        try:
            data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, MAX_FDS)
        except TimeoutError:
            stats.flush()
            raise Violation(f"no reply from the PF in {REPLY_WAIT_S:g} s") from None
        for fd in fds:
            os.close(fd)
        if not data:
            raise Violation("the PF closed the connection")
        try:
            resp = decode_response(data)
        except (RpcError, ValueError) as exc:
            stats.flush()
            raise Violation(f"a malformed reply {data[:200]!r}: {exc}") from None
        if resp.id == PROBE_ID:
            if resp.error is not None:
                raise Violation(f"the probe failed: {resp.error!r}")
            stats.add("probes")
            return result
        if resp.error is not None:
            code = resp.error.code
            if code == ErrorCode.INTERNAL_ERROR:
                stats.flush()
                raise Violation(f"INTERNAL_ERROR: {resp.error.message}")
            if expect_id != "?" and resp.id not in (expect_id, None):
                raise Violation(f"an error reply with id {resp.id!r}, sent {expect_id!r}")
            stats.add("rejected")
            stats.add(f"error_{code.name.lower()}")
        else:
            if expect_id not in ("?", resp.id):
                raise Violation(f"a result with id {resp.id!r}, sent {expect_id!r}")
            stats.add("processed")
            result = resp.result


if __name__ == "__main__":
    fuzzlib.main(TARGET, setup)
