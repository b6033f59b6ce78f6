"""The adapter's VFs: one :class:`~.device.VfDevice` per VF, registered with the service
as the VF data paths, and the reporter that hands their events to the PF model.

Rules of this module:

* VF threads never take the admin lock: the PF side may be waiting for a VF thread
  while it holds that lock (``vf_quiesce`` posts to the thread and waits). Their events
  (front end attached or gone, fault) go through a queue to one reporter thread, which
  applies them with :meth:`AdapterService.vf_event`, in the order each VF reported them;
* an event whose VF was reset or reassigned since it was reported is dropped (the epoch
  check runs under the admin lock), and an event the VF's state does not allow any more
  (a disconnect of a VF the PF already saved) is logged and dropped;
* :meth:`VfManager.close` stops every VF thread (each bounded) and then the reporter;
* while it runs, the interpreter's switch interval is
  :data:`~.fairness.SWITCH_INTERVAL_S` (VF threads take turns, see :mod:`.fairness`).
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
from collections.abc import Callable

from vfdirect.adapter.log import log_event
from vfdirect.adapter.service import AdapterService
from vfdirect.adapter.vf.device import VfDevice
from vfdirect.adapter.vf.fairness import SWITCH_INTERVAL_S
from vfdirect.adapter.vf.worker import POLL_BUDGET_NS
from vfdirect.core.adapter.vf import VfEvent
from vfdirect.core.adapter.vscsi import VscsiSettings
from vfdirect.core.rpc import RpcError

JOIN_TIMEOUT_S = 5.0
_Item = tuple[int, VfEvent, "str | None", int] | None


class VfManager:
    """Every VF of one adapter."""

    def __init__(self, service: AdapterService, *, max_vfs: int, logger: logging.Logger,
                 settings: VscsiSettings | None = None,
                 poll_budget_ns: int = POLL_BUDGET_NS, io_threads: int = 0) -> None:
        self._service = service
        self._log = logger
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="vf-events", daemon=True)
        self._switch_interval: float | None = None  # the interpreter's, while we run
        settings = settings if settings is not None else VscsiSettings()
        self.devices = [VfDevice(i, platform=service.platform, settings=settings,
                                 events=self._post, logger=logger,
                                 poll_budget_ns=poll_budget_ns, io_threads=io_threads)
                        for i in range(max_vfs)]

    def start(self) -> None:
        # the VF threads take turns at the interpreter lock at this quantum (fairness)
        self._switch_interval = sys.getswitchinterval()
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        self._thread.start()
        for device in self.devices:
            self._service.register_datapath(device.index, device)

    def close(self) -> None:
        for device in self.devices:
            self._service.register_datapath(device.index, None)
            device.shutdown()
        self._queue.put(None)
        self._thread.join(JOIN_TIMEOUT_S)
        if self._switch_interval is not None:
            sys.setswitchinterval(self._switch_interval)
            self._switch_interval = None

    # -- events -----------------------------------------------------------------------

    def _post(self, vf: int, event: VfEvent, reason: str | None, epoch: int) -> None:
        self._queue.put((vf, event, reason, epoch))

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            vf, event, reason, epoch = item
            try:
                self._service.vf_event(vf, event, reason,
                                       if_current=_same_epoch(self.devices[vf], epoch))
            except RpcError as exc:
                log_event(self._log, "vf_event_dropped", vf=vf, vf_event=event.value,
                          reason=exc.message)
            except Exception as exc:  # a bug: never lose the reporter
                log_event(self._log, "vf_event_failed", level=logging.ERROR, vf=vf,
                          vf_event=event.value, exc_info=exc)


def _same_epoch(device: VfDevice, epoch: int) -> Callable[[], bool]:
    return lambda: device.epoch == epoch
