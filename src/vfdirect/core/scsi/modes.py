"""MODE SENSE parameter data: header, block descriptor, and the mode pages.

Rules of this module:

* no MODE SELECT: every page is fixed, so *changeable* values are all-zero masks and
  *default* values equal *current* ones (SPC-4 6.13.3, 6.13.4); *saved* values do not
  exist (SPC-4 6.13.5: SAVING PARAMETERS NOT SUPPORTED) and the PS bit is zero;
* the pages are the table :data:`MODE_PAGES`, returned in ascending page code order for
  page code 3Fh (SPC-4 6.13.1);
* the MODE DATA LENGTH field describes the full data; truncation to the allocation length
  happens when the data is sent (SPC-4 4.2.5.6).
"""

from __future__ import annotations

from collections.abc import Callable

from vfdirect.core.scsi.cdb import ModeSense10, ModeSenseCommand
from vfdirect.core.scsi.opcodes import ModePage, ModeSubpage, PageControl
from vfdirect.core.scsi.sense import SAVING_PARAMETERS_NOT_SUPPORTED, CheckCondition, FieldPointer

MODE_HEADER6_LEN = 4
MODE_HEADER10_LEN = 8
SHORT_BLOCK_DESCRIPTOR_LEN = 8
LONG_BLOCK_DESCRIPTOR_LEN = 16
CACHING_PAGE_LEN = 20
CONTROL_PAGE_LEN = 12

# DEVICE-SPECIFIC PARAMETER of the header for direct-access devices (SBC-3 mode
# parameters): WP (bit 7) zero, DPOFUA (bit 4) one: DPO and FUA are honoured, which is
# what makes Linux's sd send FUA writes.
_DEVICE_SPECIFIC = 0x10
_LONGLBA = 0x01


def caching_page(changeable: bool) -> bytes:
    """Caching mode page 08h (SBC-3). WCE=1: a completed WRITE may sit in a
    volatile cache until SYNCHRONIZE CACHE or FUA makes it durable, which is the
    BlockDevice contract (core/block.py). RCD=0: reads may come from the cache."""
    page = bytearray(CACHING_PAGE_LEN)
    page[0] = ModePage.CACHING  # PS 0 (not saveable), SPF 0 (page_0 format)
    page[1] = CACHING_PAGE_LEN - 2  # PAGE LENGTH 12h
    if not changeable:
        page[2] = 0x04  # WCE
    return bytes(page)


def control_page(changeable: bool) -> bytes:
    """Control mode page 0Ah (SPC-4 7.5.8): TST 000b (one task set), D_SENSE 0 (fixed
    format sense), QERR 00b, QUEUE ALGORITHM MODIFIER 1 (commands may be reordered: the
    device gives no ordering guarantee between outstanding commands), TAS 0."""
    page = bytearray(CONTROL_PAGE_LEN)
    page[0] = ModePage.CONTROL
    page[1] = CONTROL_PAGE_LEN - 2  # PAGE LENGTH 0Ah
    if not changeable:
        page[3] = 0x10  # QUEUE ALGORITHM MODIFIER = 1 (unrestricted reordering allowed)
    return bytes(page)


#: Mode pages of a logical unit by page code; the argument selects the changeable mask.
MODE_PAGES: dict[int, Callable[[bool], bytes]] = {
    ModePage.CACHING: caching_page,
    ModePage.CONTROL: control_page,
}


def _block_descriptor(long_lba: bool, num_blocks: int, block_size: int) -> bytes:
    if long_lba:
        # Long LBA mode parameter block descriptor (SBC-3): 8-byte NUMBER OF LOGICAL
        # BLOCKS, 4 reserved bytes, 4-byte LOGICAL BLOCK LENGTH.
        return num_blocks.to_bytes(8, "big") + bytes(4) + block_size.to_bytes(4, "big")
    # Short LBA mode parameter block descriptor (SBC-3): a count that does not fit is
    # reported as FFFFFFFFh; byte 4 reserved; 3-byte LOGICAL BLOCK LENGTH.
    count = min(num_blocks, 0xFFFF_FFFF)
    return count.to_bytes(4, "big") + b"\x00" + block_size.to_bytes(3, "big")


def mode_sense_data(cmd: ModeSenseCommand, *, num_blocks: int, block_size: int) -> bytes:
    """Full MODE SENSE(6)/(10) parameter data, or :class:`CheckCondition`."""
    if cmd.pc == PageControl.SAVED:
        raise CheckCondition(
            SAVING_PARAMETERS_NOT_SUPPORTED,
            field_pointer=FieldPointer(2, 7),
            reason="saved mode parameters are not implemented",
        )
    if cmd.page_code == ModePage.ALL_PAGES:
        codes = sorted(MODE_PAGES)
    elif cmd.page_code in MODE_PAGES:
        codes = [cmd.page_code]
    else:
        raise CheckCondition.invalid_cdb_field(
            2, 5, reason=f"mode page {cmd.page_code:#04x} is not supported"
        )
    # No page here has subpages: subpage 00h is the page itself and FFh ("all
    # subpages") is the same set (SPC-4 6.13.1).
    if cmd.subpage_code not in (ModeSubpage.PAGE_0, ModeSubpage.ALL_SUBPAGES):
        raise CheckCondition.invalid_cdb_field(
            3, reason=f"mode subpage {cmd.subpage_code:#04x} is not supported"
        )
    changeable = cmd.pc == PageControl.CHANGEABLE
    pages = b"".join(MODE_PAGES[code](changeable) for code in codes)
    long_lba = isinstance(cmd, ModeSense10) and cmd.llbaa
    descriptor = b"" if cmd.dbd else _block_descriptor(long_lba, num_blocks, block_size)
    if changeable:
        descriptor = bytes(len(descriptor))  # nothing in it can be changed
    if isinstance(cmd, ModeSense10):
        total = MODE_HEADER10_LEN + len(descriptor) + len(pages)
        header = (
            (total - 2).to_bytes(2, "big")  # MODE DATA LENGTH excludes itself
            + bytes((0x00, _DEVICE_SPECIFIC))  # MEDIUM TYPE 00h, device-specific
            + bytes((_LONGLBA if long_lba and descriptor else 0x00, 0x00))
            + len(descriptor).to_bytes(2, "big")  # BLOCK DESCRIPTOR LENGTH
        )
    else:
        total = MODE_HEADER6_LEN + len(descriptor) + len(pages)
        header = bytes((total - 1, 0x00, _DEVICE_SPECIFIC, len(descriptor)))
    return header + descriptor + pages
