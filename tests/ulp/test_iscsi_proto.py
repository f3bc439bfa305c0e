"""iSCSI PDUs (softrdma.ulp.iscsi.proto): iscsi_proto.h's layouts byte by
byte for every PDU type, the AHS and padding rules, the typed errors, and
hypothesis round-trip / fuzzing properties. The PDUs of a real Linux
session are checked in test_iser_proto.py."""

from __future__ import annotations

import struct
from dataclasses import fields, replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.ulp import iscsi
from softrdma.ulp.iscsi import (
    ISCSI_HDR_LEN,
    ISCSI_RESERVED_TAG,
    IscsiAhs,
    IscsiBhs,
    IscsiDataIn,
    IscsiDataOut,
    IscsiEncodeError,
    IscsiError,
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiLoginStage,
    IscsiLoginStatusClass,
    IscsiLoginStatusDetail,
    IscsiLogoutReason,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiLogoutResponseCode,
    IscsiNopIn,
    IscsiNopOut,
    IscsiOpcode,
    IscsiPdu,
    IscsiProtocolError,
    IscsiR2t,
    IscsiReject,
    IscsiRejectReason,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiTaskAttr,
    IscsiText,
    IscsiTextResponse,
    IscsiTmfFunc,
    IscsiTmfRequest,
    IscsiTmfResponse,
    IscsiTmfResponseCode,
    decode_iscsi_pdu,
    iscsi_pad_len,
)

PDU_TYPES: list[type[IscsiPdu]] = [
    IscsiLoginRequest,
    IscsiLoginResponse,
    IscsiText,
    IscsiTextResponse,
    IscsiScsiCommand,
    IscsiScsiResponse,
    IscsiNopOut,
    IscsiNopIn,
    IscsiTmfRequest,
    IscsiTmfResponse,
    IscsiLogoutRequest,
    IscsiLogoutResponse,
    IscsiReject,
    IscsiDataOut,
    IscsiDataIn,
    IscsiR2t,
]


def be32(raw: bytes, off: int) -> int:
    value: int = struct.unpack_from(">I", raw, off)[0]
    return value


def test_opcodes_are_iscsi_proto_h() -> None:
    assert {t.OPCODE: t for t in PDU_TYPES}.keys() == {
        0x03, 0x23, 0x04, 0x24, 0x01, 0x21, 0x00, 0x20, 0x02, 0x22, 0x06, 0x26, 0x3F, 0x05,
        0x25, 0x31,
    }  # fmt: skip
    assert iscsi.ISCSI_OP_IMMEDIATE == 0x40 and iscsi.ISCSI_OPCODE_MASK == 0x3F
    assert [int(iscsi.ISCSI_OP_LOGIN), int(iscsi.ISCSI_OP_REJECT), int(iscsi.ISCSI_OP_R2T)] == [
        0x03, 0x3F, 0x31,
    ]  # fmt: skip
    assert int(iscsi.ISCSI_OP_PARMS_NEGOTIATION_STAGE) == 1
    assert int(iscsi.ISCSI_STATUS_CLS_INITIATOR_ERR) == 2
    assert iscsi.ISCSI_FLAG_CMD_FINAL == 0x80 and iscsi.ISCSI_FLAG_CMD_ATTR_MASK == 0x07
    assert int(IscsiLoginStage.FULL_FEATURE_PHASE) == 3
    assert IscsiLoginStatusDetail.NO_SESSION_TYPE == 0x09
    assert int(IscsiTmfResponseCode.REJECTED) == 0xFF


# --- layouts --------------------------------------------------------------------------------


def test_scsi_command_layout() -> None:
    cdb = bytes([0x28, 0, 0, 0, 0x10, 0, 0, 0, 8, 0]) + bytes(6)
    pdu = IscsiScsiCommand(
        read=True, attr=IscsiTaskAttr.ORDERED, lun=1, itt=0x01020304, data_length=4096,
        cmdsn=7, exp_statsn=9, cdb=cdb, data=b"xyz",
    )  # fmt: skip
    raw = pdu.encode()
    assert len(raw) == 48 + 4
    assert raw[0] == 0x01 and raw[1] == 0x80 | 0x40 | 2
    assert raw[4] == 0 and raw[5:8] == b"\0\0\3"  # TotalAHSLength, DataSegmentLength
    assert raw[8:16] == b"\0\1" + bytes(6)  # int_to_scsilun(1)
    assert (be32(raw, 16), be32(raw, 20), be32(raw, 24), be32(raw, 28)) == (0x01020304, 4096, 7, 9)
    assert raw[32:48] == cdb and raw[48:] == b"xyz\0"
    assert decode_iscsi_pdu(raw) == pdu


