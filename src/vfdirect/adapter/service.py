"""The adapter service: the pure model, its platform, one lock, and packets in and out.

Rules of this module:

* :meth:`AdapterService.handle_packet` takes one received packet (bytes, file
  descriptors, ``recvmsg`` flags) and returns the reply packet; it never raises, and it
  closes every descriptor it received, whatever happened (a method that keeps one has
  duplicated it or mapped it);
* state changes (admin methods and data path events) run under one lock; readers of the
  configuration (the VF data path's threads) take the immutable snapshot
  :meth:`AdapterService.vf_snapshot` without locking;
* each request is logged as one event: method, id, outcome, duration;
* ``adapter_get_stats`` carries the auditor's counters as ``audit`` (the model knows
  nothing of the audit, a mode of this daemon).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from vfdirect.adapter.audit import disabled_snapshot
from vfdirect.adapter.log import log_event
from vfdirect.adapter.platform import HostPlatform
from vfdirect.core.adapter.model import AdapterModel
from vfdirect.core.adapter.platform import VfDataPath
from vfdirect.core.adapter.vf import VfEvent, VfRecord
from vfdirect.core.rpc import ErrorCode, RpcError, decode_request, encode_error, encode_result
from vfdirect.core.rpc.jsonrpc import RequestId
from vfdirect.core.wwn import Wwn


def close_fds(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class AdapterService:
    """One adapter: model + platform, serialized for writers."""

    def __init__(self, model: AdapterModel, platform: HostPlatform,
                 logger: logging.Logger) -> None:
        self._model = model
        self._platform = platform
        self._log = logger
        self._lock = threading.Lock()

    @property
    def model(self) -> AdapterModel:
        return self._model

    @property
    def platform(self) -> HostPlatform:
        return self._platform

    # -- hooks for the VF data path ----------------------------------------------------

    def vf_snapshot(self, index: int) -> tuple[VfRecord, Wwn | None]:
        """VF ``index`` as last configured (state, VM, vport, mapping: immutable) and the
        port name its IO goes out with; lock-free, one consistent state."""
        state = self._model.state
        return state.vfs[index], state.initiator_of(index)

    def vf_event(self, index: int, event: VfEvent, reason: str | None = None, *,
                 if_current: Callable[[], bool] | None = None) -> VfRecord | None:
        """Report a data path event (front end attached/gone, fault). ``if_current`` is
        checked under the lock first: False drops the event (it is stale: the VF was
        reset or reassigned since), and None is returned."""
        with self._lock:
            if if_current is not None and not if_current():
                record = None
            else:
                record = self._model.vf_event(index, event, reason)
        if record is None:
            log_event(self._log, "vf_event_stale", vf=index, vf_event=event.value,
                      reason=reason)
            return None
        log_event(self._log, "vf_event", vf=index, vf_event=event.value,
                  state=record.state.value, reason=reason)
        return record

    def register_datapath(self, index: int, datapath: VfDataPath | None) -> None:
        with self._lock:
            self._platform.register_datapath(index, datapath)
            if datapath is not None:
                state = self._model.state
                datapath.configure(state.vfs[index], state.initiator_of(index))

    # -- the admin channel -------------------------------------------------------------

    def handle_packet(
        self, data: bytes, fds: Sequence[int], msg_flags: int = 0
    ) -> tuple[bytes | None, tuple[int, ...]]:
        """The reply to one packet (None for a notification) and the fds to send."""
        start = time.monotonic()
        rid: RequestId = None
        method = "?"
        try:
            if msg_flags & socket.MSG_TRUNC:
                raise RpcError(ErrorCode.INVALID_REQUEST, "message over the size limit")
            req = decode_request(data)
            rid, method = req.id, req.method
            if msg_flags & socket.MSG_CTRUNC:
                raise RpcError(ErrorCode.BAD_FDS,
                               f"{method}: more file descriptors than a request may carry")
            with self._lock:
                reply = self._model.call(req.method, req.params, fds)
            if method == "adapter_get_stats" and isinstance(reply.result, dict):
                reply.result["audit"] = self.audit_stats()
            if req.is_notification:
                close_fds(reply.fds)
                self._logged(method, rid, "ok", start)
                return None, ()
            try:
                packet = encode_result(rid, reply.result)
            except (TypeError, ValueError) as exc:
                close_fds(reply.fds)
                raise RpcError(ErrorCode.INTERNAL_ERROR,
                               f"{method}: result is not JSON ({exc})") from None
            self._logged(method, rid, "ok", start)
            return packet, reply.fds
        except RpcError as exc:
            self._logged(method, rid, exc.code.name, start, exc.message)
            return encode_error(rid, exc), ()
        except Exception as exc:  # a bug: never let it reach the loop
            log_event(self._log, "pf_internal_error", level=logging.ERROR, method=method,
                      exc_info=exc)
            err = RpcError(ErrorCode.INTERNAL_ERROR, f"{method}: internal error")
            return encode_error(rid, err), ()
        finally:
            close_fds(fds)

    def audit_stats(self) -> dict[str, Any]:
        """The auditor's counters (``{"enabled": false}`` when the audit is off)."""
        auditor = self._platform.auditor
        return disabled_snapshot() if auditor is None else auditor.snapshot()

    def _logged(self, method: str, rid: RequestId, outcome: str, start: float,
                message: str | None = None) -> None:
        ms = round((time.monotonic() - start) * 1000, 3)
        if message is None:
            log_event(self._log, "pf_request", method=method, id=rid, outcome=outcome, ms=ms)
        else:
            log_event(self._log, "pf_request", method=method, id=rid, outcome=outcome, ms=ms,
                      error=message)

    def internal_error(self, method: str, exc: BaseException) -> None:
        """The model's ``on_internal_error``: log the bug with its traceback."""
        log_event(self._log, "pf_internal_error", level=logging.ERROR, method=method,
                  exc_info=exc)

    def close(self) -> None:
        with self._lock:
            self._platform.close()
