"""The guest runtime's pure cores: what a vfdirect VM keeps in its memory and how its
virtio-scsi driver works, with no IO (the shell is :mod:`vfdirect.vm`).

* :mod:`.fwtable`: the firmware table in page 0 (claim A8), codec;
* :mod:`.layout`: the guest memory layout and the guest header (page 1);
* :mod:`.requests`: the outstanding-request table (tag -> state, vring, head, target,
  LUN, CDB, slot), crash-consistent;
* :mod:`.virtscsi`: the virtio-scsi driver (submit, reap, ABORT TASK on timeout, events);
* :mod:`.journal`: the workload journal and the verifier's self-describing blocks;
* :mod:`.scsidata`: INQUIRY, VPD and READ CAPACITY parameter data, initiator side;
* :mod:`.frontend`: the features a VM asks a VF for, GET_CONFIG, queue count.
"""

from vfdirect.core.guest.fwtable import (
    FirmwareTable,
    FirmwareTableError,
    FwDisk,
    FwTableFault,
    decode_fwtable,
    encode_fwtable,
)
from vfdirect.core.guest.journal import EntryState, Journal, JournalError
from vfdirect.core.guest.layout import GuestLayout, GuestLayoutError, LayoutParams
from vfdirect.core.guest.requests import ReqState, RequestTable
from vfdirect.core.guest.virtscsi import (
    AbortOutcome,
    Completion,
    ScsiEvent,
    TagsExhausted,
    VirtioScsiDriver,
)

__all__ = [
    "AbortOutcome",
    "Completion",
    "EntryState",
    "FirmwareTable",
    "FirmwareTableError",
    "FwDisk",
    "FwTableFault",
    "GuestLayout",
    "GuestLayoutError",
    "Journal",
    "JournalError",
    "LayoutParams",
    "ReqState",
    "RequestTable",
    "ScsiEvent",
    "TagsExhausted",
    "VirtioScsiDriver",
    "decode_fwtable",
    "encode_fwtable",
]
