"""SRP IU protocol errors, encode errors and normalised fields."""

from __future__ import annotations

import pytest

from softrdma.ulp.srp import (
    SrpCmd,
    SrpDirectBuf,
    SrpEncodeError,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpLoginReq,
    SrpLoginRsp,
    SrpProtocolError,
    SrpRsp,
    SrpRspFlag,
    SrpTskMgmt,
    decode_srp_iu,
)

# --- errors -------------------------------------------------------------------------------------


def test_protocol_errors() -> None:
    with pytest.raises(SrpProtocolError, match="unknown opcode 0x77"):
        decode_srp_iu(b"\x77" + bytes(63))
    with pytest.raises(SrpProtocolError, match="no bytes"):
        decode_srp_iu(b"")
    with pytest.raises(SrpProtocolError, match=r"SRP_RSP: 20 bytes received, 36 needed"):
        decode_srp_iu(b"\xc1" + bytes(19))
    with pytest.raises(SrpProtocolError, match="is not LOGIN_RSP"):
        SrpLoginRsp.decode(b"\xc1" + bytes(51))
    with pytest.raises(SrpProtocolError, match="byte 11"):
        SrpLoginReq.decode_rdma(bytes(11) + b"\x02" + bytes(44))
    base = bytearray(SrpCmd(data_in=SrpDirectBuf(1, 2, 3)).encode())
    bad = bytearray(base)
    bad[5] = 0x05
    with pytest.raises(SrpProtocolError, match="data-in descriptor: format 5"):
        SrpCmd.decode(bad)
    bad[5] = 0x03
    with pytest.raises(
        SrpProtocolError, match=r"not a valid data-in format \(0 none, 1 direct, 2 indirect\)"
    ):
        SrpCmd.decode(bad)
    bad[5] = 0x02  # indirect data-in, 0 descriptors: needs 20 bytes, has 16
    with pytest.raises(SrpProtocolError, match="indirect descriptor with 0 descriptors"):
        SrpCmd.decode(bad)
    bad = bytearray(SrpCmd(data_in=SrpIndirectBuf(SrpDirectBuf(1, 2, 32), 9)).encode())
    bad[7] = 2  # claims two descriptors the IU does not carry
    with pytest.raises(SrpProtocolError, match="2 descriptors"):
        SrpCmd.decode(bad)
    with pytest.raises(SrpProtocolError, match="for add_cdb_len 8"):
        SrpCmd.decode(bytes(base[:31]) + b"\x08" + bytes(base[32:48]))
    imm = SrpCmd(data_out=SrpImmBuf(8), imm_data=b"12345678").encode()
    with pytest.raises(SrpProtocolError, match="8 bytes of immediate data at 68"):
        SrpCmd.decode(imm[:-1], imm_data_offset=68)
    with pytest.raises(SrpProtocolError, match="overlaps the descriptors"):
        SrpCmd.decode(imm, imm_data_offset=50)
    with pytest.raises(SrpProtocolError, match="overlaps the descriptors"):
        SrpCmd.decode(imm[:56])  # inferred offset 48
    rsp = SrpRsp(sense=b"x" * 10).encode()
    with pytest.raises(SrpProtocolError, match="10 bytes of sense data"):
        SrpRsp.decode(rsp[:-1])