def test_scsi_response_sense_in_data_segment() -> None:
    sense = bytes([0x70, 0, 5]) + bytes(15)
    pdu = IscsiScsiResponse(
        underflow=True, status=2, itt=5, statsn=10, exp_cmdsn=11, max_cmdsn=74,
        residual_count=16, sense=sense,
    )  # fmt: skip
    raw = pdu.encode()
    assert raw[0] == 0x21 and raw[1] == 0x80 | 0x02 and raw[2] == 0 and raw[3] == 2
    assert raw[5:8] == b"\0\0\x14"  # SenseLength (2) + 18 bytes of sense
    assert be32(raw, 16) == 5 and be32(raw, 24) == 10 and be32(raw, 44) == 16
    assert raw[48:50] == b"\0\x12" and raw[50:68] == sense
    assert decode_iscsi_pdu(raw) == pdu
    with_rsp = replace(pdu, response_data=b"\1\2")
    assert IscsiScsiResponse.decode(with_rsp.encode()) == with_rsp
    assert IscsiScsiResponse().encode()[5:8] == b"\0\0\0"  # no data: no SenseLength either


def test_login_request_and_response_layout() -> None:
    req = IscsiLoginRequest(
        transit=True, csg=IscsiLoginStage.OP_PARMS_NEGOTIATION,
        nsg=IscsiLoginStage.FULL_FEATURE_PHASE, isid=0x00023D000001, cid=3, cmdsn=1,
        data=b"A=B\0",
    )  # fmt: skip
    raw = req.encode()
    assert raw[:4] == b"\x43\x87\0\0" and raw[8:14] == bytes.fromhex("00023d000001")
    assert struct.unpack_from(">H", raw, 20)[0] == 3 and be32(raw, 24) == 1
    rsp = IscsiLoginResponse(
        status_class=IscsiLoginStatusClass.INITIATOR_ERR,
        status_detail=IscsiLoginStatusDetail.TGT_NOT_FOUND, tsih=0x1234, statsn=5,
    )  # fmt: skip
    raw = rsp.encode()
    assert raw[0] == 0x23 and struct.unpack_from(">H", raw, 14)[0] == 0x1234
    assert raw[36:38] == b"\x02\x03" and be32(raw, 24) == 5
    assert IscsiLoginResponse.decode(raw) == rsp


@pytest.mark.parametrize(
    ("pdu", "expect"),
    [
        (IscsiNopOut(itt=1, ttt=ISCSI_RESERVED_TAG, cmdsn=2), {0: 0x00, 1: 0x80, 16: 1, 24: 2}),
        (IscsiNopIn(ttt=3, statsn=4, exp_cmdsn=5, max_cmdsn=6), {0: 0x20, 1: 0x80, 20: 3, 32: 6}),
        (
            IscsiTmfRequest(function=IscsiTmfFunc.LOGICAL_UNIT_RESET, itt=7, refcmdsn=8),
            {0: 0x42, 1: 0x85, 16: 7, 32: 8},
        ),
        (
            IscsiTmfResponse(response=IscsiTmfResponseCode.NO_TASK, itt=9),
            {0: 0x22, 1: 0x80, 2: 1, 16: 9},
        ),
        (
            IscsiLogoutRequest(immediate=True, reason=IscsiLogoutReason.CLOSE_CONNECTION, cid=4),
            {0: 0x46, 1: 0x81, 20: 4 << 16},
        ),
        (
            IscsiLogoutResponse(response=IscsiLogoutResponseCode.CID_NOT_FOUND, t2wait=2),
            {0: 0x26, 1: 0x80, 2: 1, 40: 2 << 16},
        ),
        (
            IscsiReject(reason=IscsiRejectReason.PROTOCOL_ERROR, statsn=3, data=bytes(48)),
            {0: 0x3F, 1: 0x80, 2: 4, 16: 0xFFFFFFFF, 24: 3},
        ),
        (IscsiText(cont=True, itt=5), {0: 0x04, 1: 0xC0, 16: 5, 20: 0xFFFFFFFF}),
        (IscsiTextResponse(itt=5, ttt=6), {0: 0x24, 1: 0x80, 20: 6}),
        (IscsiDataOut(final=False, datasn=2, offset=8192), {0: 0x05, 1: 0, 36: 2, 40: 8192}),
        (
            IscsiDataIn(has_status=True, underflow=True, status=0, residual_count=12),
            {0: 0x25, 1: 0x83, 44: 12},
        ),
        (IscsiR2t(r2tsn=1, data_offset=4, data_length=5), {0: 0x31, 1: 0x80, 36: 1, 44: 5}),
    ],
)
def test_layout(pdu: IscsiPdu, expect: dict[int, int]) -> None:
    raw = pdu.encode()
    for off, value in expect.items():
        got = raw[off] if off < 4 and value <= 0xFF else be32(raw, off)
        assert got == value, f"byte {off}"
    assert decode_iscsi_pdu(raw) == pdu


