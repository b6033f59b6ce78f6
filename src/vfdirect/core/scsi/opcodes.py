"""Wire codes of the SCSI target: operation codes, service actions, status and the codes
that appear inside parameter data.

Rules of this module:

* every number that travels on the wire is a member of an :class:`enum.IntEnum` here (or
  of :class:`vfdirect.core.scsi.sense.SenseKey`); nobody writes them inline elsewhere;
* only codes this target uses, or a transport above it needs, are listed.
"""

from __future__ import annotations

from enum import IntEnum


class Opcode(IntEnum):
    """Operation codes of the commands the target decodes (SPC-4 annex of numeric codes,
    SBC-3 table of commands). Anything else is INVALID COMMAND OPERATION CODE."""

    TEST_UNIT_READY = 0x00
    REQUEST_SENSE = 0x03
    INQUIRY = 0x12
    MODE_SENSE_6 = 0x1A
    READ_CAPACITY_10 = 0x25
    READ_10 = 0x28
    WRITE_10 = 0x2A
    SYNCHRONIZE_CACHE_10 = 0x35
    MODE_SENSE_10 = 0x5A
    READ_16 = 0x88
    WRITE_16 = 0x8A
    SYNCHRONIZE_CACHE_16 = 0x91
    SERVICE_ACTION_IN_16 = 0x9E
    REPORT_LUNS = 0xA0


class ServiceActionIn16(IntEnum):
    """Service actions of SERVICE ACTION IN(16) (SBC-3). Only READ CAPACITY(16) is
    implemented; the others are listed so logs can name them."""

    READ_CAPACITY_16 = 0x10
    READ_LONG_16 = 0x11
    GET_LBA_STATUS = 0x12
    REPORT_REFERRALS = 0x13


class Status(IntEnum):
    """SAM-5 status codes (SAM-5 status table)."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class PeripheralQualifier(IntEnum):
    """PERIPHERAL QUALIFIER of standard INQUIRY data (SPC-4 6.6.2)."""

    #: A device of the reported type is connected to this logical unit.
    CONNECTED = 0b000
    #: The device server could support a device here, but none is connected.
    NOT_CONNECTED = 0b001
    #: The device server cannot support a device on this logical unit (device type 1Fh).
    NOT_SUPPORTED = 0b011


class PeripheralDeviceType(IntEnum):
    """PERIPHERAL DEVICE TYPE of INQUIRY data (SPC-4 6.6.2, table of device types)."""

    DIRECT_ACCESS_BLOCK = 0x00
    SEQUENTIAL_ACCESS = 0x01
    ENCLOSURE_SERVICES = 0x0D
    SIMPLIFIED_DIRECT_ACCESS = 0x0E
    WELL_KNOWN_LOGICAL_UNIT = 0x1E
    UNKNOWN_OR_NONE = 0x1F


class VpdPage(IntEnum):
    """Vital product data pages this target returns (SPC-4 7.8, SBC-3 VPD pages)."""

    SUPPORTED_VPD_PAGES = 0x00
    UNIT_SERIAL_NUMBER = 0x80
    DEVICE_IDENTIFICATION = 0x83
    BLOCK_LIMITS = 0xB0


class ModePage(IntEnum):
    """Mode page codes this target returns (SBC-3 mode pages, SPC-4 7.5)."""

    CACHING = 0x08
    CONTROL = 0x0A
    ALL_PAGES = 0x3F


class ModeSubpage(IntEnum):
    """SUBPAGE CODE values of MODE SENSE (SPC-4 6.13)."""

    #: The page_0 format of the page (the only format this target has).
    PAGE_0 = 0x00
    #: The page and all of its subpages.
    ALL_SUBPAGES = 0xFF


class PageControl(IntEnum):
    """PC field of MODE SENSE (SPC-4 6.13.1)."""

    CURRENT = 0b00
    CHANGEABLE = 0b01
    DEFAULT = 0b10
    SAVED = 0b11


class SelectReport(IntEnum):
    """SELECT REPORT field of REPORT LUNS (SPC-4 6.33 table 285; 10h-12h were added for
    administrative logical units of LU conglomerates in later SPC-4 revisions)."""

    LOGICAL_UNITS = 0x00
    WELL_KNOWN_ONLY = 0x01
    ALL = 0x02
    ADMINISTRATIVE_ONLY = 0x10
    ADMINISTRATIVE_AND_NON_CONGLOMERATE = 0x11
    SUBSIDIARY_OF_ADMINISTRATIVE = 0x12


class CodeSet(IntEnum):
    """CODE SET of a designation descriptor (SPC-4 7.8.6.1)."""

    BINARY = 0x1
    ASCII = 0x2
    UTF8 = 0x3


class Association(IntEnum):
    """ASSOCIATION of a designation descriptor (SPC-4 7.8.6.1)."""

    LOGICAL_UNIT = 0b00
    TARGET_PORT = 0b01
    TARGET_DEVICE = 0b10


class DesignatorType(IntEnum):
    """DESIGNATOR TYPE of a designation descriptor (SPC-4 7.8.6.1)."""

    VENDOR_SPECIFIC = 0x0
    T10_VENDOR_ID = 0x1
    EUI_64 = 0x2
    NAA = 0x3
    RELATIVE_TARGET_PORT = 0x4
    TARGET_PORT_GROUP = 0x5
    LOGICAL_UNIT_GROUP = 0x6
    MD5_LOGICAL_UNIT = 0x7
    SCSI_NAME_STRING = 0x8


class ProtocolIdentifier(IntEnum):
    """PROTOCOL IDENTIFIER (SPC-4 7.6.1). vfdirect's vports are NPIV-style Fibre Channel
    ports, so target port designators carry :attr:`FCP`."""

    FCP = 0x0
    SPI = 0x1
    SSA = 0x2
    SBP = 0x3
    SRP = 0x4
    ISCSI = 0x5
    SAS = 0x6
    ADT = 0x7
    ATA = 0x8
    UAS = 0x9
    SOP = 0xA
    NONE = 0xF


class VersionDescriptor(IntEnum):
    """Version descriptors of standard INQUIRY data (SPC-4 6.6.2, table of version
    descriptor values): the standards this target claims, "no version claimed"."""

    SAM_5 = 0x00A0
    SPC_4 = 0x0460
    SBC_3 = 0x04C0


#: VERSION field of standard INQUIRY data for SPC-4 (SPC-4 6.6.2).
SPC4_VERSION = 0x06
#: RESPONSE DATA FORMAT field: the only value SPC-4 allows (SPC-4 6.6.2).
RESPONSE_DATA_FORMAT = 0x2
