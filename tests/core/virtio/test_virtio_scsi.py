"""virtio-scsi wire formats (VIRTIO 1.x 5.6): golden vectors, round trips, and the
decoder invariant (a value or VirtioScsiError, nothing else)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfdirect.core.virtio.scsi import (
    CONFIG_SIZE,
    EVENTS_MISSED,
    ControlType,
    CtrlAnRequest,
    CtrlAnResponse,
    CtrlTmfRequest,
    CtrlTmfResponse,
    EventType,
    LunAddressing,
    LunFieldError,
    ScsiFeature,
    ScsiRequestHeader,
    ScsiResponseHeader,
    TaskAttribute,
    TmfSubtype,
    TransportResetReason,
    VirtioScsiConfig,
    VirtioScsiError,
    VirtioScsiEvent,
    VirtioScsiResponse,
    decode_control_type,
    decode_lun,
    encode_lun,
)

# -- golden vectors ---------------------------------------------------------------------------

#: READ(10) of 8 blocks at LBA 0x12345678, target 1, LUN 3, tag 0x1122334455667788.
READ10_REQUEST = bytes.fromhex(
    "01 01 40 03 00 00 00 00"  # lun[8]: 1, target 1, flat LUN 3 (0x40 | 3>>8, 3 & 0xff)
    "88 77 66 55 44 33 22 11"  # id/tag, le64
    "00"  # task_attr SIMPLE
    "00"  # prio
    "00"  # crn
    "28 00 12 34 56 78 00 00 08 00"  # CDB: READ(10), LBA 0x12345678, 8 blocks
    + "00" * 22  # CDB padded to cdb_size 32
)

#: CHECK CONDITION with 18 bytes of fixed sense (ILLEGAL REQUEST, INVALID COMMAND
#: OPERATION CODE 20h/00h), residual 512.
SENSE = bytes.fromhex("70 00 05 00 00 00 00 0a 00 00 00 00 20 00 00 00 00 00")
CHECK_CONDITION_RESPONSE = bytes.fromhex(
    "12 00 00 00"  # sense_len 18, le32
    "00 02 00 00"  # resid 512, le32
    "00 00"  # status_qualifier, le16
    "02"  # status CHECK CONDITION
    "00"  # response VIRTIO_SCSI_S_OK (the command was delivered)
) + SENSE + bytes(96 - len(SENSE))  # sense[sense_size], sense_size 96


def test_golden_request_header() -> None:
    header = ScsiRequestHeader.build(1, 3, bytes.fromhex("28 00 12 34 56 78 00 00 08 00"),
                                     tag=0x1122334455667788)
    assert header.encode() == READ10_REQUEST
    assert len(READ10_REQUEST) == ScsiRequestHeader.size() == 51
    decoded = ScsiRequestHeader.decode(READ10_REQUEST + b"data-out follows")
    assert decoded == header
    assert decoded.address() == (1, 3)
    assert decoded.task_attr == TaskAttribute.SIMPLE


def test_golden_response_header() -> None:
    response = ScsiResponseHeader(response=VirtioScsiResponse.OK, status=0x02, sense=SENSE,
                                  resid=512)
    assert response.encode() == CHECK_CONDITION_RESPONSE
    assert len(CHECK_CONDITION_RESPONSE) == ScsiResponseHeader.size() == 108
    assert ScsiResponseHeader.decode(CHECK_CONDITION_RESPONSE) == response


def test_golden_control_and_event() -> None:
    tmf = CtrlTmfRequest(TmfSubtype.ABORT_TASK, encode_lun(0, 5), tag=0x42)
    assert tmf.encode() == bytes.fromhex(
        "00 00 00 00"  # type VIRTIO_SCSI_T_TMF
        "00 00 00 00"  # subtype ABORT_TASK
        "01 00 40 05 00 00 00 00"  # lun: target 0, LUN 5
        "42 00 00 00 00 00 00 00")  # tag of the task to abort
    assert CtrlTmfResponse(VirtioScsiResponse.FUNCTION_SUCCEEDED).encode() == b"\x0a"
    event = VirtioScsiEvent.transport_reset(0, 5, TransportResetReason.RESCAN)
    assert event.encode() == bytes.fromhex(
        "01 00 00 00"  # VIRTIO_SCSI_T_TRANSPORT_RESET
        "01 00 40 05 00 00 00 00"  # lun
        "01 00 00 00")  # reason RESCAN
    an = CtrlAnRequest(ControlType.AN_SUBSCRIBE, encode_lun(2, 1), 0x10)
    assert an.encode() == bytes.fromhex("02000000 01024001 00000000 10000000")
    assert CtrlAnResponse(0x10, 0).encode() == bytes.fromhex("10000000 00")


def test_golden_config() -> None:
    config = VirtioScsiConfig(num_queues=2, seg_max=126, max_sectors=0xFFFF, cmd_per_lun=128,
                              max_target=255, max_lun=16383)
    assert config.encode() == bytes.fromhex(
        "02000000 7e000000 ffff0000 80000000"  # num_queues seg_max max_sectors cmd_per_lun
        "10000000 60000000 20000000"  # event_info_size 16, sense_size 96, cdb_size 32
        "0000 ff00 ff3f0000")  # max_channel 0, max_target 255, max_lun 16383
    assert CONFIG_SIZE == 36
    assert VirtioScsiConfig.decode(config.encode()) == config


def test_wire_codes() -> None:
    assert [int(v) for v in (VirtioScsiResponse.OK, VirtioScsiResponse.OVERRUN,
                             VirtioScsiResponse.ABORTED, VirtioScsiResponse.BAD_TARGET,
                             VirtioScsiResponse.RESET, VirtioScsiResponse.BUSY,
                             VirtioScsiResponse.TRANSPORT_FAILURE,
                             VirtioScsiResponse.TARGET_FAILURE,
                             VirtioScsiResponse.NEXUS_FAILURE, VirtioScsiResponse.FAILURE,
                             VirtioScsiResponse.FUNCTION_SUCCEEDED,
                             VirtioScsiResponse.FUNCTION_REJECTED,
                             VirtioScsiResponse.INCORRECT_LUN)] == list(range(13))
    assert [int(t) for t in TmfSubtype] == list(range(8))
    assert [int(f) for f in ScsiFeature] == [0, 1, 2, 3]
    assert EVENTS_MISSED == 0x80000000
    assert int(EventType.PARAM_CHANGE) == 3


# -- the LUN field ----------------------------------------------------------------------------


@pytest.mark.parametrize(("target", "lun", "mode", "raw"), [
    (0, 0, LunAddressing.FLAT, "0100400000000000"),
    (3, 255, LunAddressing.FLAT, "010340ff00000000"),
    (3, 256, LunAddressing.FLAT, "0103410000000000"),
    (255, 16383, LunAddressing.FLAT, "01ff7fff00000000"),
    (7, 5, LunAddressing.PERIPHERAL, "0107000500000000"),
    (7, 300, LunAddressing.PERIPHERAL, "0107412c00000000"),
])
def test_lun_encoding(target: int, lun: int, mode: LunAddressing, raw: str) -> None:
    assert encode_lun(target, lun, mode) == bytes.fromhex(raw)
    assert decode_lun(bytes.fromhex(raw)) == (target, lun)


@pytest.mark.parametrize("raw", [
    "0001400000000000",  # byte 0 not 1
    "0101800000000000",  # extended addressing method
    "0101c10100000000",  # well-known LUN form
    "0101010000000000",  # peripheral addressing with a bus number
    "0101400040000000",  # second level present
    "01014000",  # short
])
def test_lun_decoding_rejects(raw: str) -> None:
    with pytest.raises(LunFieldError):
        decode_lun(bytes.fromhex(raw))


@pytest.mark.parametrize(("target", "lun"), [(256, 0), (-1, 0), (0, 16384), (0, -1)])
def test_lun_encoding_rejects(target: int, lun: int) -> None:
    with pytest.raises(LunFieldError):
        encode_lun(target, lun)


@given(st.integers(0, 255), st.integers(0, 16383), st.sampled_from(LunAddressing))
def test_lun_round_trip(target: int, lun: int, mode: LunAddressing) -> None:
    assert decode_lun(encode_lun(target, lun, mode)) == (target, lun)


# -- round trips ------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
lun_field = st.binary(min_size=8, max_size=8)


@settings(max_examples=150, deadline=None)
@given(lun_field, u64, u8, u8, u8, st.integers(1, 64), st.booleans(), u32, u32, st.data())
def test_request_round_trip(lun: bytes, tag: int, attr: int, prio: int, crn: int,
                            cdb_size: int, pi: bool, pi_out: int, pi_in: int,
                            data: st.DataObject) -> None:
    cdb = data.draw(st.binary(min_size=cdb_size, max_size=cdb_size))
    header = ScsiRequestHeader(lun, tag, attr, prio, crn, cdb, pi_out if pi else None,
                               pi_in if pi else None)
    raw = header.encode()
    assert len(raw) == ScsiRequestHeader.size(cdb_size, t10_pi=pi)
    assert ScsiRequestHeader.decode(raw, cdb_size, t10_pi=pi) == header


@settings(max_examples=150, deadline=None)
@given(u8, u8, st.binary(max_size=96), u32, u16, st.integers(0, 200))
def test_response_round_trip(response: int, status: int, sense: bytes, resid: int,
                             qualifier: int, extra: int) -> None:
    sense_size = max(len(sense), extra)
    header = ScsiResponseHeader(response, status, sense, resid, qualifier)
    raw = header.encode(sense_size)
    assert len(raw) == ScsiResponseHeader.size(sense_size)
    assert ScsiResponseHeader.decode(raw, sense_size) == header


@settings(max_examples=100, deadline=None)
@given(u32, lun_field, u64, u8, u32, u32, u32)
def test_control_and_event_round_trips(subtype: int, lun: bytes, tag: int, response: int,
                                       mask: int, event: int, reason: int) -> None:
    tmf = CtrlTmfRequest(subtype, lun, tag)
    assert CtrlTmfRequest.decode(tmf.encode()) == tmf
    assert decode_control_type(tmf.encode()) == ControlType.TMF
    assert CtrlTmfResponse.decode(CtrlTmfResponse(response).encode()) == CtrlTmfResponse(
        response)
    for kind in (ControlType.AN_QUERY, ControlType.AN_SUBSCRIBE):
        an = CtrlAnRequest(kind, lun, mask)
        assert CtrlAnRequest.decode(an.encode()) == an
    assert CtrlAnResponse.decode(CtrlAnResponse(mask, response).encode()) == CtrlAnResponse(
        mask, response)
    ev = VirtioScsiEvent(event, lun, reason)
    assert VirtioScsiEvent.decode(ev.encode()) == ev
    assert ev.events_missed == bool(event & EVENTS_MISSED)


def test_param_change_reason_packs_asc_ascq() -> None:
    ev = VirtioScsiEvent.param_change(0, 1, 0x2A, 0x09)  # CAPACITY DATA HAS CHANGED
    assert ev.reason == 0x092A and ev.kind == EventType.PARAM_CHANGE


@settings(max_examples=100, deadline=None)
@given(st.tuples(*[u32] * 7), u16, u16, u32)
def test_config_round_trip(first: tuple[int, ...], channel: int, target: int,
                           lun: int) -> None:
    config = VirtioScsiConfig(*first, channel, target, lun)
    assert VirtioScsiConfig.decode(config.encode()) == config


# -- decoders never raise anything but VirtioScsiError ---------------------------------------

DECODERS: list[Callable[[bytes], object]] = [
    ScsiRequestHeader.decode,
    lambda b: ScsiRequestHeader.decode(b, 16, t10_pi=True),
    ScsiResponseHeader.decode,
    lambda b: ScsiResponseHeader.decode(b, 8),
    CtrlTmfRequest.decode,
    CtrlTmfResponse.decode,
    CtrlAnRequest.decode,
    CtrlAnResponse.decode,
    VirtioScsiEvent.decode,
    VirtioScsiConfig.decode,
    decode_lun,
    decode_control_type,
    lambda b: ScsiRequestHeader.decode(b).address(),
]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=140), st.integers(0, len(DECODERS) - 1))
def test_decoders_raise_only_their_error(data: bytes, which: int) -> None:
    with contextlib.suppress(VirtioScsiError):
        DECODERS[which](data)


def test_short_inputs_rejected() -> None:
    for decoder in DECODERS:
        with pytest.raises(VirtioScsiError):
            decoder(b"")
    with pytest.raises(VirtioScsiError):
        ScsiResponseHeader.decode(bytes.fromhex("61000000") + bytes(104))  # sense_len 97
    with pytest.raises(VirtioScsiError):
        CtrlTmfRequest.decode(bytes.fromhex("01000000") + bytes(20))  # not a TMF
    with pytest.raises(VirtioScsiError):
        ScsiRequestHeader.decode(READ10_REQUEST, 0)


def test_encoders_check_ranges() -> None:
    with pytest.raises(VirtioScsiError):
        ScsiResponseHeader(sense=bytes(97)).encode()
    with pytest.raises(VirtioScsiError):
        ScsiRequestHeader.build(0, 0, bytes(33))
    with pytest.raises(VirtioScsiError):
        VirtioScsiConfig(num_queues=-1).encode()
    with pytest.raises(VirtioScsiError):
        ScsiResponseHeader(status=256).encode()
