"""SRP IU layouts from Linux's srp.h for what the captures lack."""

from __future__ import annotations

from dataclasses import replace

from softrdma.ulp import srp
from softrdma.ulp.srp import (
    SrpAerReq,
    SrpAerRsp,
    SrpCmd,
    SrpCredReq,
    SrpCredRsp,
    SrpDirectBuf,
    SrpEncodeError,
    SrpILogout,
    SrpIndirectBuf,
    SrpLoginRej,
    SrpLoginRejReason,
    SrpLoginReq,
    SrpLoginReqFlag,
    SrpLoginRsp,
    SrpLoginRspFlag,
    SrpOpcode,
    SrpProtocolError,
    SrpRsp,
    SrpRspFlag,
    SrpTaskAttr,
    SrpTLogout,
    SrpTskMgmt,
    SrpTskMgmtFunc,
    decode_srp_iu,
    int_to_scsilun,
    scsilun_to_int,
)
from softrdma.ulp.srp import proto as srp_proto
from tests.ulp._srp_proto_helpers import (
    be,
    le,
)

# --- srp.h's layouts for what the captures lack -------------------------------------------------


def test_indirect_command_layout() -> None:
    """An SRP_CMD with a 4-byte additional CDB and an indirect data-out
    descriptor carrying 2 of a 3-entry table (ib_srp with allow_ext_sg), laid
    out by hand from srp.h's offsets."""
    table = SrpDirectBuf(0xFFFF888000001000, 0x1234, 48)
    d1 = SrpDirectBuf(0x10000, 0x55, 4096)
    d2 = SrpDirectBuf(0x20000, 0x56, 512)
    cmd = SrpCmd(
        tag=0x8000_0001,
        lun=0x0102,
        cdb=bytes.fromhex("2a00") + bytes(14),
        add_cdb=b"\xaa\xbb\xcc\xdd",
        task_attr=SrpTaskAttr.ORDERED,
        data_out=SrpIndirectBuf(table, 4096 + 512 + 1024, (d1, d2)),
    )
    expected = b"".join(
        [
            be(0x02, 1),  # opcode
            be(0, 1),  # sol_not
            bytes(3),
            be(0x20, 1),  # buf_fmt: data-out indirect
            be(2, 1),  # data_out_desc_cnt: the descriptors in the IU
            be(0, 1),  # data_in_desc_cnt
            le(0x8000_0001, 8),  # tag
            bytes(4),
            bytes.fromhex("0102000000000000"),  # int_to_scsilun(0x102)
            bytes(1),
            be(2, 1),  # task_attr ORDERED
            bytes(1),
            be(4, 1),  # add_cdb_len
            bytes.fromhex("2a00") + bytes(14),
            b"\xaa\xbb\xcc\xdd",  # additional CDB
            be(0xFFFF888000001000, 8) + be(0x1234, 4) + be(48, 4),  # table_desc
            be(4096 + 512 + 1024, 4),  # total length
            be(0x10000, 8) + be(0x55, 4) + be(4096, 4),
            be(0x20000, 8) + be(0x56, 4) + be(512, 4),
        ]
    )
    assert cmd.encode() == expected
    assert len(expected) == 48 + 4 + 20 + 32 == cmd.desc_end
    got = SrpCmd.decode(expected)
    assert got == cmd
    assert isinstance(got.data_out, SrpIndirectBuf)
    assert got.data_out.table_count == 3 and got.data_out.external
    assert got.buf_fmt == 0x20
    # A data-in indirect descriptor follows a data-out one (bidirectional).
    bidi = replace(cmd, data_in=SrpIndirectBuf(table, 10, (d1,)))
    raw = bidi.encode()
    assert raw[5] == 0x22 and raw[6:8] == b"\x02\x01"
    assert isinstance(bidi.data_in, SrpIndirectBuf)
    assert raw[-36:] == bidi.data_in.encode()
    assert SrpCmd.decode(raw) == bidi


