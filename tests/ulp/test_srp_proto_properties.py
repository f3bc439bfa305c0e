"""Hypothesis round-trip and truncation properties for every SRP IU type."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from softrdma.ulp.srp import (
    SRP_IMM_DATA_OFFSET,
    SrpAerReq,
    SrpAerRsp,
    SrpCmd,
    SrpCredReq,
    SrpCredRsp,
    SrpDataBuf,
    SrpDirectBuf,
    SrpILogout,
    SrpImmBuf,
    SrpIndirectBuf,
    SrpIu,
    SrpLoginRej,
    SrpLoginReq,
    SrpLoginRsp,
    SrpProtocolError,
    SrpRsp,
    SrpRspFlag,
    SrpTLogout,
    SrpTskMgmt,
    decode_srp_iu,
    int_to_scsilun,
    scsilun_to_int,
)

# --- properties -------------------------------------------------------------------------------

u8 = st.integers(0, 0xFF)
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFF_FFFF)
u64 = st.integers(0, (1 << 64) - 1)
s32 = st.integers(-(1 << 31), (1 << 31) - 1)
small_bytes = st.binary(max_size=48)

direct_bufs = st.builds(SrpDirectBuf, u64, u32, u32)
indirect_bufs = st.builds(
    SrpIndirectBuf, direct_bufs, u32, st.lists(direct_bufs, max_size=5).map(tuple)
)


@st.composite
def commands(draw: st.DrawFn) -> tuple[SrpCmd, int | None]:
    """A command and the immediate-data offset to encode it with."""
    out_kind = draw(st.sampled_from(["none", "direct", "indirect", "imm"]))
    data_out: SrpDataBuf | None = None
    imm_data = b""
    if out_kind == "direct":
        data_out = draw(direct_bufs)
    elif out_kind == "indirect":
        data_out = draw(indirect_bufs)
    elif out_kind == "imm":
        imm_data = draw(st.binary(max_size=64))
        data_out = SrpImmBuf(len(imm_data))
    data_in = draw(st.one_of(st.none(), direct_bufs, indirect_bufs))
    cmd = SrpCmd(
        tag=draw(u64),
        lun=draw(u64),
        cdb=draw(st.binary(min_size=16, max_size=16)),
        add_cdb=draw(
            st.integers(0, 63).flatmap(lambda n: st.binary(min_size=4 * n, max_size=4 * n))
        ),
        task_attr=draw(u8),
        sol_not=draw(u8),
        data_out=data_out,
        data_in=data_in,
        imm_data=imm_data,
        data_out_desc_cnt=None if out_kind == "indirect" else draw(st.none() | u8),
        data_in_desc_cnt=None if isinstance(data_in, SrpIndirectBuf) else draw(st.none() | u8),
    )
    if out_kind != "imm":
        return cmd, None
    gap = draw(st.integers(0, 24))
    if draw(st.booleans()):
        cmd = replace(cmd, imm_gap=draw(st.binary(min_size=gap, max_size=gap)))
    return cmd, cmd.desc_end + gap


@st.composite
def responses(draw: st.DrawFn) -> SrpRsp:
    raw = draw(st.none() | u8)
    counts = []
    for under, over in (
        (SrpRspFlag.DOUNDER, SrpRspFlag.DOOVER),
        (SrpRspFlag.DIUNDER, SrpRspFlag.DIOVER),
    ):
        magnitude = draw(u32)
        # The flags, when given, fix the sign (underflow read first, as ib_srp does).
        negative = draw(st.booleans()) if raw is None else not raw & under and bool(raw & over)
        counts.append(-magnitude if negative else magnitude)
    return SrpRsp(
        tag=draw(u64),
        req_lim_delta=draw(s32),
        status=draw(u8),
        data_out_res_cnt=counts[0],
        data_in_res_cnt=counts[1],
        sense=draw(small_bytes),
        resp_data=draw(small_bytes),
        sol_not=draw(u8),
        raw_flags=raw,
    )


port_ids = st.binary(min_size=16, max_size=16)
fixed_ius: st.SearchStrategy[SrpIu] = st.one_of(
    st.builds(SrpLoginReq, u64, u32, u16, u8, u16, port_ids, port_ids),
    st.builds(SrpLoginRsp, u64, s32, u32, u32, u16, u8),
    st.builds(SrpLoginRej, u64, u32, u16),
    st.builds(SrpILogout, u64),
    st.builds(SrpTLogout, u64, u32, u8),
    st.builds(SrpTskMgmt, u64, u64, u8, u64, u8),
    st.builds(SrpCredReq, u64, s32, u8),
    st.builds(SrpCredRsp, u64),
    st.builds(SrpAerReq, u64, u64, small_bytes, s32, u8),
    st.builds(SrpAerRsp, u64),
    responses(),
)


@settings(max_examples=300, deadline=None)
@given(fixed_ius, st.data())
def test_iu_round_trip_and_truncation(iu: SrpIu, data: st.DataObject) -> None:
    raw = iu.encode()
    assert type(iu).decode(raw) == iu
    assert decode_srp_iu(raw) == iu
    assert decode_srp_iu(raw).encode() == raw
    # Bytes after the IU (a larger receive buffer, padded private data) are ignored.
    assert decode_srp_iu(raw + b"\xff" * 7) == iu
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(SrpProtocolError):
        decode_srp_iu(raw[:cut])
    if isinstance(iu, SrpLoginReq):
        rdma = iu.encode_rdma()
        assert len(rdma) == 56 and SrpLoginReq.decode_rdma(rdma) == iu
        with pytest.raises(SrpProtocolError):
            SrpLoginReq.decode_rdma(rdma[: cut % 56])


@settings(max_examples=300, deadline=None)
@given(commands(), st.data())
def test_command_round_trip_and_truncation(
    case: tuple[SrpCmd, int | None], data: st.DataObject
) -> None:
    cmd, offset = case
    raw = cmd.encode(offset)
    assert SrpCmd.decode(raw, offset) == cmd
    assert decode_srp_iu(raw, offset) == cmd
    assert SrpCmd.decode(raw) == cmd  # immediate data, if any, ends the SEND
    assert SrpCmd.decode(raw, offset).encode(offset) == raw
    assert len(raw) == (cmd.desc_end if offset is None else offset + len(cmd.imm_data))
    cut = data.draw(st.integers(0, len(raw) - 1), label="cut")
    with pytest.raises(SrpProtocolError):
        SrpCmd.decode(raw[:cut], offset if offset is not None else SRP_IMM_DATA_OFFSET)


@given(u64)
def test_scsilun_round_trip(lun: int) -> None:
    assert scsilun_to_int(int_to_scsilun(lun)) == lun
    assert len(int_to_scsilun(lun)) == 8


@given(direct_bufs, indirect_bufs, u32)
def test_descriptor_round_trip(d: SrpDirectBuf, ind: SrpIndirectBuf, n: int) -> None:
    assert SrpDirectBuf.decode(d.encode()) == d
    assert SrpIndirectBuf.decode(ind.encode(), len(ind.desc_list)) == ind
    assert len(ind.encode()) == ind.size == 20 + 16 * len(ind.desc_list)
    assert SrpImmBuf.decode(SrpImmBuf(n).encode()) == SrpImmBuf(n)
