"""A VF's mapping table as SCSI targets: what the VF (direct path) and the PF (mediated
path) execute commands against.

Rules of this module:

* each virtual target id of the table becomes one :class:`~vfdirect.core.scsi.Target`
  holding a :class:`~vfdirect.core.scsi.LogicalUnit` per mapped LUN; a target id with no
  entry is an empty target (its LUNs answer LOGICAL UNIT NOT SUPPORTED, REPORT LUNS is
  empty), so the guest's scan of targets 0..255 works unchanged;
* the LU's identity comes from the mapping (claim A4): serial -> VPD 80h, NAA WWN ->
  VPD 83h; block size and capacity from the vdisk;
* the block device behind each LU is given by the caller (``device_for``), so the same
  view serves the VF's threads and the PF's IO path; the caller's devices must pass the
  fabric guard on every IO (claims A10, B6).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from vfdirect.core.adapter.mapping import LuMapping, MappingTable
from vfdirect.core.block import BlockDevice
from vfdirect.core.ids import TargetId
from vfdirect.core.scsi import LogicalUnit, LuIdentity, Target, TargetIdentity

LU_VENDOR = "VFDIRECT"
LU_PRODUCT = "VIRTUAL DISK"
LU_REVISION = "0001"
TARGET_IDENTITY = TargetIdentity(vendor=LU_VENDOR, product="VIRTUAL TARGET", revision=LU_REVISION)


def lu_identity(entry: LuMapping) -> LuIdentity:
    return LuIdentity(
        vendor=LU_VENDOR, product=LU_PRODUCT, revision=LU_REVISION,
        serial=entry.serial, wwn=entry.wwn,
    )


def build_targets(
    table: MappingTable | None,
    device_for: Callable[[LuMapping], BlockDevice],
    *,
    on_internal_error: Callable[[BaseException], None] | None = None,
) -> Mapping[TargetId, Target]:
    """One :class:`Target` per target id of ``table`` (none for ``None``)."""
    targets: dict[TargetId, Target] = {}
    if table is None:
        return targets
    for entry in table.entries:
        target = targets.get(entry.target)
        if target is None:
            target = targets[entry.target] = Target(
                TARGET_IDENTITY, on_internal_error=on_internal_error
            )
        lu = LogicalUnit(device_for(entry), lu_identity(entry),
                         on_internal_error=on_internal_error)
        target.add_lu(entry.lun, lu)
    return targets


def empty_target(on_internal_error: Callable[[BaseException], None] | None = None) -> Target:
    """The target of an id the table does not use."""
    return Target(TARGET_IDENTITY, on_internal_error=on_internal_error)
