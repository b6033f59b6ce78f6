"""The SCSI target core: CDBs in, completions out, IO through a BlockDevice.

One module per concern:

==============  ==========================================================================
``opcodes``     wire codes (operation codes, status, VPD/mode page codes, ...)
``sense``       the sense catalogue, fixed-format encoder, decoder, ``CheckCondition``
``luns``        SAM-5 8-byte LUNs and REPORT LUNS parameter data
``cdb``         CDB decoding into typed records and encoding back
``identity``    what an LU / target says about itself (vendor, serial, WWN, limits)
``inquiry``     standard INQUIRY data and VPD pages
``modes``       MODE SENSE data and mode pages
``task``        one command's buffers, ``ScsiResult``, the one exception→completion place
``lu``          ``LogicalUnit``: an SBC-3 direct-access device over a BlockDevice
``target``      ``Target``: LUs by LUN, REPORT LUNS, LUNs without an LU
==============  ==========================================================================

Nothing here does IO of its own, starts threads or reads the clock
(see :mod:`vfdirect.core`).
"""

from vfdirect.core.scsi.cdb import Command, decode_cdb, encode_cdb
from vfdirect.core.scsi.identity import BlockLimits, IdentityError, LuIdentity, TargetIdentity
from vfdirect.core.scsi.lu import LogicalUnit
from vfdirect.core.scsi.luns import (
    MAX_LUN,
    LunError,
    check_lun,
    decode_lun,
    encode_lun,
    parse_report_luns,
    report_luns_data,
)
from vfdirect.core.scsi.opcodes import Opcode, Status
from vfdirect.core.scsi.sense import (
    CheckCondition,
    FieldPointer,
    Sense,
    SenseData,
    SenseFormatError,
    SenseKey,
    decode_sense,
    encode_fixed_sense,
)
from vfdirect.core.scsi.target import Target
from vfdirect.core.scsi.task import ScsiResult

__all__ = [
    "MAX_LUN",
    "BlockLimits",
    "CheckCondition",
    "Command",
    "FieldPointer",
    "IdentityError",
    "LogicalUnit",
    "LuIdentity",
    "LunError",
    "Opcode",
    "ScsiResult",
    "Sense",
    "SenseData",
    "SenseFormatError",
    "SenseKey",
    "Status",
    "Target",
    "TargetIdentity",
    "check_lun",
    "decode_cdb",
    "decode_lun",
    "decode_sense",
    "encode_cdb",
    "encode_fixed_sense",
    "encode_lun",
    "parse_report_luns",
    "report_luns_data",
]
