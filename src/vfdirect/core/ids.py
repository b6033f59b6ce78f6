"""Identifiers that must never be mixed up, as distinct static types.

They are plain ``int``/``str`` at run time (``typing.NewType``), so they cost nothing on
the data path, while ``mypy --strict`` refuses to pass a virtual LBA where a physical one
is expected.
"""

from typing import NewType

#: A logical block address on a virtual disk, in that disk's blocks.
VirtualLba = NewType("VirtualLba", int)
#: A logical block address on a physical LUN, in that LUN's blocks.
PhysicalLba = NewType("PhysicalLba", int)
#: A LUN number as configured on a storage array or a virtual target (0..16383, SAM-5
#: single-level peripheral / flat addressing).
LunNumber = NewType("LunNumber", int)
#: A virtual target id inside one VF (the virtio-scsi target byte, 0..255).
TargetId = NewType("TargetId", int)
#: Index of a virtual function on one adapter (0-based).
VfIndex = NewType("VfIndex", int)
#: Identifier of a virtual disk in the inventory.
VdiskId = NewType("VdiskId", str)
