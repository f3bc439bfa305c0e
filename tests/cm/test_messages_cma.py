"""RDMA CM header and service IDs."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.cm.cma_hdr import (
    CMA_HDR_SIZE,
    CmaHdr,
    RdmaPortSpace,
    rdma_ps_service_id,
    service_id_port_space,
)
from softrdma.mad.header import (
    MadError,
    MalformedMad,
)
from tests.cm._messages_helpers import (
    ACTIVE,
    PASSIVE,
)

# --------------------------------------------------------------------------
# RDMA CM header and service IDs

ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6)
ports = st.integers(0, 0xFFFF)


@settings(max_examples=50, deadline=None)
@given(
    addrs=st.tuples(ipv4, ipv4) | st.tuples(ipv6, ipv6),
    port=ports,
    tail=st.binary(max_size=56),
)
def test_cma_hdr_round_trips(
    addrs: tuple[IPv4Address, IPv4Address] | tuple[IPv6Address, IPv6Address], port: int, tail: bytes
) -> None:
    hdr = CmaHdr(addrs[0], addrs[1], port)
    raw = hdr.encode()
    assert len(raw) == CMA_HDR_SIZE
    assert raw[0] == 0 and raw[1] == hdr.ip_version << 4
    assert int.from_bytes(raw[2:4]) == port
    if hdr.ip_version == 4:
        assert raw[4:16] == raw[20:32] == bytes(12)
    assert CmaHdr.decode(raw + tail) == hdr


@given(a=ipv4, b=ipv6, port=ports)
@settings(max_examples=20, deadline=None)
def test_cma_hdr_mixed_families_raise(a: IPv4Address, b: IPv6Address, port: int) -> None:
    with pytest.raises(MadError, match="mixes"):
        CmaHdr(a, b, port).encode()
    with pytest.raises(MadError, match="mixes"):
        CmaHdr(b, a, port).encode()


def test_cma_hdr_bad_fields() -> None:
    good = CmaHdr(ACTIVE, PASSIVE, 0xD400).encode()
    assert good == bytes.fromhex("0040d400" + "00" * 12 + "0a4d0002" + "00" * 12 + "0a4d0001")
    with pytest.raises(MalformedMad, match="version 0x01"):
        CmaHdr.decode(b"\x01" + good[1:])
    for ip_ver in (0x00, 0x50, 0x70, 0xF0):
        with pytest.raises(MalformedMad, match="IP version"):
            CmaHdr.decode(good[:1] + bytes([ip_ver]) + good[2:])
    with pytest.raises(MalformedMad, match="35 bytes"):
        CmaHdr.decode(good[:35])
    with pytest.raises(MadError, match="port"):
        CmaHdr(ACTIVE, PASSIVE, 0x10000).encode()
    with pytest.raises(MadError, match="version"):
        CmaHdr(ACTIVE, PASSIVE, 1, version=256).encode()
    # Like the kernel, the low nibble of ip_version is ignored.
    assert CmaHdr.decode(good[:1] + b"\x45" + good[2:]) == CmaHdr(ACTIVE, PASSIVE, 0xD400)


def test_service_id_known_values() -> None:
    assert rdma_ps_service_id(RdmaPortSpace.TCP, 7174) == 0x0000000001061C06
    assert rdma_ps_service_id(RdmaPortSpace.TCP, 3260) == 0x0000000001060CBC
    assert rdma_ps_service_id(RdmaPortSpace.UDP, 0) == 0x0000000001110000
    assert rdma_ps_service_id(RdmaPortSpace.IB, 0xFFFF) == 0x00000000013FFFFF
    assert rdma_ps_service_id(RdmaPortSpace.IPOIB, 1) == 0x0000000000020001
    assert [p.value for p in RdmaPortSpace] == [0x0002, 0x0106, 0x0111, 0x013F]
    for bad in (0, 0x0107, 1 << 16):
        with pytest.raises(MadError, match="port space"):
            rdma_ps_service_id(bad, 1)
    for port in (-1, 0x10000):
        with pytest.raises(MadError, match="port"):
            rdma_ps_service_id(RdmaPortSpace.TCP, port)
    for sid in (
        0,
        0x0000000001070000,
        0x0000000101061C06,  # bits above the port space
        0x8000000001061C06,
        1 << 64,
        -1,
    ):
        with pytest.raises(MalformedMad, match="service ID"):
            service_id_port_space(sid)


@given(ps=st.sampled_from(RdmaPortSpace), port=ports)
@settings(max_examples=50, deadline=None)
def test_service_id_round_trips(ps: RdmaPortSpace, port: int) -> None:
    sid = rdma_ps_service_id(ps, port)
    assert sid >> 16 == ps.value
    got = service_id_port_space(sid)
    assert got == (ps, port)
    assert isinstance(got[0], RdmaPortSpace)
