"""Hypothesis strategies for SCSI commands, shared by the SCSI core tests."""

from __future__ import annotations

from hypothesis import strategies as st

from vfdirect.core.scsi.cdb import (
    Command,
    Inquiry,
    ModeSense6,
    ModeSense10,
    Read10,
    Read16,
    ReadCapacity10,
    ReadCapacity16,
    ReportLuns,
    RequestSense,
    SynchronizeCache10,
    SynchronizeCache16,
    TestUnitReady,
    Write10,
    Write16,
)
from vfdirect.core.scsi.opcodes import Opcode, PageControl


def u(bits: int) -> st.SearchStrategy[int]:
    return st.integers(0, (1 << bits) - 1)


controls = st.sampled_from([0x00, 0x40, 0x80, 0xC0])  # vendor-specific bits only


def _rw(cls: type, lba_bits: int, len_bits: int) -> st.SearchStrategy[Command]:
    return st.builds(
        cls,
        lba=u(lba_bits),
        transfer_length=u(len_bits),
        dpo=st.booleans(),
        fua=st.booleans(),
        fua_nv=st.booleans(),
        group_number=u(5),
        control=controls,
    )


def _sync(cls: type, lba_bits: int, len_bits: int) -> st.SearchStrategy[Command]:
    return st.builds(
        cls,
        lba=u(lba_bits),
        num_blocks=u(len_bits),
        immed=st.booleans(),
        sync_nv=st.booleans(),
        group_number=u(5),
        control=controls,
    )


def _read_capacity(
    cls: type, lba_bits: int, **extra: st.SearchStrategy[int]
) -> st.SearchStrategy[Command]:
    # With PMI zero the LBA must be zero (SBC-3); with PMI one any LBA goes.
    return st.one_of(
        st.builds(cls, lba=st.just(0), pmi=st.just(False), control=controls, **extra),
        st.builds(cls, lba=u(lba_bits), pmi=st.just(True), control=controls, **extra),
    )


commands: st.SearchStrategy[Command] = st.one_of(
    st.builds(TestUnitReady, control=controls),
    st.builds(RequestSense, desc=st.booleans(), allocation_length=u(8), control=controls),
    st.builds(
        Inquiry,
        evpd=st.just(False),
        page_code=st.just(0),
        allocation_length=u(16),
        control=controls,
    ),
    st.builds(
        Inquiry, evpd=st.just(True), page_code=u(8), allocation_length=u(16), control=controls
    ),
    st.builds(
        ModeSense6,
        dbd=st.booleans(),
        pc=st.sampled_from(PageControl),
        page_code=u(6),
        subpage_code=u(8),
        allocation_length=u(8),
        control=controls,
    ),
    st.builds(
        ModeSense10,
        llbaa=st.booleans(),
        dbd=st.booleans(),
        pc=st.sampled_from(PageControl),
        page_code=u(6),
        subpage_code=u(8),
        allocation_length=u(16),
        control=controls,
    ),
    _read_capacity(ReadCapacity10, 32),
    _read_capacity(ReadCapacity16, 64, allocation_length=u(32)),
    _rw(Read10, 32, 16),
    _rw(Write10, 32, 16),
    _rw(Read16, 64, 32),
    _rw(Write16, 64, 32),
    _sync(SynchronizeCache10, 32, 16),
    _sync(SynchronizeCache16, 64, 32),
    st.builds(ReportLuns, select_report=u(8), allocation_length=u(32), control=controls),
)


def _flip(cmd: Command, index: int, bit: int) -> bytes:
    raw = bytearray(cmd.encode())
    raw[index % len(raw)] ^= 1 << bit
    return bytes(raw)


#: Any CDB-like bytes: random, a known opcode with a random tail, a valid command with
#: one bit flipped, or a valid command.
cdbs = st.one_of(
    st.binary(max_size=40),
    st.builds(
        lambda op, tail: bytes([op]) + tail, st.sampled_from(sorted(Opcode)), st.binary(max_size=24)
    ),
    st.builds(_flip, commands, st.integers(0, 15), st.integers(0, 7)),
    commands.map(lambda c: c.encode()),
)
