"""The adapter's VFs: each a virtio-scsi device served over vhost-user (claim A10).

==============  ==========================================================================
``manager``     every VF of the adapter, registered as the PF's data paths; the event
                reporter
``device``      one VF as the PF sees it (the ``VfDataPath`` hooks), its statistics and
                its thread's lifetime
``worker``      the VF thread: socket, vhost-user session, rings, the direct data path,
                adaptive doorbells, migration hooks
``fds``         eventfd, socket and memory-mapping helpers
==============  ==========================================================================

The device logic itself is pure and lives in :mod:`vfdirect.core.adapter.vscsi`
(requests, TMFs, events), :mod:`vfdirect.core.adapter.vf_state` (the saved queue-state
record) and :mod:`vfdirect.core.adapter.vf_stats`.
"""

from vfdirect.adapter.vf.device import VfDevice
from vfdirect.adapter.vf.manager import VfManager

__all__ = ["VfDevice", "VfManager"]
