"""IB CM message codecs: properties over generated messages, field
positions and malformed input.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.cm.messages import (
    CmApr,
    CmAttrId,
    CmLap,
    CmMra,
    CmMsgResponse,
    CmRej,
    CmRejReason,
    CmRep,
    CmReq,
    CmRtu,
    CmSidrRep,
    CmSidrReq,
    cm_message_class,
    decode_cm_mad,
    encode_cm_mad,
)
from softrdma.mad.header import (
    MAD_DATA_SIZE,
    MAD_SIZE,
    MadError,
    MadHdr,
    MalformedMad,
)
from tests.cm._messages_helpers import (
    BOOL,
    CLASSES,
    FAST,
    GID,
    PRIVATE_DATA_SIZES,
    RECORDS,
    SPEC,
    messages,
)

# --------------------------------------------------------------------------
# Properties over generated messages


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_spec_covers_every_field(cls: type[Any]) -> None:
    names = {f.name for f in dataclasses.fields(cls)} - {"reserved"}
    assert names == set(SPEC[cls])
    assert PRIVATE_DATA_SIZES[cls] == cls.PRIVATE_DATA_SIZE
    assert cm_message_class(cls.ATTR_ID) is cls


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@FAST
@given(data=st.data())
def test_generated_messages_round_trip(cls: type[Any], data: st.DataObject) -> None:
    msg = data.draw(messages(cls))
    raw = msg.encode()
    assert len(raw) == MAD_DATA_SIZE
    assert cls.decode(raw) == msg
    hdr = MadHdr(tid=data.draw(st.integers(0, (1 << 64) - 1)))
    mad = encode_cm_mad(hdr, msg)
    assert len(mad) == MAD_SIZE
    assert decode_cm_mad(mad) == (dataclasses.replace(hdr, attr_id=cls.ATTR_ID), msg)


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@FAST
@given(raw=st.binary(min_size=MAD_DATA_SIZE, max_size=MAD_DATA_SIZE))
def test_any_bytes_decode_and_reencode_exactly(cls: type[Any], raw: bytes) -> None:
    """Every bit is either a field or kept in ``reserved``."""
    msg = cls.decode(raw)
    assert msg.encode() == raw
    assert cls.decode(msg.encode()) == msg
    assert cls.decode(bytearray(raw) + b"extra") == msg  # longer input: first 232 bytes


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_defaults_encode_to_zeros(cls: type[Any]) -> None:
    assert cls().encode() == bytes(MAD_DATA_SIZE)
    assert cls.decode(bytes(MAD_DATA_SIZE)) == cls()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_fields_out_of_range_raise(cls: type[Any]) -> None:
    for name, kind in SPEC[cls].items():
        if isinstance(kind, int):
            bad: list[object] = [1 << kind, -1, "1", None]
        elif kind == BOOL:
            bad = [2, -1]
        elif kind == GID:
            bad = [bytes(15), bytes(17), b"", "x" * 16]
        else:
            assert isinstance(kind, tuple)
            bad = [bytes(kind[1] + 1), 5]
        for value in bad:
            with pytest.raises(MadError, match=name):
                cls(**{name: value}).encode()
    # A bit outside the reserved positions (the MSB of the first field).
    with pytest.raises(MadError, match="reserved"):
        cls(reserved=1 << (8 * MAD_DATA_SIZE - 1)).encode()
    with pytest.raises(MadError, match="reserved"):
        cls(reserved=-1).encode()


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_short_private_data_is_zero_padded(cls: type[Any]) -> None:
    size = cls.PRIVATE_DATA_SIZE
    raw = cls(private_data=b"\xab\xcd").encode()
    assert raw[-size:] == b"\xab\xcd" + bytes(size - 2)
    assert cls.decode(raw).private_data == b"\xab\xcd" + bytes(size - 2)
    assert cls(private_data=bytes(size)).encode() == bytes(MAD_DATA_SIZE)


def test_reserved_bits_are_kept() -> None:
    """REQ byte 4 is reserved (the ECE vendor ID is bytes 5..7); a peer's
    nonzero bits there survive a round trip and are zero when we send."""
    raw = bytearray(CmReq(local_comm_id=1, vendor_id=0x123456).encode())
    assert raw[4:8] == b"\x00\x12\x34\x56"
    raw[4] = 0xA5
    msg = CmReq.decode(raw)
    assert msg.vendor_id == 0x123456
    assert msg.reserved == 0xA5 << (8 * (MAD_DATA_SIZE - 5))
    assert msg.encode() == raw
    assert dataclasses.replace(msg, reserved=0).encode()[4] == 0


# Positions (byte, bit below the MSB, width; IBTA vol. 1 Tables 106-120) of
# the fields the Wireshark cross-check cannot see: its dissector skips MRA,
# LAP, APR and SIDR and misplaces the REQ flow label and packet rate.
POSITIONS: list[tuple[type[Any], str, int, int, int]] = [
    (CmReq, "vendor_id", 5, 0, 24),
    (CmReq, "primary_flow_label", 88, 0, 20),
    (CmReq, "primary_packet_rate", 91, 2, 6),
    (CmReq, "alternate_flow_label", 132, 0, 20),
    (CmReq, "alternate_packet_rate", 135, 2, 6),
    (CmReq, "sap_supported", 139, 5, 1),
    (CmMra, "local_comm_id", 0, 0, 32),
    (CmMra, "remote_comm_id", 4, 0, 32),
    (CmMra, "message_mraed", 8, 0, 2),
    (CmMra, "service_timeout", 9, 0, 5),
    (CmSidrReq, "request_id", 0, 0, 32),
    (CmSidrReq, "partition_key", 4, 0, 16),
    (CmSidrReq, "service_id", 8, 0, 64),
    (CmSidrRep, "request_id", 0, 0, 32),
    (CmSidrRep, "status", 4, 0, 8),
    (CmSidrRep, "additional_info_length", 5, 0, 8),
    (CmSidrRep, "qpn", 8, 0, 24),
    (CmSidrRep, "service_id", 12, 0, 64),
    (CmSidrRep, "qkey", 20, 0, 32),
    (CmLap, "local_comm_id", 0, 0, 32),
    (CmLap, "remote_comm_id", 4, 0, 32),
    (CmLap, "remote_qpn", 12, 0, 24),
    (CmLap, "remote_cm_response_timeout", 15, 0, 5),
    (CmLap, "alternate_local_lid", 20, 0, 16),
    (CmLap, "alternate_remote_lid", 22, 0, 16),
    (CmLap, "alternate_flow_label", 56, 0, 20),
    (CmLap, "alternate_traffic_class", 59, 0, 8),
    (CmLap, "alternate_hop_limit", 60, 0, 8),
    (CmLap, "alternate_packet_rate", 61, 2, 6),
    (CmLap, "alternate_sl", 62, 0, 4),
    (CmLap, "alternate_subnet_local", 62, 4, 1),
    (CmLap, "alternate_local_ack_timeout", 63, 0, 5),
    (CmApr, "local_comm_id", 0, 0, 32),
    (CmApr, "remote_comm_id", 4, 0, 32),
    (CmApr, "additional_info_length", 8, 0, 8),
    (CmApr, "ap_status", 9, 0, 8),
]
# Byte fields: (class, name, offset, size).
BYTE_POSITIONS: list[tuple[type[Any], str, int, int]] = [
    (CmLap, "alternate_local_gid", 24, 16),
    (CmLap, "alternate_remote_gid", 40, 16),
    (CmApr, "additional_info", 12, 72),
    (CmSidrRep, "additional_info", 24, 72),
    (CmRej, "ari", 12, 72),
    (CmReq, "primary_local_gid", 56, 16),
    (CmReq, "primary_remote_gid", 72, 16),
    *(
        (cls, "private_data", MAD_DATA_SIZE - size, size)
        for cls, size in PRIVATE_DATA_SIZES.items()
    ),
]


@pytest.mark.parametrize(
    ("cls", "name", "byte", "bit", "width"), POSITIONS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_field_position(cls: type[Any], name: str, byte: int, bit: int, width: int) -> None:
    value: object = True if width == 1 else (1 << width) - 1
    mask = ((1 << width) - 1) << (8 * MAD_DATA_SIZE - 8 * byte - bit - width)
    assert int.from_bytes(cls(**{name: value}).encode()) == mask


@pytest.mark.parametrize(
    ("cls", "name", "offset", "size"), BYTE_POSITIONS, ids=lambda v: getattr(v, "__name__", str(v))
)
def test_byte_field_position(cls: type[Any], name: str, offset: int, size: int) -> None:
    value = bytes(range(1, size + 1))
    raw = cls(**{name: value}).encode()
    assert raw == bytes(offset) + value + bytes(MAD_DATA_SIZE - offset - size)


def test_rep_vendor_id_is_split_over_three_bytes() -> None:
    raw = CmRep(
        local_qpn=0xABCDEF, local_eecn=0x111111, starting_psn=0x222222, vendor_id=0x010203
    ).encode()
    assert raw[12:24] == bytes.fromhex("abcdef01 11111102 22222203")


def test_enum_fields_decode_to_enums() -> None:
    rej = CmRej.decode(
        CmRej(message_rejected=CmMsgResponse.REP, reason=CmRejReason.STALE_CONN, ari=b"x").encode()
    )
    assert rej.reason is CmRejReason.STALE_CONN
    assert rej.message_rejected is CmMsgResponse.REP
    assert rej.ari == b"x" + bytes(71)
    odd = CmRej.decode(CmRej(reason=34, message_rejected=3).encode())
    assert (odd.reason, odd.message_rejected) == (34, 3)
    assert not isinstance(odd.reason, CmRejReason)


def test_rej_reason_codes() -> None:
    """IBTA Table 109 as ``enum ib_cm_rej_reason`` numbers it (34 is unused)."""
    names = [
        "NO_QP",
        "NO_EEC",
        "NO_RESOURCES",
        "TIMEOUT",
        "UNSUPPORTED_REQ",
        "INVALID_COMM_ID",
        "INVALID_COMM_INSTANCE",
        "INVALID_SERVICE_ID",
        "INVALID_TRANSPORT_TYPE",
        "STALE_CONN",
        "RDC_NOT_EXIST",
        "INVALID_GID",
        "INVALID_LID",
        "INVALID_SL",
        "INVALID_TRAFFIC_CLASS",
        "INVALID_HOP_LIMIT",
        "INVALID_PACKET_RATE",
        "INVALID_ALT_GID",
        "INVALID_ALT_LID",
        "INVALID_ALT_SL",
        "INVALID_ALT_TRAFFIC_CLASS",
        "INVALID_ALT_HOP_LIMIT",
        "INVALID_ALT_PACKET_RATE",
        "PORT_CM_REDIRECT",
        "PORT_REDIRECT",
        "INVALID_MTU",
        "INSUFFICIENT_RESP_RESOURCES",
        "CONSUMER_DEFINED",
        "INVALID_RNR_RETRY",
        "DUPLICATE_LOCAL_COMM_ID",
        "INVALID_CLASS_VERSION",
        "INVALID_FLOW_LABEL",
        "INVALID_ALT_FLOW_LABEL",
    ]
    expected = {name: code for code, name in enumerate(names, 1)}
    expected["VENDOR_OPTION_NOT_SUPPORTED"] = 35
    assert {r.name: r.value for r in CmRejReason} == expected


# --------------------------------------------------------------------------
# Malformed input

REQ_MAD = next(r.mad for r in RECORDS if r.capture == "rping.pcap")


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
@FAST
@given(n=st.integers(0, MAD_DATA_SIZE - 1))
def test_truncated_class_data_raises(cls: type[Any], n: int) -> None:
    with pytest.raises(MalformedMad, match=f"{n} bytes"):
        cls.decode(bytes(n))


@FAST
@given(n=st.integers(0, 2 * MAD_SIZE).filter(lambda n: n != MAD_SIZE))
def test_mad_of_wrong_length_raises(n: int) -> None:
    with pytest.raises(MalformedMad, match=f"{n} bytes"):
        decode_cm_mad((REQ_MAD * 2)[:n])


def _patched(offset: int, value: bytes) -> bytes:
    return REQ_MAD[:offset] + value + REQ_MAD[offset + len(value) :]


@pytest.mark.parametrize(
    ("mad", "message"),
    [
        (_patched(0, b"\x02"), "base version 2"),
        (_patched(1, b"\x01"), "class 0x01"),
        (_patched(1, b"\x04"), "class 0x04"),
        (_patched(2, b"\x01"), "class version 1"),
        (_patched(2, b"\x03"), "class version 3"),
        (_patched(16, b"\x00\x20"), "attribute ID 0x0020"),
        (_patched(16, b"\x00\x00"), "attribute ID 0x0000"),
        (_patched(16, b"\x00\x01"), "ClassPortInfo"),
    ],
)
def test_wrong_header_raises(mad: bytes, message: str) -> None:
    with pytest.raises(MalformedMad, match=message):
        decode_cm_mad(mad)


def test_encode_cm_mad_sets_the_attribute() -> None:
    hdr, msg = decode_cm_mad(REQ_MAD)
    assert encode_cm_mad(dataclasses.replace(hdr, attr_id=0x99), msg) == REQ_MAD
    rtu = CmRtu(local_comm_id=1, remote_comm_id=2)
    assert MadHdr.decode(encode_cm_mad(hdr, rtu)).attr_id == CmAttrId.RTU
    with pytest.raises(MadError):
        encode_cm_mad(hdr, CmRtu(local_comm_id=1 << 32))
