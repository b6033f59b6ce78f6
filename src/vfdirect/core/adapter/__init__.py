"""The emulated SR-IOV storage adapter, PF side, as a pure model (no IO, no clock).

One module per concern:

==============  ==========================================================================
``params``      parameter kinds and specs; the validator that turns wire values into
                typed values or ``RpcError(INVALID_PARAMS)``
``methods``     THE table of PF admin methods (names, params, fds, results, claims) and
                the reference page generated from it
``vf``          VF states, the transition table, the immutable VF record
``mapping``     a VF's mapping table (claim A4): (target, LUN) -> vdisk, layout, identity
``vport``       NPIV virtual ports: names, login, binding (claims A5, A7, X3)
``platform``    the interfaces to the shells: fabric, arrays, buffers, VF data path hooks
``scsi_view``   a mapping table as SCSI targets (the VF's and the PF's command executor)
``vscsi``       a VF as a virtio-scsi device: command requests, TMF/AN, hot-plug events
``vf_state``    the versioned queue-state record a VF hands over at ``vf_state_save``
``vf_stats``    per-VF data path counters and latency histogram
``model``       ``AdapterModel``: the admin methods applied to an ``AdapterState``
==============  ==========================================================================
"""

from vfdirect.core.adapter.mapping import LuMapping, MappingError, MappingTable
from vfdirect.core.adapter.methods import METHOD_BY_NAME, METHODS, MethodSpec, validate
from vfdirect.core.adapter.model import AdapterIdentity, AdapterModel, AdapterState, Reply
from vfdirect.core.adapter.platform import (
    AdapterPlatform,
    ArrayInfo,
    DrainResult,
    FabricPort,
    SavedQueueState,
    VfDataPath,
)
from vfdirect.core.adapter.scsi_view import build_targets
from vfdirect.core.adapter.vf import TRANSITIONS, VfEvent, VfRecord, VfState, VmRef, transition
from vfdirect.core.adapter.vport import VportLogin, VportRecord

__all__ = [
    "METHODS",
    "METHOD_BY_NAME",
    "TRANSITIONS",
    "AdapterIdentity",
    "AdapterModel",
    "AdapterPlatform",
    "AdapterState",
    "ArrayInfo",
    "DrainResult",
    "FabricPort",
    "LuMapping",
    "MappingError",
    "MappingTable",
    "MethodSpec",
    "Reply",
    "SavedQueueState",
    "VfDataPath",
    "VfEvent",
    "VfRecord",
    "VfState",
    "VmRef",
    "VportLogin",
    "VportRecord",
    "build_targets",
    "transition",
    "validate",
]