def test_ahs_and_padding() -> None:
    long_cdb = bytes(range(32))
    ahs = (IscsiAhs(1, b"\0" + long_cdb[16:]), IscsiAhs(2, b"\0" + (4096).to_bytes(4, "big")))
    pdu = IscsiScsiCommand(cdb=long_cdb[:16], ahs=ahs, data=b"12345")
    raw = pdu.encode()
    assert raw[4] == (20 + 8) // 4  # 3+17 → 20 bytes, 3+5 → 8 bytes
    assert raw[48:51] == b"\0\x11\x01" and raw[68:71] == b"\0\x05\x02"
    assert raw[76:] == b"12345\0\0\0"
    assert decode_iscsi_pdu(raw) == pdu
    assert IscsiBhs.decode(raw).pdu_length == len(raw)
    # Receive buffers are larger; the padding may also be absent.
    assert decode_iscsi_pdu(raw + bytes(100)) == pdu
    assert decode_iscsi_pdu(raw[:-3]) == pdu
    assert [iscsi_pad_len(n) for n in range(5)] == [0, 3, 2, 1, 0]


# --- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        bytes(47),
        b"\x10" + bytes(47),  # SNACK: not modelled
        b"\x32" + bytes(47),  # Async Message: not modelled
        b"\x07" + bytes(47),  # unassigned opcode
        b"\x01\x80\0\0\0\0\0\x08" + bytes(40),  # 8 data bytes announced, none present
        b"\x01\x80\0\0\x02\0\0\0" + bytes(40) + b"\0\x10\x01" + bytes(5),  # AHS overruns
        b"\x01\x80\0\0\x01\0\0\0" + bytes(40) + b"\0\0",  # AHS region ends in a header
        b"\x43\x88\0\0" + bytes(44),  # login CSG 2 (reserved)
        b"\x43\xc7\0\0" + bytes(44),  # login T and C both set
        b"\x21\x80\0\0\0\0\0\x01" + bytes(40) + b"\0",  # sense without its length
        b"\x21\x80\0\0\0\0\0\x04" + bytes(40) + b"\0\x05\0\0",  # SenseLength overruns
    ],
)
def test_malformed_pdus_raise_the_typed_error(raw: bytes) -> None:
    with pytest.raises(IscsiProtocolError):
        decode_iscsi_pdu(raw)


def test_decoding_as_the_wrong_type() -> None:
    with pytest.raises(IscsiProtocolError, match="not IscsiNopIn"):
        IscsiNopIn.decode(IscsiNopOut().encode())


def test_unknown_codes_stay_integers() -> None:
    """A TMF function or reject reason iscsi_proto.h does not name decodes
    (the target answers it) instead of failing."""
    raw = bytearray(IscsiTmfRequest().encode())
    raw[1] = 0x80 | 0x7E
    pdu = decode_iscsi_pdu(bytes(raw))
    assert isinstance(pdu, IscsiTmfRequest) and pdu.function == 0x7E
    assert pdu.encode() == bytes(raw)


@pytest.mark.parametrize(
    "bad",
    [
        IscsiScsiCommand(itt=1 << 32),
        IscsiScsiCommand(cdb=b"\0" * 10),
        IscsiScsiCommand(attr=8),
        IscsiScsiCommand(lun=-1),
        IscsiLoginRequest(isid=1 << 48),
        IscsiLoginRequest(csg=4),
        IscsiLogoutResponse(t2wait=1 << 16),
        IscsiTmfRequest(function=0x80),
        IscsiNopOut(ahs=(IscsiAhs(0x100),)),
        IscsiNopOut(ahs=tuple(IscsiAhs(1, bytes(1)) for _ in range(256))),
        IscsiScsiResponse(data=b"x"),
    ],
)
def test_fields_that_cannot_be_encoded(bad: IscsiPdu) -> None:
    with pytest.raises(IscsiEncodeError):
        bad.encode()


def test_errors_are_value_errors() -> None:
    assert issubclass(IscsiProtocolError, IscsiError) and issubclass(IscsiError, ValueError)


# --- properties -----------------------------------------------------------------------------

_U32 = st.integers(0, 2**32 - 1)