def test_small_iu_layouts() -> None:
    tag = 0x1122334455667788
    assert SrpILogout(tag).encode() == b"\x03" + bytes(7) + le(tag, 8)
    assert SrpCredRsp(tag).encode() == b"\x41" + bytes(7) + le(tag, 8)
    assert SrpAerRsp(tag).encode() == b"\x42" + bytes(7) + le(tag, 8)
    assert SrpTLogout(tag, reason=3, sol_not=1).encode() == (
        b"\x80\x01" + bytes(2) + be(3, 4) + le(tag, 8)
    )
    assert SrpCredReq(tag, req_lim_delta=-2, sol_not=1).encode() == (
        b"\x81\x01" + bytes(2) + be(0xFFFFFFFE, 4) + le(tag, 8)
    )
    assert SrpTskMgmt(tag, lun=1, tsk_mgmt_func=SrpTskMgmtFunc.LUN_RESET, task_tag=7).encode() == (
        b"\x01\x00"
        + bytes(6)
        + le(tag, 8)
        + bytes(4)
        + bytes.fromhex("0001000000000000")
        + bytes(2)
        + b"\x08\x00"
        + le(7, 8)
        + bytes(8)
    )
    sense = bytes.fromhex("7000060000000000")
    assert SrpAerReq(tag, lun=2, sense=sense, req_lim_delta=1).encode() == (
        b"\x82\x00"
        + bytes(2)
        + be(1, 4)
        + le(tag, 8)
        + bytes(4)
        + bytes.fromhex("0002000000000000")
        + be(8, 4)
        + bytes(4)
        + sense
    )
    rej = SrpLoginRej(tag, SrpLoginRejReason.REQ_IT_IU_LENGTH_TOO_LARGE)
    assert rej.encode() == (
        b"\xc2" + bytes(3) + be(0x00010002, 4) + le(tag, 8) + bytes(8) + be(6, 2) + bytes(6)
    )
    rsp = SrpRsp(
        tag,
        req_lim_delta=1,
        status=2,
        data_out_res_cnt=-5,
        data_in_res_cnt=9,
        sense=b"S" * 3,
        resp_data=b"\0\0\0\x05",
    )
    flags = SrpRspFlag.RSPVALID | SrpRspFlag.SNSVALID | SrpRspFlag.DOOVER | SrpRspFlag.DIUNDER
    assert rsp.flags == flags
    assert rsp.encode() == (
        b"\xc1\x00"
        + bytes(2)
        + be(1, 4)
        + le(tag, 8)
        + bytes(2)
        + be(flags, 1)
        + b"\x02"
        + be(5, 4)
        + be(9, 4)
        + be(3, 4)
        + be(4, 4)
        + b"\0\0\0\x05SSS"
    )
    req = SrpLoginReq(
        tag,
        req_it_iu_len=0x114,
        req_flags=SrpLoginReqFlag.MULTICHAN_MULTI | SrpLoginReqFlag.IMMED_REQUESTED,
        imm_data_offset=68,
        initiator_port_id=bytes(range(16)),
        target_port_id=bytes(range(16, 32)),
    )
    assert req.encode() == (
        b"\x00"
        + bytes(7)
        + le(tag, 8)
        + be(0x114, 4)
        + bytes(4)
        + be(6, 2)
        + b"\x81\x00"
        + be(68, 2)
        + bytes(2)
        + bytes(range(32))
    )
    assert req.encode_rdma() == (
        le(tag, 8) + be(6, 2) + b"\x81\x00" + be(0x114, 4) + bytes(range(32)) + be(68, 2) + bytes(6)
    )
    lrsp = SrpLoginRsp(tag, 64, 0x2054, 0x114, 6, SrpLoginRspFlag.IMMED_SUPP)
    assert lrsp.encode() == (
        b"\xc0"
        + bytes(3)
        + be(64, 4)
        + le(tag, 8)
        + be(0x2054, 4)
        + be(0x114, 4)
        + be(6, 2)
        + b"\x80"
        + bytes(25)
    )
    for iu in (
        SrpILogout(tag),
        SrpCredRsp(tag),
        SrpAerRsp(tag),
        SrpTLogout(tag, 3, 1),
        SrpCredReq(tag, -2, 1),
        rej,
        rsp,
        req,
        lrsp,
    ):
        assert decode_srp_iu(iu.encode()) == iu
    assert SrpLoginReq.decode_rdma(req.encode_rdma()) == req


