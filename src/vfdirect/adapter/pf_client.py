"""The hypervisor's client of the PF admin channel: synchronous, one typed method per
admin method of :data:`~vfdirect.core.adapter.methods.METHODS`.

Every call sends one packet and waits, bounded by ``timeout``, for its reply. A JSON-RPC
error becomes :class:`PfError`, carrying the stable :class:`~vfdirect.core.rpc.ErrorCode`
and the adapter's message. File descriptors go out with SCM_RIGHTS; those that come back
(``vf_state_save``) are owned by the caller; any other descriptor a reply carries is
closed.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from vfdirect.core.adapter.methods import MAX_FDS
from vfdirect.core.rpc import MAX_MESSAGE_BYTES, ErrorCode, RpcError, decode_response
from vfdirect.core.rpc import encode_request as _encode_request
from vfdirect.core.wwn import Wwn

WwnLike = Wwn | str


class PfError(Exception):
    """The adapter answered with an error (or the channel failed)."""

    def __init__(self, code: ErrorCode, message: str, data: Any = None) -> None:
        super().__init__(f"{code.name} ({int(code)}): {message}")
        self.code = code
        self.message = message
        self.data = data


def _w(value: WwnLike) -> str:
    return value.canonical() if isinstance(value, Wwn) else value


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class PfClient:
    """A connection to an adapter's ``pf.sock``."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 30.0) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
                with contextlib.suppress(OSError):
                    self._sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            self._sock.settimeout(timeout)
            self._sock.connect(os.fspath(path))
        except BaseException:
            self._sock.close()
            raise
        self._next_id = 1

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- the generic call ------------------------------------------------------------

    def call_with_fds(self, method: str, params: Mapping[str, Any] | None = None,
                      fds: Sequence[int] = ()) -> tuple[Any, list[int]]:
        """Send one request; its result and the descriptors the reply carried."""
        rid = self._next_id
        self._next_id += 1
        packet = _encode_request(method, dict(params or {}), rid)
        try:
            if fds:
                socket.send_fds(self._sock, [packet], list(fds))
            else:
                self._sock.send(packet)
            while True:
                data, got, _flags, _ = socket.recv_fds(self._sock, MAX_MESSAGE_BYTES, MAX_FDS)
                if not data:
                    _close(got)
                    raise PfError(ErrorCode.INTERNAL_ERROR, "the adapter closed the connection")
                try:
                    resp = decode_response(data)
                except RpcError as exc:
                    _close(got)
                    raise PfError(exc.code, f"bad reply: {exc.message}") from None
                if resp.error is not None and resp.id is None:
                    _close(got)  # refused connection, or a reply that could not be sent
                    raise PfError(resp.error.code, resp.error.message, resp.error.data)
                if resp.id != rid:
                    _close(got)  # a late reply to an earlier, timed-out request
                    continue
                if resp.error is not None:
                    _close(got)
                    raise PfError(resp.error.code, resp.error.message, resp.error.data)
                return resp.result, got
        except TimeoutError:
            raise PfError(ErrorCode.TIMEOUT, f"{method}: no reply in time") from None
        except OSError as exc:
            # the adapter may have answered (a refusal) and closed before we read it
            pending = self._pending_error()
            if pending is not None:
                raise pending from None
            raise PfError(ErrorCode.INTERNAL_ERROR, f"{method}: channel failed: {exc}") \
                from None

    def _pending_error(self) -> PfError | None:
        """An error packet the adapter left before it closed the connection."""
        try:
            data, got, _flags, _ = socket.recv_fds(self._sock, MAX_MESSAGE_BYTES, MAX_FDS,
                                                   socket.MSG_DONTWAIT)
        except OSError:
            return None
        _close(got)
        try:
            resp = decode_response(data)
        except RpcError:
            return None
        if resp.error is None:
            return None
        return PfError(resp.error.code, resp.error.message, resp.error.data)

    def call(self, method: str, params: Mapping[str, Any] | None = None,
             fds: Sequence[int] = ()) -> Any:
        """Send one request; its result (descriptors in the reply are closed)."""
        result, got = self.call_with_fds(method, params, fds)
        _close(got)
        return result

    # -- adapter -----------------------------------------------------------------------

    def adapter_identify(self) -> dict[str, Any]:
        return dict(self.call("adapter_identify"))

    def adapter_get_stats(self) -> dict[str, Any]:
        return dict(self.call("adapter_get_stats"))

    def adapter_dump(self) -> dict[str, Any]:
        return dict(self.call("adapter_dump"))

    def array_attach(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        return dict(self.call("array_attach", {"path": str(Path(path).resolve())}))

    # -- fabric ------------------------------------------------------------------------

    def fabric_zone_create(self, name: str, members: Sequence[WwnLike] = ()) -> dict[str, Any]:
        return dict(self.call("fabric_zone_create",
                              {"name": name, "members": [_w(m) for m in members]}))

    def fabric_zone_member_add(self, name: str, members: Sequence[WwnLike]) -> dict[str, Any]:
        return dict(self.call("fabric_zone_member_add",
                              {"name": name, "members": [_w(m) for m in members]}))

    def fabric_mask_grant(self, initiator: WwnLike, array: WwnLike,
                          luns: Sequence[int]) -> dict[str, Any]:
        return dict(self.call("fabric_mask_grant", {"initiator": _w(initiator),
                                                    "array": _w(array), "luns": list(luns)}))

    def fabric_mask_revoke(self, initiator: WwnLike, array: WwnLike,
                           luns: Sequence[int]) -> dict[str, Any]:
        return dict(self.call("fabric_mask_revoke", {"initiator": _w(initiator),
                                                     "array": _w(array), "luns": list(luns)}))

    def fabric_show(self) -> dict[str, Any]:
        return dict(self.call("fabric_show"))

    # -- VFs ---------------------------------------------------------------------------

    def vf_enable(self, count: int) -> dict[str, Any]:
        return dict(self.call("vf_enable", {"count": count}))

    def vf_list(self) -> list[dict[str, Any]]:
        return list(self.call("vf_list")["vfs"])

    def vf_get(self, vf: int) -> dict[str, Any]:
        return dict(self.call("vf_get", {"vf": vf}))

    def vf_assign(self, vf: int, vm_name: str, vm_pid: int) -> dict[str, Any]:
        """Assign; the result's ``socket_path`` is the VF's vhost-user socket."""
        return dict(self.call("vf_assign", {"vf": vf, "vm_name": vm_name, "vm_pid": vm_pid}))

    def vf_unassign(self, vf: int) -> dict[str, Any]:
        return dict(self.call("vf_unassign", {"vf": vf}))

    def vf_reset(self, vf: int) -> dict[str, Any]:
        return dict(self.call("vf_reset", {"vf": vf}))

    # -- vports ------------------------------------------------------------------------

    def vport_create(self, wwpn: WwnLike, wwnn: WwnLike,
                     alternate_wwpn: WwnLike | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"wwpn": _w(wwpn), "wwnn": _w(wwnn)}
        if alternate_wwpn is not None:
            params["alternate_wwpn"] = _w(alternate_wwpn)
        return dict(self.call("vport_create", params))

    def vport_delete(self, wwpn: WwnLike) -> dict[str, Any]:
        return dict(self.call("vport_delete", {"wwpn": _w(wwpn)}))

    def vport_login(self, wwpn: WwnLike, *, alternate: bool = False) -> dict[str, Any]:
        return dict(self.call("vport_login", {"wwpn": _w(wwpn), "alternate": alternate}))

    def vport_logout(self, wwpn: WwnLike) -> dict[str, Any]:
        return dict(self.call("vport_logout", {"wwpn": _w(wwpn)}))

    def vport_bind(self, wwpn: WwnLike, vf: int) -> dict[str, Any]:
        return dict(self.call("vport_bind", {"wwpn": _w(wwpn), "vf": vf}))

    def vport_unbind(self, wwpn: WwnLike) -> dict[str, Any]:
        return dict(self.call("vport_unbind", {"wwpn": _w(wwpn)}))

    # -- mapping -----------------------------------------------------------------------

    def mapping_load(self, vf: int, mapping: Mapping[str, Any]) -> dict[str, Any]:
        return dict(self.call("mapping_load", {"vf": vf, "mapping": dict(mapping)}))

    def mapping_unload(self, vf: int) -> dict[str, Any]:
        return dict(self.call("mapping_unload", {"vf": vf}))

    def mapping_get(self, vf: int) -> dict[str, Any] | None:
        mapping = self.call("mapping_get", {"vf": vf})["mapping"]
        return None if mapping is None else dict(mapping)

    # -- migration ---------------------------------------------------------------------

    def vf_quiesce(self, vf: int) -> int:
        return int(self.call("vf_quiesce", {"vf": vf})["outstanding"])

    def vf_drain(self, vf: int, timeout_ms: int) -> tuple[bool, list[int]]:
        r = self.call("vf_drain", {"vf": vf, "timeout_ms": timeout_ms})
        return bool(r["drained"]), list(r["outstanding"])

    def vf_state_save(self, vf: int) -> tuple[dict[str, Any], list[int]]:
        """The queue-state record and its descriptors (now owned by the caller)."""
        result, fds = self.call_with_fds("vf_state_save", {"vf": vf})
        return dict(result["state"]), fds

    def vf_state_restore(self, vf: int, state: Mapping[str, Any],
                         fds: Sequence[int] = ()) -> dict[str, Any]:
        return dict(self.call("vf_state_restore", {"vf": vf, "state": dict(state)}, fds))

    def vf_resume(self, vf: int) -> dict[str, Any]:
        return dict(self.call("vf_resume", {"vf": vf}))

    # -- PF IO -------------------------------------------------------------------------

    def pf_io_buffer_attach(self, fd: int) -> tuple[int, int]:
        """Attach the memfd ``fd`` (still owned by the caller); (buffer id, size)."""
        r = self.call("pf_io_buffer_attach", {}, [fd])
        return int(r["buffer"]), int(r["size"])

    def pf_io_buffer_detach(self, buffer: int) -> None:
        self.call("pf_io_buffer_detach", {"buffer": buffer})

    def pf_io_submit(
        self,
        wwpn: WwnLike,
        target: int,
        lun: int,
        cdb: bytes,
        *,
        buffer: int = 0,
        sg: Sequence[tuple[int, int]] = (),
        direction: str = "none",
    ) -> dict[str, Any]:
        """One SCSI command through the PF: ``{status, sense (hex), residual, data_len}``."""
        return dict(self.call("pf_io_submit", {
            "wwpn": _w(wwpn), "target": target, "lun": lun, "cdb": cdb.hex(),
            "buffer": buffer, "sg": [[o, n] for o, n in sg], "direction": direction,
        }))