def test_encode_errors() -> None:
    with pytest.raises(SrpEncodeError, match=r"SrpCmd.tag=.*64 bits"):
        SrpCmd(tag=1 << 64).encode()
    with pytest.raises(SrpEncodeError, match="LUN"):
        SrpTskMgmt(lun=-1).encode()
    with pytest.raises(SrpEncodeError, match=r"SrpDirectBuf\.key"):
        SrpDirectBuf(0, 1 << 32, 0).encode()
    with pytest.raises(SrpEncodeError, match="cdb: 16 bytes"):
        SrpCmd(cdb=bytes(17)).encode()
    with pytest.raises(SrpEncodeError, match="at most 252"):
        SrpCmd(add_cdb=bytes(256)).encode()
    with pytest.raises(SrpEncodeError, match="only for data-out"):
        SrpCmd(data_in=SrpImmBuf(0)).encode()
    with pytest.raises(SrpEncodeError, match=r"srp_imm_buf\.len 4 but 3 bytes"):
        SrpCmd(data_out=SrpImmBuf(4), imm_data=b"abc").encode()
    with pytest.raises(SrpEncodeError, match="need an SrpImmBuf"):
        SrpCmd(imm_data=b"abc").encode()
    with pytest.raises(SrpEncodeError, match="overlap"):
        SrpCmd(data_out=SrpImmBuf(0), add_cdb=bytes(20)).encode()
    with pytest.raises(SrpEncodeError, match="imm_gap: 3 bytes"):
        SrpCmd(data_out=SrpImmBuf(0), imm_gap=b"abc").encode()
    ind = SrpIndirectBuf(SrpDirectBuf(0, 0, 16), 0, (SrpDirectBuf(0, 0, 0),))
    with pytest.raises(SrpEncodeError, match="needs that count"):
        SrpCmd(data_out=ind, data_out_desc_cnt=3).encode()
    with pytest.raises(SrpEncodeError, match="at most 255"):
        SrpIndirectBuf(SrpDirectBuf(0, 0, 0), 0, (SrpDirectBuf(0, 0, 0),) * 256).encode()
    with pytest.raises(SrpEncodeError, match="req_lim_delta"):
        SrpRsp(req_lim_delta=1 << 31).encode()
    with pytest.raises(SrpEncodeError, match="an overflow, but"):
        SrpRsp(data_in_res_cnt=-3, raw_flags=SrpRspFlag.DIUNDER).encode()
    with pytest.raises(SrpEncodeError, match="an underflow, but"):
        SrpRsp(data_out_res_cnt=3, raw_flags=SrpRspFlag.DOOVER).encode()
    with pytest.raises(SrpEncodeError, match="magnitude"):
        SrpRsp(data_out_res_cnt=1 << 32).encode()
    with pytest.raises(SrpEncodeError, match="initiator_port_id"):
        SrpLoginReq(initiator_port_id=bytes(8)).encode_rdma()
    with pytest.raises(SrpEncodeError, match="imm_data_offset"):
        SrpLoginReq(imm_data_offset=1 << 16).encode()


def test_normalised_fields() -> None:
    """Values that encode alike compare alike: a short CDB, an unaligned
    additional CDB, a zero gap, a count or flags equal to what is implied."""
    assert SrpCmd(cdb=b"\x12") == SrpCmd(cdb=b"\x12" + bytes(15))
    assert SrpCmd(add_cdb=b"ab").add_cdb == b"ab\0\0"
    imm = SrpCmd(data_out=SrpImmBuf(1), imm_data=b"x", imm_gap=bytes(16))
    assert imm.imm_gap == b""
    assert SrpCmd.decode(imm.encode()) == imm
    assert SrpCmd(data_in=SrpDirectBuf(0, 0, 0), data_in_desc_cnt=0).data_in_desc_cnt is None
    # Another initiator's count of 1 with a direct descriptor is kept.
    raw = bytearray(SrpCmd(data_in=SrpDirectBuf(1, 2, 3)).encode())
    raw[7] = 1
    got = SrpCmd.decode(raw)
    assert got.data_in_desc_cnt == 1 and got.encode() == raw
    assert SrpRsp(sense=b"s", raw_flags=SrpRspFlag.SNSVALID).raw_flags is None
    # Flags that disagree with the fields are kept as received.
    odd = bytearray(SrpRsp(data_in_res_cnt=4).encode())
    odd[18] |= SrpRspFlag.DIOVER  # both underflow and overflow
    got_rsp = SrpRsp.decode(odd)
    assert got_rsp.data_in_res_cnt == 4 and got_rsp.raw_flags == 0x30
    assert got_rsp.encode() == odd
    odd[18] = 0  # a residual without its flag
    got_rsp = SrpRsp.decode(odd)
    assert got_rsp.raw_flags == 0 and got_rsp.encode() == odd