def test_scsilun() -> None:
    assert int_to_scsilun(0) == bytes(8)
    assert int_to_scsilun(5) == bytes.fromhex("0005000000000000")
    assert int_to_scsilun(0x4001) == bytes.fromhex("4001000000000000")  # flat addressing
    assert int_to_scsilun(0x1122334455667788) == bytes.fromhex("7788556633441122")
    assert scsilun_to_int(bytes.fromhex("7788556633441122")) == 0x1122334455667788


def test_public_names() -> None:
    assert set(srp_proto.__all__) <= set(srp.__all__)  # with the target and the initiator
    for name in srp_proto.__all__:
        assert getattr(srp, name) is getattr(srp_proto, name)
    assert [(o.name, o.value) for o in SrpOpcode] == [
        ("LOGIN_REQ", 0x00),
        ("TSK_MGMT", 0x01),
        ("CMD", 0x02),
        ("I_LOGOUT", 0x03),
        ("LOGIN_RSP", 0xC0),
        ("RSP", 0xC1),
        ("LOGIN_REJ", 0xC2),
        ("T_LOGOUT", 0x80),
        ("CRED_REQ", 0x81),
        ("AER_REQ", 0x82),
        ("CRED_RSP", 0x41),
        ("AER_RSP", 0x42),
    ]
    # srp.h's constants under their kernel names.
    kernel = {name: int(getattr(srp, name)) for name in srp.__all__ if name.startswith("SRP_")}
    assert kernel == {
        "SRP_BUF_FORMAT_DIRECT": 1 << 1,
        "SRP_BUF_FORMAT_INDIRECT": 1 << 2,
        "SRP_NO_DATA_DESC": 0,
        "SRP_DATA_DESC_DIRECT": 1,
        "SRP_DATA_DESC_INDIRECT": 2,
        "SRP_DATA_DESC_IMM": 3,
        "SRP_MULTICHAN_SINGLE": 0,
        "SRP_MULTICHAN_MULTI": 1,
        "SRP_IMMED_REQUESTED": 0x80,
        "SRP_LOGIN_RSP_MULTICHAN_NO_CHAN": 0,
        "SRP_LOGIN_RSP_MULTICHAN_TERMINATED": 1,
        "SRP_LOGIN_RSP_MULTICHAN_MAINTAINED": 2,
        "SRP_LOGIN_RSP_IMMED_SUPP": 0x80,
        "SRP_RSP_FLAG_RSPVALID": 1 << 0,
        "SRP_RSP_FLAG_SNSVALID": 1 << 1,
        "SRP_RSP_FLAG_DOOVER": 1 << 2,
        "SRP_RSP_FLAG_DOUNDER": 1 << 3,
        "SRP_RSP_FLAG_DIOVER": 1 << 4,
        "SRP_RSP_FLAG_DIUNDER": 1 << 5,
        "SRP_REV10_IB_IO_CLASS": 0xFF00,
        "SRP_REV16A_IB_IO_CLASS": 0x0100,
        "SRP_MAX_ADD_CDB_LEN": 16,
        "SRP_IMM_DATA_OFFSET": 68,
    }
    assert {r.name: int(r) for r in SrpLoginRejReason} == {
        "UNABLE_ESTABLISH_CHANNEL": 0x00010000,
        "INSUFFICIENT_RESOURCES": 0x00010001,
        "REQ_IT_IU_LENGTH_TOO_LARGE": 0x00010002,
        "UNABLE_ASSOCIATE_CHANNEL": 0x00010003,
        "UNSUPPORTED_DESCRIPTOR_FMT": 0x00010004,
        "MULTI_CHANNEL_UNSUPPORTED": 0x00010005,
        "CHANNEL_LIMIT_REACHED": 0x00010006,
    }
    assert {f.name: int(f) for f in SrpTskMgmtFunc} == {
        "ABORT_TASK": 0x01,
        "ABORT_TASK_SET": 0x02,
        "CLEAR_TASK_SET": 0x04,
        "LUN_RESET": 0x08,
        "CLEAR_ACA": 0x40,
    }
    assert {a.name: int(a) for a in SrpTaskAttr} == {
        "SIMPLE": 0,
        "HEAD_OF_QUEUE": 1,
        "ORDERED": 2,
        "ACA": 4,
    }
    assert issubclass(SrpProtocolError, ValueError) and issubclass(SrpEncodeError, ValueError)