def _value(name: str, typ: Any, pdu_type: type[IscsiPdu]) -> st.SearchStrategy[Any]:
    for fname, mask in pdu_type._FLAGS:
        if fname == name:
            width = mask >> ((mask & -mask).bit_length() - 1)
            return st.booleans() if width == 1 else st.integers(0, width)
    for fname, _off, code in pdu_type._FIELDS:
        if fname == name:
            if code == "6s":
                return st.integers(0, 2**48 - 1)
            if code == "8s":
                return st.integers(0, 2**64 - 1)
            if code == "16s":
                return st.binary(min_size=16, max_size=16)
            return st.integers(0, 2 ** (8 * struct.calcsize(code)) - 1)
    if name == "immediate":
        return st.booleans()
    if name == "ahs":
        return st.lists(
            st.builds(IscsiAhs, st.integers(0, 255), st.binary(max_size=12)), max_size=3
        ).map(tuple)
    return st.binary(max_size=70)  # data, sense, response_data


@st.composite
def any_pdu(draw: st.DrawFn) -> IscsiPdu:
    pdu_type = draw(st.sampled_from(PDU_TYPES))
    kwargs = {f.name: draw(_value(f.name, f.type, pdu_type)) for f in fields(pdu_type)}
    if pdu_type is IscsiScsiResponse:
        kwargs["data"] = b""
    if pdu_type in (IscsiLoginRequest, IscsiLoginResponse):
        kwargs["csg"] = draw(st.sampled_from(list(IscsiLoginStage)))
        kwargs["nsg"] = draw(st.sampled_from(list(IscsiLoginStage)))
        if kwargs["transit"]:
            kwargs["cont"] = False
    return pdu_type(**kwargs)


@settings(max_examples=400)
@given(any_pdu())
def test_round_trip(pdu: IscsiPdu) -> None:
    raw = pdu.encode()
    assert len(raw) % 4 == 0 and len(raw) == IscsiBhs.decode(raw).pdu_length
    back = decode_iscsi_pdu(raw)
    assert back == pdu and back.encode() == raw


@settings(max_examples=1000)
@given(st.binary(min_size=0, max_size=160))
def test_fuzzing_gives_a_pdu_or_the_typed_error(raw: bytes) -> None:
    try:
        pdu = decode_iscsi_pdu(raw)
    except IscsiProtocolError:
        return
    again = pdu.encode()
    assert decode_iscsi_pdu(again) == pdu


@settings(max_examples=300)
@given(any_pdu(), st.data())
def test_mutated_pdus_give_a_pdu_or_the_typed_error(pdu: IscsiPdu, data: st.DataObject) -> None:
    raw = bytearray(pdu.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(raw)))
    try:
        back = decode_iscsi_pdu(bytes(raw[:cut]))
    except IscsiProtocolError:
        return
    assert decode_iscsi_pdu(back.encode()) == back


def test_every_reserved_byte_is_ignored_on_receive() -> None:
    """Non-zero reserved bytes decode to the same PDU (RFC 7143 §11.2)."""
    for pdu_type in PDU_TYPES:
        pdu = pdu_type()
        raw = pdu.encode()
        used = {0, 1, 4, 5, 6, 7}
        for _name, off, code in pdu_type._FIELDS:
            used |= set(range(off, off + struct.calcsize(code)))
        noisy = bytearray(raw)
        for i in set(range(ISCSI_HDR_LEN)) - used:
            noisy[i] = 0xA5
        assert decode_iscsi_pdu(bytes(noisy)) == pdu, pdu_type.__name__


def test_opcode_enum_covers_the_types() -> None:
    assert {t.OPCODE for t in PDU_TYPES} < set(IscsiOpcode)


def test_the_base_class_decodes_any_type() -> None:
    raw = IscsiR2t(ttt=4).encode()
    assert IscsiPdu.decode(raw) == IscsiR2t(ttt=4)


def test_reject_carries_the_rejected_header() -> None:
    bad = b"\x07\x80" + bytes(46) + b"payload"
    rej = IscsiReject.rejecting(bad, IscsiRejectReason.CMD_NOT_SUPPORTED, statsn=3, max_cmdsn=9)
    raw = rej.encode()
    assert raw[2] == 5 and raw[5:8] == b"\0\0\x30" and raw[48:96] == bad[:48]
    assert be32(raw, 16) == 0xFFFFFFFF and be32(raw, 24) == 3 and be32(raw, 32) == 9
    assert decode_iscsi_pdu(raw) == rej
    short = IscsiReject.rejecting(b"\x01\x80", IscsiRejectReason.PROTOCOL_ERROR)
    assert short.data == b"\x01\x80" + bytes(46)
