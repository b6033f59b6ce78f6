"""Hypothesis strategies for vhost-user messages: a valid message of any request type on
any channel, with the right number of (distinct, fake) fds."""

from __future__ import annotations

from itertools import count

from hypothesis import strategies as st

from vfdirect.core.vhost.messages import (
    U64,
    BackendRequest,
    Channel,
    ConfigSpace,
    DeviceStateTransfer,
    Empty,
    FrontendRequest,
    HeaderFlag,
    InflightDescription,
    IotlbMessage,
    LogDescription,
    MemoryRegionDesc,
    MemoryTable,
    RawPayload,
    SharedObject,
    SingleMemoryRegion,
    VhostUserMessage,
    VringAddr,
    VringArea,
    VringFile,
    VringState,
    payload_rule,
)

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, (1 << 64) - 1)
region = st.builds(MemoryRegionDesc, u64, u64, u64, u64)

PAYLOADS: dict[type, st.SearchStrategy] = {  # type: ignore[type-arg]
    Empty: st.just(Empty()),
    U64: st.builds(U64, u64),
    VringState: st.builds(VringState, u32, u32),
    VringAddr: st.builds(VringAddr, u32, u32, u64, u64, u64, u64),
    VringFile: st.builds(VringFile, u8, st.booleans()),
    MemoryTable: st.builds(MemoryTable, st.lists(region, max_size=8).map(tuple)),
    SingleMemoryRegion: st.builds(SingleMemoryRegion, region),
    LogDescription: st.builds(LogDescription, u64, u64),
    ConfigSpace: st.builds(ConfigSpace, u32, st.binary(max_size=256), u32),
    IotlbMessage: st.builds(IotlbMessage, u64, u64, u64, u8, u8),
    VringArea: st.builds(VringArea, u8, u64, u64, st.booleans()),
    InflightDescription: st.builds(InflightDescription, u64, u64, u16, u16),
    DeviceStateTransfer: st.builds(DeviceStateTransfer, u32, u32),
    SharedObject: st.builds(SharedObject, st.binary(min_size=16, max_size=16)),
    RawPayload: st.builds(RawPayload, st.binary(max_size=64)),
}

_fd_numbers = count(1000)


def codes(channel: Channel) -> list[int]:
    enum = BackendRequest if channel.is_backend_channel else FrontendRequest
    return [int(c) for c in enum]


@st.composite
def messages(draw: st.DrawFn, channel: Channel, request: int | None = None) -> VhostUserMessage:
    """A valid message for ``channel`` (the first payload type of its rule)."""
    if request is None:
        request = draw(st.sampled_from(codes(channel)))
    rule = payload_rule(channel, request)
    kind = rule.decoders[0].__self__  # type: ignore[attr-defined]
    payload = draw(PAYLOADS[kind])
    allowed = rule.fds(payload)
    nfds = draw(st.sampled_from(list(allowed)))
    fds = tuple(next(_fd_numbers) for _ in range(nfds))
    if channel.is_reply:
        flags = int(HeaderFlag.VERSION | HeaderFlag.REPLY)
    else:
        flags = int(HeaderFlag.VERSION) | draw(st.sampled_from([0, int(HeaderFlag.NEED_REPLY)]))
    enum = BackendRequest if channel.is_backend_channel else FrontendRequest
    return VhostUserMessage(enum(request), payload, flags, fds)
