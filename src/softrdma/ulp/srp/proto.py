"""SRP information units, byte for byte.

Kernel counterparts: ``include/scsi/srp.h`` (every ``struct srp_*`` and its
constants), as ``drivers/infiniband/ulp/srp/ib_srp.c`` (the initiator) fills
them and ``drivers/infiniband/ulp/srpt/ib_srpt.c`` (the LIO target) reads
them; T10 SRP r16a and SRP-2 (immediate data) for the semantics.

Wire conventions, checked against the two Linux sessions in
``tests/data/captures/srp_*.pcap``:

* Multi-byte fields are big-endian, except the **tags**: srp.h declares them
  ``u64`` in host byte order, the target copies them back untouched, and
  ib_srp stores ``blk_mq_unique_tag()`` in them. They are modelled as
  unsigned integers read **little-endian** (the byte order of the x86 hosts
  that made the captures), so a tag reads as ib_srp's request tag (``0x30``,
  not ``0x3000000000000000``); any 8 bytes round-trip.
* LUNs are Linux LUN numbers, put on the wire with :func:`int_to_scsilun`
  (``scsilun_to_int`` back), as ib_srp does; the mapping is a bijection of
  64-bit values.
* ``req_lim_delta`` is signed (ib_srp adds it to its ``req_lim`` as an
  ``s32``).
* Reserved fields are sent as zero and ignored on receive, as SRP asks of a
  recipient. The one place Linux puts non-zero bytes where no field is —
  the gap between an SRP_CMD's immediate-data descriptor and the immediate
  data — is kept in :attr:`SrpCmd.imm_gap`, so that decode → encode is
  byte-exact for everything Linux sent.
* ``decode(data)`` reads the IU at the start of ``data`` and ignores bytes
  after it: receive buffers are larger than the IU, and CM private data is
  padded (the login request fills the REQ's 92 bytes behind the 36-byte
  ``cma_hdr``, the login response sits in the first 52 of the REP's 196).

Immediate data (SRP-2, ``SRP_DATA_DESC_IMM``): ib_srp writes a 4-byte
``srp_imm_buf`` where a descriptor would go (right after the additional
CDB, at ``48 + add_cdb_len``) and sends the data itself as extra SGEs of the
same SEND, behind the first ``SRP_IMM_DATA_OFFSET`` (68 = 48 + 16 + 4) bytes
of the IU buffer — the ``imm_data_offset`` it announced in its login
request. Only the 48-byte header is cleared per command, so the bytes
between the end of ``srp_imm_buf`` and offset 68 are whatever the reused IU
buffer held (in the captures: the tail of an earlier command's direct
descriptor). ib_srpt finds the data at the channel's ``imm_data_offset``
(``srpt_get_desc_tbl``).

Errors: :class:`SrpProtocolError` for received bytes that are not a valid IU
(too short, wrong or unknown opcode, descriptors that do not fit, a bad
format nibble); :class:`SrpEncodeError` for a field that cannot be encoded
(out of range, wrong length, inconsistent). Both are :class:`SrpError`, a
:class:`~softrdma.errors.SoftRdmaError` and a :class:`ValueError`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import ClassVar, Final, Self, TypeAlias

from softrdma.errors import SoftRdmaError
from softrdma.transport.headers import BytesLike

__all__ = [
    "SRP_BUF_FORMAT_DIRECT",
    "SRP_BUF_FORMAT_INDIRECT",
    "SRP_DATA_DESC_DIRECT",
    "SRP_DATA_DESC_IMM",
    "SRP_DATA_DESC_INDIRECT",
    "SRP_IMMED_REQUESTED",
    "SRP_IMM_DATA_OFFSET",
    "SRP_LOGIN_RSP_IMMED_SUPP",
    "SRP_LOGIN_RSP_MULTICHAN_MAINTAINED",
    "SRP_LOGIN_RSP_MULTICHAN_NO_CHAN",
    "SRP_LOGIN_RSP_MULTICHAN_TERMINATED",
    "SRP_MAX_ADD_CDB_LEN",
    "SRP_MULTICHAN_MULTI",
    "SRP_MULTICHAN_SINGLE",
    "SRP_NO_DATA_DESC",
    "SRP_REV10_IB_IO_CLASS",
    "SRP_REV16A_IB_IO_CLASS",
    "SRP_RSP_FLAG_DIOVER",
    "SRP_RSP_FLAG_DIUNDER",
    "SRP_RSP_FLAG_DOOVER",
    "SRP_RSP_FLAG_DOUNDER",
    "SRP_RSP_FLAG_RSPVALID",
    "SRP_RSP_FLAG_SNSVALID",
    "SrpAerReq",
    "SrpAerRsp",
    "SrpBufFmt",
    "SrpCmd",
    "SrpCredReq",
    "SrpCredRsp",
    "SrpDataBuf",
    "SrpDataFormat",
    "SrpDirectBuf",
    "SrpEncodeError",
    "SrpError",
    "SrpILogout",
    "SrpImmBuf",
    "SrpIndirectBuf",
    "SrpIu",
    "SrpLoginRej",
    "SrpLoginRejReason",
    "SrpLoginReq",
    "SrpLoginReqFlag",
    "SrpLoginRsp",
    "SrpLoginRspFlag",
    "SrpOpcode",
    "SrpProtocolError",
    "SrpRsp",
    "SrpRspFlag",
    "SrpTLogout",
    "SrpTaskAttr",
    "SrpTskMgmt",
    "SrpTskMgmtFunc",
    "decode_srp_iu",
    "int_to_scsilun",
    "scsilun_to_int",
]


# --- errors ------------------------------------------------------------------------------


class SrpError(SoftRdmaError, ValueError):
    """Base of the SRP codec's errors."""


class SrpProtocolError(SrpError):
    """Received bytes that are not a valid SRP IU: too short, an unknown or
    unexpected opcode, descriptors that do not fit, a bad descriptor format
    nibble (what ib_srpt answers with a rejected command or a dropped IU)."""


class SrpEncodeError(SrpError):
    """An IU field that cannot be encoded: out of range for its wire width,
    of the wrong length, or inconsistent with another field."""


# --- constants (include/scsi/srp.h, ib_srp.h) ----------------------------------------------


class SrpOpcode(enum.IntEnum):
    """The IU type in byte 0 of every IU (srp.h's anonymous opcode enum)."""

    LOGIN_REQ = 0x00
    TSK_MGMT = 0x01
    CMD = 0x02
    I_LOGOUT = 0x03
    LOGIN_RSP = 0xC0
    RSP = 0xC1
    LOGIN_REJ = 0xC2
    T_LOGOUT = 0x80
    CRED_REQ = 0x81
    AER_REQ = 0x82
    CRED_RSP = 0x41
    AER_RSP = 0x42


class SrpBufFmt(enum.IntFlag):
    """Supported buffer formats in a login (``req_buf_fmt`` / ``buf_fmt``:
    ``SRP_BUF_FORMAT_DIRECT``, ``SRP_BUF_FORMAT_INDIRECT``)."""

    DIRECT = 1 << 1
    INDIRECT = 1 << 2


class SrpDataFormat(enum.IntEnum):
    """A command's data-out (high nibble of ``buf_fmt``) or data-in (low
    nibble) descriptor format: ``SRP_NO_DATA_DESC``, ``SRP_DATA_DESC_DIRECT``,
    ``SRP_DATA_DESC_INDIRECT``, ``SRP_DATA_DESC_IMM`` (SRP-2)."""

    NO_DATA = 0
    DIRECT = 1
    INDIRECT = 2
    IMM = 3


class SrpLoginReqFlag(enum.IntFlag):
    """``srp_login_req.req_flags``: multi-channel action in bits 0–1
    (``SRP_MULTICHAN_SINGLE`` 0, ``SRP_MULTICHAN_MULTI`` 1) and
    ``SRP_IMMED_REQUESTED`` (SRP-2)."""

    MULTICHAN_MULTI = 0x01
    IMMED_REQUESTED = 0x80


class SrpLoginRspFlag(enum.IntFlag):
    """``srp_login_rsp.rsp_flags``: what became of other channels in bits
    0–1 (``SRP_LOGIN_RSP_MULTICHAN_NO_CHAN`` 0, ``_TERMINATED`` 1,
    ``_MAINTAINED`` 2) and ``SRP_LOGIN_RSP_IMMED_SUPP`` (SRP-2)."""

    MULTICHAN_TERMINATED = 0x01
    MULTICHAN_MAINTAINED = 0x02
    IMMED_SUPP = 0x80


class SrpLoginRejReason(enum.IntEnum):
    """``enum srp_login_rej_reason`` (``SRP_LOGIN_REJ_*``)."""

    UNABLE_ESTABLISH_CHANNEL = 0x00010000
    INSUFFICIENT_RESOURCES = 0x00010001
    REQ_IT_IU_LENGTH_TOO_LARGE = 0x00010002
    UNABLE_ASSOCIATE_CHANNEL = 0x00010003
    UNSUPPORTED_DESCRIPTOR_FMT = 0x00010004
    MULTI_CHANNEL_UNSUPPORTED = 0x00010005
    CHANNEL_LIMIT_REACHED = 0x00010006


class SrpTskMgmtFunc(enum.IntEnum):
    """``srp_tsk_mgmt.tsk_mgmt_func`` (``SRP_TSK_ABORT_TASK`` …)."""

    ABORT_TASK = 0x01
    ABORT_TASK_SET = 0x02
    CLEAR_TASK_SET = 0x04
    LUN_RESET = 0x08
    CLEAR_ACA = 0x40


class SrpRspFlag(enum.IntFlag):
    """``srp_rsp.flags`` (``SRP_RSP_FLAG_*``): response / sense data valid,
    data-out and data-in overflow / underflow."""

    RSPVALID = 1 << 0
    SNSVALID = 1 << 1
    DOOVER = 1 << 2
    DOUNDER = 1 << 3
    DIOVER = 1 << 4
    DIUNDER = 1 << 5


class SrpTaskAttr(enum.IntEnum):
    """``srp_cmd.task_attr`` (ib_srpt.h ``SRP_CMD_SIMPLE_Q``,
    ``SRP_CMD_HEAD_OF_Q``, ``SRP_CMD_ORDERED_Q``, ``SRP_CMD_ACA``)."""

    SIMPLE = 0
    HEAD_OF_QUEUE = 1
    ORDERED = 2
    ACA = 4


SRP_BUF_FORMAT_DIRECT: Final = SrpBufFmt.DIRECT
SRP_BUF_FORMAT_INDIRECT: Final = SrpBufFmt.INDIRECT
SRP_NO_DATA_DESC: Final = SrpDataFormat.NO_DATA
SRP_DATA_DESC_DIRECT: Final = SrpDataFormat.DIRECT
SRP_DATA_DESC_INDIRECT: Final = SrpDataFormat.INDIRECT
SRP_DATA_DESC_IMM: Final = SrpDataFormat.IMM
SRP_MULTICHAN_SINGLE: Final = SrpLoginReqFlag(0)
SRP_MULTICHAN_MULTI: Final = SrpLoginReqFlag.MULTICHAN_MULTI
SRP_IMMED_REQUESTED: Final = SrpLoginReqFlag.IMMED_REQUESTED
SRP_LOGIN_RSP_MULTICHAN_NO_CHAN: Final = SrpLoginRspFlag(0)
SRP_LOGIN_RSP_MULTICHAN_TERMINATED: Final = SrpLoginRspFlag.MULTICHAN_TERMINATED
SRP_LOGIN_RSP_MULTICHAN_MAINTAINED: Final = SrpLoginRspFlag.MULTICHAN_MAINTAINED
SRP_LOGIN_RSP_IMMED_SUPP: Final = SrpLoginRspFlag.IMMED_SUPP
SRP_RSP_FLAG_RSPVALID: Final = SrpRspFlag.RSPVALID
SRP_RSP_FLAG_SNSVALID: Final = SrpRspFlag.SNSVALID
SRP_RSP_FLAG_DOOVER: Final = SrpRspFlag.DOOVER
SRP_RSP_FLAG_DOUNDER: Final = SrpRspFlag.DOUNDER
SRP_RSP_FLAG_DIOVER: Final = SrpRspFlag.DIOVER
SRP_RSP_FLAG_DIUNDER: Final = SrpRspFlag.DIUNDER
SRP_REV10_IB_IO_CLASS: Final = 0xFF00
SRP_REV16A_IB_IO_CLASS: Final = 0x0100

SRP_MAX_ADD_CDB_LEN: Final = 16
"""ib_srp.h: the longest additional CDB ib_srp sends (a 32-byte CDB)."""
SRP_IMM_DATA_OFFSET: Final = 48 + SRP_MAX_ADD_CDB_LEN + 4
"""ib_srp.h: where ib_srp puts immediate data in an SRP_CMD (68: the command,
room for a 16-byte additional CDB and the ``srp_imm_buf``); it announces
this value in its login request."""

_FMT_MASK = 0x0F

# --- precompiled layouts -------------------------------------------------------------------
# Tags are "8s" (host-order u64, read little-endian); LUNs are "8s" (struct scsi_lun).

_DIRECT = struct.Struct(">QII")  # srp_direct_buf
_INDIRECT_HDR = struct.Struct(">QIII")  # srp_indirect_buf without desc_list
_IMM = struct.Struct(">I")  # srp_imm_buf
_LOGIN_REQ = struct.Struct(">B7x8sI4xHBxH2x16s16s")
_LOGIN_REQ_RDMA = struct.Struct(">8sHBBI16s16sH6x")
_LOGIN_RSP = struct.Struct(">B3xi8sIIHB25x")
_LOGIN_REJ = struct.Struct(">B3xI8s8xH6x")
_TAG_ONLY = struct.Struct(">B7x8s")  # srp_i_logout, srp_cred_rsp, srp_aer_rsp
_T_LOGOUT = struct.Struct(">BB2xI8s")
_TSK_MGMT = struct.Struct(">BB6x8s4x8s2xBx8s8x")
_CMD = struct.Struct(">BB3xBBB8s4x8sxBxB16s")
_RSP = struct.Struct(">BB2xi8s2xBBIIII")
_CRED_REQ = struct.Struct(">BB2xi8s")
_AER_REQ = struct.Struct(">BB2xi8s4x8sI4x")
_LUN_WORDS = struct.Struct(">4H")

_U64 = 1 << 64
_U32 = 1 << 32


# --- helpers -------------------------------------------------------------------------------


def int_to_scsilun(lun: int) -> bytes:
    """The 8-byte ``struct scsi_lun`` for Linux LUN number ``lun``
    (drivers/scsi/scsi_common.c ``int_to_scsilun``: each 16-bit level of
    ``lun``, lowest first, as a big-endian word). Raises
    :class:`SrpEncodeError` outside 0 .. 2**64-1."""
    if not 0 <= lun < _U64:
        raise SrpEncodeError(f"LUN {lun!r}: a LUN is 64 bits")
    return _LUN_WORDS.pack(lun & 0xFFFF, (lun >> 16) & 0xFFFF, (lun >> 32) & 0xFFFF, lun >> 48)


def scsilun_to_int(scsilun: BytesLike) -> int:
    """The Linux LUN number of an 8-byte ``struct scsi_lun``
    (``scsilun_to_int``, the inverse of :func:`int_to_scsilun`)."""
    w: tuple[int, int, int, int] = _LUN_WORDS.unpack_from(scsilun)
    w0, w1, w2, w3 = w
    return w0 | w1 << 16 | w2 << 32 | w3 << 48


def _tag_bytes(what: str, tag: int) -> bytes:
    if not isinstance(tag, int):
        raise SrpEncodeError(f"{what}.tag={tag!r}: not an integer")
    if not 0 <= tag < _U64:
        raise SrpEncodeError(f"{what}.tag={tag:#x}: a tag is 64 bits")
    return tag.to_bytes(8, "little")


def _tag(raw: bytes) -> int:
    return int.from_bytes(raw, "little")


def _check_uint(what: str, name: str, value: int, bits: int) -> None:
    if not isinstance(value, int) or not 0 <= value < 1 << bits:
        raise SrpEncodeError(f"{what}.{name}={value!r}: out of range for {bits} bits")


def _check_sint(what: str, name: str, value: int, bits: int) -> None:
    lim = 1 << (bits - 1)
    if not isinstance(value, int) or not -lim <= value < lim:
        raise SrpEncodeError(f"{what}.{name}={value!r}: out of range for a signed {bits}-bit field")


def _check_bytes(what: str, name: str, value: bytes, size: int) -> None:
    if not isinstance(value, bytes | bytearray | memoryview) or len(value) != size:
        raise SrpEncodeError(f"{what}.{name}: {size} bytes expected, got {value!r}")


def _need(what: str, data: BytesLike, size: int, why: str = "") -> None:
    if len(data) < size:
        raise SrpProtocolError(
            f"{what}: {len(data)} bytes received, {size} needed{(' ' + why) if why else ''}"
        )


def _expect_opcode(what: str, opcode: int, expected: SrpOpcode) -> None:
    if opcode != expected:
        raise SrpProtocolError(
            f"{what}: opcode {opcode:#04x} is not {expected.name} ({expected.value:#04x})"
        )


def _as_enum(kind: type[enum.IntEnum], value: int) -> int:
    """The enum member for ``value`` if there is one, else the plain int."""
    try:
        return kind(value)
    except ValueError:
        return value


def _mv(data: BytesLike) -> memoryview:
    mv = data if isinstance(data, memoryview) else memoryview(data)
    return mv if mv.format == "B" and mv.ndim == 1 else mv.cast("B")


# --- data buffer descriptors ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SrpDirectBuf:
    """``struct srp_direct_buf`` (16 bytes): one remote buffer — its address
    (a DMA address or MR iova on the initiator's device), R_Key and length —
    that the target RDMA READs (data-out) or RDMA WRITEs (data-in)."""

    va: int
    key: int
    len: int

    SIZE: ClassVar[int] = 16
    FORMAT: ClassVar[SrpDataFormat] = SrpDataFormat.DIRECT

    def encode(self) -> bytes:
        """The 16 descriptor bytes."""
        _check_uint("SrpDirectBuf", "va", self.va, 64)
        _check_uint("SrpDirectBuf", "key", self.key, 32)
        _check_uint("SrpDirectBuf", "len", self.len, 32)
        return _DIRECT.pack(self.va, self.key, self.len)

    @classmethod
    def decode(cls, data: BytesLike, offset: int = 0) -> Self:
        """The descriptor at ``offset`` of ``data``."""
        _need("srp_direct_buf", data, offset + cls.SIZE)
        va, key, length = _DIRECT.unpack_from(data, offset)
        return cls(va, key, length)


@dataclass(frozen=True, slots=True)
class SrpIndirectBuf:
    """``struct srp_indirect_buf`` (20 + 16·n bytes): ``table_desc`` locates
    the whole descriptor table in the initiator's memory (its ``len`` is 16
    × the number of descriptors), ``len`` is the total data length, and
    ``desc_list`` holds the descriptors carried in the IU — exactly as many
    as the command's descriptor count says. ib_srp puts at most
    ``cmd_sg_cnt`` there and, with ``allow_ext_sg``, leaves the rest in the
    external table only (:attr:`external`), which ib_srpt does not fetch."""

    table_desc: SrpDirectBuf
    len: int
    desc_list: tuple[SrpDirectBuf, ...] = ()

    HDR_SIZE: ClassVar[int] = 20
    FORMAT: ClassVar[SrpDataFormat] = SrpDataFormat.INDIRECT

    @property
    def size(self) -> int:
        """Encoded length: 20 + 16 per descriptor in the IU."""
        return self.HDR_SIZE + SrpDirectBuf.SIZE * len(self.desc_list)

    @property
    def table_count(self) -> int:
        """Descriptors in the whole table (``table_desc.len / 16``, as
        ib_srpt counts them)."""
        return self.table_desc.len // SrpDirectBuf.SIZE

    @property
    def external(self) -> bool:
        """Whether the table holds descriptors the IU does not carry."""
        return self.table_count > len(self.desc_list)

    def encode(self) -> bytes:
        """Header and the descriptors carried in the IU."""
        _check_uint("SrpIndirectBuf", "len", self.len, 32)
        if len(self.desc_list) > 0xFF:
            raise SrpEncodeError(
                f"SrpIndirectBuf: {len(self.desc_list)} descriptors, "
                "but an SRP_CMD counts at most 255 per direction"
            )
        head = self.table_desc.encode() + _IMM.pack(self.len)
        return b"".join((head, *(d.encode() for d in self.desc_list)))

    @classmethod
    def decode(cls, data: BytesLike, count: int | None = None, offset: int = 0) -> Self:
        """The indirect descriptor at ``offset`` of ``data`` with ``count``
        descriptors in the IU (default: the whole table, ``table_desc.len /
        16``). Raises :class:`SrpProtocolError` if they do not fit."""
        _need("srp_indirect_buf", data, offset + cls.HDR_SIZE)
        tva, tkey, tlen, total = _INDIRECT_HDR.unpack_from(data, offset)
        n = tlen // SrpDirectBuf.SIZE if count is None else count
        end = offset + cls.HDR_SIZE + SrpDirectBuf.SIZE * n
        _need("srp_indirect_buf", data, end, f"for {n} descriptors")
        descs = tuple(
            SrpDirectBuf(*t) for t in _DIRECT.iter_unpack(_mv(data)[offset + cls.HDR_SIZE : end])
        )
        return cls(SrpDirectBuf(tva, tkey, tlen), total, descs)


@dataclass(frozen=True, slots=True)
class SrpImmBuf:
    """``struct srp_imm_buf`` (SRP-2, 4 bytes): the length of the immediate
    data carried in the same SEND as the SRP_CMD."""

    len: int

    SIZE: ClassVar[int] = 4
    FORMAT: ClassVar[SrpDataFormat] = SrpDataFormat.IMM

    def encode(self) -> bytes:
        """The 4 descriptor bytes."""
        _check_uint("SrpImmBuf", "len", self.len, 32)
        return _IMM.pack(self.len)

    @classmethod
    def decode(cls, data: BytesLike, offset: int = 0) -> Self:
        """The descriptor at ``offset`` of ``data``."""
        _need("srp_imm_buf", data, offset + cls.SIZE)
        return cls(_IMM.unpack_from(data, offset)[0])


SrpDataBuf: TypeAlias = SrpDirectBuf | SrpIndirectBuf | SrpImmBuf
"""A data buffer descriptor of an SRP_CMD."""


def _desc_size(desc: SrpDataBuf | None) -> int:
    if desc is None:
        return 0
    if isinstance(desc, SrpIndirectBuf):
        return desc.size
    return desc.SIZE


# --- login ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SrpLoginReq:
    """``struct srp_login_req`` (64 bytes, the IB CM REQ private data) and
    ``struct srp_login_req_rdma`` (56 bytes, the RDMA CM REQ private data
    after the 36-byte ``cma_hdr``: the same fields without the reserved
    bytes, in another order) — ib_srp.c ``srp_send_req``, ib_srpt.c
    ``srpt_cm_req_recv`` / ``srpt_rdma_cm_req_recv``.

    ``initiator_port_id`` and ``target_port_id`` are 16 bytes each (SRP
    r16a: an 8-byte ID extension, then an 8-byte GUID). ``imm_data_offset``
    is where the initiator will put immediate data in an SRP_CMD
    (meaningful with ``SRP_IMMED_REQUESTED``)."""

    tag: int = 0
    req_it_iu_len: int = 0
    req_buf_fmt: int = SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT
    req_flags: int = 0
    imm_data_offset: int = 0
    initiator_port_id: bytes = bytes(16)
    target_port_id: bytes = bytes(16)

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.LOGIN_REQ
    SIZE: ClassVar[int] = 64
    RDMA_SIZE: ClassVar[int] = 56

    def _validate(self) -> bytes:
        what = type(self).__name__
        _check_uint(what, "req_it_iu_len", self.req_it_iu_len, 32)
        _check_uint(what, "req_buf_fmt", self.req_buf_fmt, 16)
        _check_uint(what, "req_flags", self.req_flags, 8)
        _check_uint(what, "imm_data_offset", self.imm_data_offset, 16)
        _check_bytes(what, "initiator_port_id", self.initiator_port_id, 16)
        _check_bytes(what, "target_port_id", self.target_port_id, 16)
        return _tag_bytes(what, self.tag)

    def encode(self) -> bytes:
        """The 64-byte ``srp_login_req`` (IB CM form)."""
        tag = self._validate()
        return _LOGIN_REQ.pack(
            self.OPCODE,
            tag,
            self.req_it_iu_len,
            self.req_buf_fmt,
            self.req_flags,
            self.imm_data_offset,
            bytes(self.initiator_port_id),
            bytes(self.target_port_id),
        )

    def encode_rdma(self) -> bytes:
        """The 56-byte ``srp_login_req_rdma`` (RDMA CM form, what follows the
        ``cma_hdr`` in the REQ private data)."""
        tag = self._validate()
        return _LOGIN_REQ_RDMA.pack(
            tag,
            self.req_buf_fmt,
            self.req_flags,
            self.OPCODE,
            self.req_it_iu_len,
            bytes(self.initiator_port_id),
            bytes(self.target_port_id),
            self.imm_data_offset,
        )

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """A 64-byte ``srp_login_req`` at the start of ``data``."""
        _need("SRP_LOGIN_REQ", data, cls.SIZE)
        op, tag, iu_len, fmt, flags, imm_off, ipi, tpi = _LOGIN_REQ.unpack_from(data)
        _expect_opcode("SRP_LOGIN_REQ", op, cls.OPCODE)
        return cls(_tag(tag), iu_len, SrpBufFmt(fmt), SrpLoginReqFlag(flags), imm_off, ipi, tpi)

    @classmethod
    def decode_rdma(cls, data: BytesLike) -> Self:
        """A 56-byte ``srp_login_req_rdma`` at the start of ``data`` (the REQ
        private data with the ``cma_hdr`` taken off)."""
        _need("SRP_LOGIN_REQ (RDMA CM form)", data, cls.RDMA_SIZE)
        tag, fmt, flags, op, iu_len, ipi, tpi, imm_off = _LOGIN_REQ_RDMA.unpack_from(data)
        _expect_opcode("SRP_LOGIN_REQ (RDMA CM form, byte 11)", op, cls.OPCODE)
        return cls(_tag(tag), iu_len, SrpBufFmt(fmt), SrpLoginReqFlag(flags), imm_off, ipi, tpi)


@dataclass(frozen=True, slots=True)
class SrpLoginRsp:
    """``struct srp_login_rsp`` (52 bytes), the CM REP private data
    (ib_srpt.c ``srpt_cm_req_recv``, ib_srp.c ``srp_cm_rep_handler``).

    ``req_lim_delta`` is the initial credit, ``max_it_iu_len`` the largest
    IU the target accepts, ``max_ti_iu_len`` the largest it sends (ib_srpt
    echoes the request's ``req_it_iu_len`` there)."""

    tag: int = 0
    req_lim_delta: int = 0
    max_it_iu_len: int = 0
    max_ti_iu_len: int = 0
    buf_fmt: int = SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT
    rsp_flags: int = 0

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.LOGIN_RSP
    SIZE: ClassVar[int] = 52

    def encode(self) -> bytes:
        """The 52 IU bytes."""
        what = "SrpLoginRsp"
        tag = _tag_bytes(what, self.tag)
        _check_sint(what, "req_lim_delta", self.req_lim_delta, 32)
        _check_uint(what, "max_it_iu_len", self.max_it_iu_len, 32)
        _check_uint(what, "max_ti_iu_len", self.max_ti_iu_len, 32)
        _check_uint(what, "buf_fmt", self.buf_fmt, 16)
        _check_uint(what, "rsp_flags", self.rsp_flags, 8)
        return _LOGIN_RSP.pack(
            self.OPCODE,
            self.req_lim_delta,
            tag,
            self.max_it_iu_len,
            self.max_ti_iu_len,
            self.buf_fmt,
            self.rsp_flags,
        )

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data`` (e.g. the REP's 196 bytes of
        private data)."""
        _need("SRP_LOGIN_RSP", data, cls.SIZE)
        op, delta, tag, it_len, ti_len, fmt, flags = _LOGIN_RSP.unpack_from(data)
        _expect_opcode("SRP_LOGIN_RSP", op, cls.OPCODE)
        return cls(_tag(tag), delta, it_len, ti_len, SrpBufFmt(fmt), SrpLoginRspFlag(flags))


@dataclass(frozen=True, slots=True)
class SrpLoginRej:
    """``struct srp_login_rej`` (32 bytes), the CM REJ private data with
    reason ``IB_CM_REJ_CONSUMER_DEFINED`` (ib_srpt.c ``srpt_cm_req_recv``,
    ib_srp.c ``srp_ib_cm_rej_handler``). ``reason`` is a
    :class:`SrpLoginRejReason` when it is one of srp.h's."""

    tag: int = 0
    reason: int = SrpLoginRejReason.UNABLE_ESTABLISH_CHANNEL
    buf_fmt: int = SrpBufFmt.DIRECT | SrpBufFmt.INDIRECT

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.LOGIN_REJ
    SIZE: ClassVar[int] = 32

    def encode(self) -> bytes:
        """The 32 IU bytes."""
        tag = _tag_bytes("SrpLoginRej", self.tag)
        _check_uint("SrpLoginRej", "reason", self.reason, 32)
        _check_uint("SrpLoginRej", "buf_fmt", self.buf_fmt, 16)
        return _LOGIN_REJ.pack(self.OPCODE, self.reason, tag, self.buf_fmt)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data`` (e.g. the REJ's private data)."""
        _need("SRP_LOGIN_REJ", data, cls.SIZE)
        op, reason, tag, fmt = _LOGIN_REJ.unpack_from(data)
        _expect_opcode("SRP_LOGIN_REJ", op, cls.OPCODE)
        return cls(_tag(tag), _as_enum(SrpLoginRejReason, reason), SrpBufFmt(fmt))


# --- small IUs -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _TagOnly:
    """The 16-byte IUs that carry only an opcode and a tag."""

    tag: int = 0

    OPCODE: ClassVar[SrpOpcode]
    SIZE: ClassVar[int] = 16

    def encode(self) -> bytes:
        """The 16 IU bytes."""
        return _TAG_ONLY.pack(self.OPCODE, _tag_bytes(type(self).__name__, self.tag))

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data``."""
        what = cls.OPCODE.name
        _need(f"SRP_{what}", data, cls.SIZE)
        op, tag = _TAG_ONLY.unpack_from(data)
        _expect_opcode(f"SRP_{what}", op, cls.OPCODE)
        return cls(_tag(tag))


@dataclass(frozen=True, slots=True)
class SrpILogout(_TagOnly):
    """``struct srp_i_logout`` (16 bytes): the initiator ends the channel
    (ib_srp never sends it: it disconnects the CM connection instead)."""

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.I_LOGOUT


@dataclass(frozen=True, slots=True)
class SrpCredRsp(_TagOnly):
    """``struct srp_cred_rsp`` (16 bytes): the initiator's answer to an
    SRP_CRED_REQ (ib_srp.c ``srp_process_cred_req``)."""

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.CRED_RSP


@dataclass(frozen=True, slots=True)
class SrpAerRsp(_TagOnly):
    """``struct srp_aer_rsp`` (16 bytes): the initiator's answer to an
    SRP_AER_REQ (ib_srp.c ``srp_process_aer_req``)."""

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.AER_RSP


@dataclass(frozen=True, slots=True)
class SrpTLogout:
    """``struct srp_t_logout`` (16 bytes): the target ends the channel;
    ``reason`` is SRP's logout reason code."""

    tag: int = 0
    reason: int = 0
    sol_not: int = 0

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.T_LOGOUT
    SIZE: ClassVar[int] = 16

    def encode(self) -> bytes:
        """The 16 IU bytes."""
        tag = _tag_bytes("SrpTLogout", self.tag)
        _check_uint("SrpTLogout", "sol_not", self.sol_not, 8)
        _check_uint("SrpTLogout", "reason", self.reason, 32)
        return _T_LOGOUT.pack(self.OPCODE, self.sol_not, self.reason, tag)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data``."""
        _need("SRP_T_LOGOUT", data, cls.SIZE)
        op, sol_not, reason, tag = _T_LOGOUT.unpack_from(data)
        _expect_opcode("SRP_T_LOGOUT", op, cls.OPCODE)
        return cls(_tag(tag), reason, sol_not)


@dataclass(frozen=True, slots=True)
class SrpCredReq:
    """``struct srp_cred_req`` (16 bytes): the target grants
    ``req_lim_delta`` more credits (ib_srp.c ``srp_process_cred_req``)."""

    tag: int = 0
    req_lim_delta: int = 0
    sol_not: int = 0

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.CRED_REQ
    SIZE: ClassVar[int] = 16

    def encode(self) -> bytes:
        """The 16 IU bytes."""
        tag = _tag_bytes("SrpCredReq", self.tag)
        _check_uint("SrpCredReq", "sol_not", self.sol_not, 8)
        _check_sint("SrpCredReq", "req_lim_delta", self.req_lim_delta, 32)
        return _CRED_REQ.pack(self.OPCODE, self.sol_not, self.req_lim_delta, tag)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data``."""
        _need("SRP_CRED_REQ", data, cls.SIZE)
        op, sol_not, delta, tag = _CRED_REQ.unpack_from(data)
        _expect_opcode("SRP_CRED_REQ", op, cls.OPCODE)
        return cls(_tag(tag), delta, sol_not)


@dataclass(frozen=True, slots=True)
class SrpAerReq:
    """``struct srp_aer_req`` (36 bytes + sense data): an asynchronous event
    for ``lun`` with its sense data (ib_srp.c ``srp_process_aer_req``)."""

    tag: int = 0
    lun: int = 0
    sense: bytes = b""
    req_lim_delta: int = 0
    sol_not: int = 0

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.AER_REQ
    SIZE: ClassVar[int] = 36
    """The fixed part."""

    def encode(self) -> bytes:
        """Header and sense data."""
        tag = _tag_bytes("SrpAerReq", self.tag)
        _check_uint("SrpAerReq", "sol_not", self.sol_not, 8)
        _check_sint("SrpAerReq", "req_lim_delta", self.req_lim_delta, 32)
        head = _AER_REQ.pack(
            self.OPCODE,
            self.sol_not,
            self.req_lim_delta,
            tag,
            int_to_scsilun(self.lun),
            len(self.sense),
        )
        return head + bytes(self.sense)

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data``; its sense data must be there."""
        _need("SRP_AER_REQ", data, cls.SIZE)
        op, sol_not, delta, tag, lun, sense_len = _AER_REQ.unpack_from(data)
        _expect_opcode("SRP_AER_REQ", op, cls.OPCODE)
        _need("SRP_AER_REQ", data, cls.SIZE + sense_len, f"for {sense_len} bytes of sense data")
        sense = bytes(_mv(data)[cls.SIZE : cls.SIZE + sense_len])
        return cls(_tag(tag), scsilun_to_int(lun), sense, delta, sol_not)


@dataclass(frozen=True, slots=True)
class SrpTskMgmt:
    """``struct srp_tsk_mgmt`` (48 bytes): a task management function for
    ``lun``; ``task_tag`` names the command for ABORT_TASK (ib_srp.c
    ``srp_send_tsk_mgmt``, ib_srpt.c ``srpt_handle_tsk_mgmt``).
    ``tsk_mgmt_func`` is a :class:`SrpTskMgmtFunc` when it is one of srp.h's."""

    tag: int = 0
    lun: int = 0
    tsk_mgmt_func: int = SrpTskMgmtFunc.ABORT_TASK
    task_tag: int = 0
    sol_not: int = 0

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.TSK_MGMT
    SIZE: ClassVar[int] = 48

    def encode(self) -> bytes:
        """The 48 IU bytes."""
        tag = _tag_bytes("SrpTskMgmt", self.tag)
        task_tag = _tag_bytes("SrpTskMgmt.task_tag", self.task_tag)
        _check_uint("SrpTskMgmt", "sol_not", self.sol_not, 8)
        _check_uint("SrpTskMgmt", "tsk_mgmt_func", self.tsk_mgmt_func, 8)
        return _TSK_MGMT.pack(
            self.OPCODE, self.sol_not, tag, int_to_scsilun(self.lun), self.tsk_mgmt_func, task_tag
        )

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data``."""
        _need("SRP_TSK_MGMT", data, cls.SIZE)
        op, sol_not, tag, lun, func, task_tag = _TSK_MGMT.unpack_from(data)
        _expect_opcode("SRP_TSK_MGMT", op, cls.OPCODE)
        return cls(
            _tag(tag), scsilun_to_int(lun), _as_enum(SrpTskMgmtFunc, func), _tag(task_tag), sol_not
        )


# --- SRP_CMD -------------------------------------------------------------------------------


def _decode_desc(
    direction: str, fmt: int, count: int, data: memoryview, off: int
) -> tuple[SrpDataBuf | None, int]:
    """The ``direction`` descriptor of format ``fmt`` at ``off``, and where the
    next one starts (ib_srpt.c ``srpt_get_desc_tbl``)."""
    where = f"SRP_CMD {direction} descriptor"
    if fmt == SrpDataFormat.NO_DATA:
        return None, off
    if fmt == SrpDataFormat.DIRECT:
        _need(where, data, off + SrpDirectBuf.SIZE, f"for a direct descriptor at offset {off}")
        return SrpDirectBuf.decode(data, off), off + SrpDirectBuf.SIZE
    if fmt == SrpDataFormat.INDIRECT:
        end = off + SrpIndirectBuf.HDR_SIZE + SrpDirectBuf.SIZE * count
        _need(
            where,
            data,
            end,
            f"for an indirect descriptor with {count} descriptors ({direction} count) at offset {off}",
        )
        return SrpIndirectBuf.decode(data, count, off), end
    if fmt == SrpDataFormat.IMM and direction == "data-out":
        _need(
            where, data, off + SrpImmBuf.SIZE, f"for an immediate-data descriptor at offset {off}"
        )
        return SrpImmBuf.decode(data, off), off + SrpImmBuf.SIZE
    raise SrpProtocolError(
        f"{where}: format {fmt} is not a valid {direction} format (0 none, 1 direct, "
        f"2 indirect{', 3 immediate' if direction == 'data-out' else ''})"
    )


@dataclass(frozen=True, slots=True)
class SrpCmd:
    """``struct srp_cmd`` (48 bytes + additional CDB + data-out descriptor +
    data-in descriptor [+ immediate data]) — ib_srp.c ``srp_queuecommand``
    / ``srp_map_data``, ib_srpt.c ``srpt_handle_cmd`` /
    ``srpt_get_desc_tbl``.

    ``cdb`` is 16 bytes (a shorter one is zero-padded, as ib_srp's cleared
    header leaves it); ``add_cdb`` the additional CDB bytes, a multiple of 4
    (``add_cdb_len`` on the wire, whose low two bits are reserved and
    ignored on receive; an add_cdb whose length is not is zero-padded). The
    descriptors follow the additional CDB, data-out first.
    ``data_out`` / ``data_in`` are the descriptors (``None`` for no data);
    their formats make ``buf_fmt`` (data-out in the high nibble, data-in in
    the low one). For an indirect descriptor the descriptor count byte is
    the number of descriptors in the IU. ``data_out_desc_cnt`` /
    ``data_in_desc_cnt`` are ``None`` unless a received IU had a count byte
    other than that (ib_srp sends 0 with direct and immediate descriptors;
    other initiators may send 1); then they keep it.

    Immediate data (``data_out`` a :class:`SrpImmBuf`, whose ``len`` must be
    ``len(imm_data)``) lies at the channel's ``imm_data_offset``, not right
    after the descriptor; ``imm_gap`` is what lies between (``b""`` for
    zeros — an all-zero gap is stored as ``b""``). See the module docstring.
    """

    tag: int = 0
    lun: int = 0
    cdb: bytes = bytes(16)
    add_cdb: bytes = b""
    task_attr: int = SrpTaskAttr.SIMPLE
    sol_not: int = 0
    data_out: SrpDataBuf | None = None
    data_in: SrpDataBuf | None = None
    imm_data: bytes = b""
    imm_gap: bytes = b""
    data_out_desc_cnt: int | None = None
    data_in_desc_cnt: int | None = None

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.CMD
    SIZE: ClassVar[int] = 48
    """The fixed part."""

    def __post_init__(self) -> None:
        if isinstance(self.cdb, bytes | bytearray) and len(self.cdb) < 16:
            object.__setattr__(self, "cdb", bytes(self.cdb).ljust(16, b"\0"))
        if isinstance(self.add_cdb, bytes | bytearray) and len(self.add_cdb) & 3:
            object.__setattr__(self, "add_cdb", bytes(self.add_cdb) + bytes(-len(self.add_cdb) & 3))
        if self.imm_gap and self.imm_gap == bytes(len(self.imm_gap)):
            object.__setattr__(self, "imm_gap", b"")
        for name, desc in (
            ("data_out_desc_cnt", self.data_out),
            ("data_in_desc_cnt", self.data_in),
        ):
            count = getattr(self, name)
            implied = len(desc.desc_list) if isinstance(desc, SrpIndirectBuf) else 0
            if count is not None and count == implied:
                object.__setattr__(self, name, None)

    @property
    def buf_fmt(self) -> int:
        """The ``buf_fmt`` byte: data-out format << 4 | data-in format."""
        out_fmt = 0 if self.data_out is None else self.data_out.FORMAT
        in_fmt = 0 if self.data_in is None else self.data_in.FORMAT
        return out_fmt << 4 | in_fmt

    @property
    def add_cdb_len(self) -> int:
        """The ``add_cdb_len`` byte."""
        return len(self.add_cdb)

    @property
    def desc_end(self) -> int:
        """Where the descriptors end: the SRP_CMD's length without immediate
        data (``srp_map_data``'s return value for non-immediate commands)."""
        return self.SIZE + len(self.add_cdb) + _desc_size(self.data_out) + _desc_size(self.data_in)

    def _count(self, name: str, desc: SrpDataBuf | None, override: int | None) -> int:
        if isinstance(desc, SrpIndirectBuf):
            if override is not None and override != len(desc.desc_list):
                raise SrpEncodeError(
                    f"SrpCmd.{name}={override}: an indirect descriptor carrying "
                    f"{len(desc.desc_list)} descriptors needs that count"
                )
            return len(desc.desc_list)
        if override is None:
            return 0
        _check_uint("SrpCmd", name, override, 8)
        return override

    def encode(self, imm_data_offset: int | None = None) -> bytes:
        """The SEND payload. With immediate data, the data starts at
        ``imm_data_offset`` (default :data:`SRP_IMM_DATA_OFFSET`, ib_srp's);
        ``imm_gap`` must then be empty or fill exactly the bytes between the
        descriptors and that offset."""
        what = "SrpCmd"
        tag = _tag_bytes(what, self.tag)
        _check_uint(what, "sol_not", self.sol_not, 8)
        _check_uint(what, "task_attr", self.task_attr, 8)
        _check_bytes(what, "cdb", self.cdb, 16)
        if len(self.add_cdb) > 0xFC:
            raise SrpEncodeError(
                f"SrpCmd.add_cdb: {len(self.add_cdb)} bytes, add_cdb_len holds at most 252"
            )
        if isinstance(self.data_in, SrpImmBuf):
            raise SrpEncodeError("SrpCmd.data_in: immediate data exists only for data-out")
        out_cnt = self._count("data_out_desc_cnt", self.data_out, self.data_out_desc_cnt)
        in_cnt = self._count("data_in_desc_cnt", self.data_in, self.data_in_desc_cnt)
        parts = [
            _CMD.pack(
                self.OPCODE,
                self.sol_not,
                self.buf_fmt,
                out_cnt,
                in_cnt,
                tag,
                int_to_scsilun(self.lun),
                self.task_attr,
                len(self.add_cdb),
                bytes(self.cdb),
            ),
            bytes(self.add_cdb),
        ]
        if self.data_out is not None:
            parts.append(self.data_out.encode())
        if self.data_in is not None:
            parts.append(self.data_in.encode())
        if isinstance(self.data_out, SrpImmBuf):
            if self.data_out.len != len(self.imm_data):
                raise SrpEncodeError(
                    f"SrpCmd: srp_imm_buf.len {self.data_out.len} but "
                    f"{len(self.imm_data)} bytes of imm_data"
                )
            offset = SRP_IMM_DATA_OFFSET if imm_data_offset is None else imm_data_offset
            end = self.desc_end
            if offset < end:
                raise SrpEncodeError(
                    f"SrpCmd: immediate data at offset {offset} would overlap the "
                    f"descriptors, which end at {end}"
                )
            gap = offset - end
            if self.imm_gap and len(self.imm_gap) != gap:
                raise SrpEncodeError(
                    f"SrpCmd.imm_gap: {len(self.imm_gap)} bytes, but immediate data at "
                    f"offset {offset} leaves {gap} after the descriptors"
                )
            parts += [bytes(self.imm_gap) if self.imm_gap else bytes(gap), bytes(self.imm_data)]
        elif self.imm_data or self.imm_gap:
            raise SrpEncodeError("SrpCmd: imm_data / imm_gap need an SrpImmBuf data-out descriptor")
        return b"".join(parts)

    @classmethod
    def decode(cls, data: BytesLike, imm_data_offset: int | None = None) -> Self:
        """The SRP_CMD at the start of ``data`` (a whole SEND payload).

        Immediate data is read at ``imm_data_offset`` (the channel's, from
        the login request); without it, the data is taken to end the SEND
        (for Linux that gives 68). Pass the offset to detect a truncated
        SEND. Raises :class:`SrpProtocolError` for a short IU, a bad format
        nibble, descriptors that do not fit, or immediate data that overlaps
        the descriptors or is cut short (ib_srpt's checks)."""
        mv = _mv(data)
        n = len(mv)
        _need("SRP_CMD", mv, cls.SIZE)
        op, sol_not, buf_fmt, out_cnt, in_cnt, tag, lun, task_attr, add_len, cdb = _CMD.unpack_from(
            mv
        )
        _expect_opcode("SRP_CMD", op, cls.OPCODE)
        off = cls.SIZE + (add_len & ~3)
        _need("SRP_CMD", mv, off, f"for add_cdb_len {add_len}")
        add_cdb = bytes(mv[cls.SIZE : off])
        out_fmt, in_fmt = buf_fmt >> 4, buf_fmt & _FMT_MASK
        data_out, off = _decode_desc("data-out", out_fmt, out_cnt, mv, off)
        data_in, off = _decode_desc("data-in", in_fmt, in_cnt, mv, off)
        imm_data = imm_gap = b""
        if isinstance(data_out, SrpImmBuf):
            length = data_out.len
            start = n - length if imm_data_offset is None else imm_data_offset
            if start < off:
                raise SrpProtocolError(
                    f"SRP_CMD: immediate data of {length} bytes at offset {start} overlaps "
                    f"the descriptors, which end at {off} ({n} bytes received)"
                )
            _need("SRP_CMD", mv, start + length, f"for {length} bytes of immediate data at {start}")
            imm_gap = bytes(mv[off:start])
            imm_data = bytes(mv[start : start + length])
        return cls(
            tag=_tag(tag),
            lun=scsilun_to_int(lun),
            cdb=cdb,
            add_cdb=add_cdb,
            task_attr=_as_enum(SrpTaskAttr, task_attr),
            sol_not=sol_not,
            data_out=data_out,
            data_in=data_in,
            imm_data=imm_data,
            imm_gap=imm_gap,
            data_out_desc_cnt=(
                None if isinstance(data_out, SrpIndirectBuf) or out_cnt == 0 else out_cnt
            ),
            data_in_desc_cnt=(
                None if isinstance(data_in, SrpIndirectBuf) or in_cnt == 0 else in_cnt
            ),
        )


# --- SRP_RSP -------------------------------------------------------------------------------


def _residual(raw: int, flags: int, under: int, over: int) -> int:
    """A signed residual count from its magnitude and flags (ib_srp.c
    ``srp_process_rsp``: underflow positive, overflow negative)."""
    if flags & under:
        return raw
    if flags & over:
        return -raw
    return raw


@dataclass(frozen=True, slots=True)
class SrpRsp:
    """``struct srp_rsp`` (36 bytes + response data + sense data) —
    ib_srpt.c ``srpt_build_cmd_rsp`` / ``srpt_build_tskmgmt_rsp``, ib_srp.c
    ``srp_process_rsp``.

    ``data_out_res_cnt`` / ``data_in_res_cnt`` are signed: positive for an
    underflow (``DOUNDER`` / ``DIUNDER``), negative for an overflow
    (``DOOVER`` / ``DIOVER``); the wire carries the magnitude. :attr:`flags`
    is computed from what is present (``RSPVALID`` with response data,
    ``SNSVALID`` with sense data, and the residual signs) unless
    ``raw_flags`` holds a received flags byte that differs from that (kept
    so decode → encode is exact; a value equal to the implied flags is
    stored as ``None``). The flags carry the residuals' signs, so
    :meth:`encode` refuses ``raw_flags`` that contradict one."""

    tag: int = 0
    req_lim_delta: int = 0
    status: int = 0
    data_out_res_cnt: int = 0
    data_in_res_cnt: int = 0
    sense: bytes = b""
    resp_data: bytes = b""
    sol_not: int = 0
    raw_flags: int | None = None

    OPCODE: ClassVar[SrpOpcode] = SrpOpcode.RSP
    SIZE: ClassVar[int] = 36
    """The fixed part."""

    def __post_init__(self) -> None:
        if self.raw_flags is not None and self.raw_flags == self.implied_flags:
            object.__setattr__(self, "raw_flags", None)

    @property
    def implied_flags(self) -> SrpRspFlag:
        """The flags the other fields imply."""
        f = SrpRspFlag(0)
        if self.resp_data:
            f |= SrpRspFlag.RSPVALID
        if self.sense:
            f |= SrpRspFlag.SNSVALID
        if self.data_out_res_cnt > 0:
            f |= SrpRspFlag.DOUNDER
        elif self.data_out_res_cnt < 0:
            f |= SrpRspFlag.DOOVER
        if self.data_in_res_cnt > 0:
            f |= SrpRspFlag.DIUNDER
        elif self.data_in_res_cnt < 0:
            f |= SrpRspFlag.DIOVER
        return f

    @property
    def flags(self) -> SrpRspFlag:
        """The ``flags`` byte sent: ``raw_flags`` if set, else
        :attr:`implied_flags`."""
        return self.implied_flags if self.raw_flags is None else SrpRspFlag(self.raw_flags)

    def encode(self) -> bytes:
        """Header, response data, sense data."""
        what = "SrpRsp"
        tag = _tag_bytes(what, self.tag)
        _check_uint(what, "sol_not", self.sol_not, 8)
        _check_uint(what, "status", self.status, 8)
        _check_sint(what, "req_lim_delta", self.req_lim_delta, 32)
        if self.raw_flags is not None:
            _check_uint(what, "raw_flags", self.raw_flags, 8)
        flags = self.flags
        for name, under, over in (
            ("data_out_res_cnt", SrpRspFlag.DOUNDER, SrpRspFlag.DOOVER),
            ("data_in_res_cnt", SrpRspFlag.DIUNDER, SrpRspFlag.DIOVER),
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or not -_U32 < v < _U32:
                raise SrpEncodeError(f"SrpRsp.{name}={v!r}: its magnitude is 32 bits")
            # The flags give the sign on the wire: underflow first, as srp_process_rsp reads them.
            if v < 0 and (flags & under or not flags & over):
                raise SrpEncodeError(
                    f"SrpRsp.{name}={v}: an overflow, but the flags {flags!r} do not say so"
                )
            if v > 0 and flags & over and not flags & under:
                raise SrpEncodeError(
                    f"SrpRsp.{name}={v}: an underflow, but the flags {flags!r} say overflow"
                )
        head = _RSP.pack(
            self.OPCODE,
            self.sol_not,
            self.req_lim_delta,
            tag,
            int(flags),
            self.status,
            abs(self.data_out_res_cnt),
            abs(self.data_in_res_cnt),
            len(self.sense),
            len(self.resp_data),
        )
        return b"".join((head, bytes(self.resp_data), bytes(self.sense)))

    @classmethod
    def decode(cls, data: BytesLike) -> Self:
        """The IU at the start of ``data``; its response and sense data must
        be there."""
        mv = _mv(data)
        _need("SRP_RSP", mv, cls.SIZE)
        op, sol_not, delta, tag, flags, status, do_raw, di_raw, sense_len, resp_len = (
            _RSP.unpack_from(mv)
        )
        _expect_opcode("SRP_RSP", op, cls.OPCODE)
        end = cls.SIZE + resp_len + sense_len
        _need(
            "SRP_RSP",
            mv,
            end,
            f"for {resp_len} bytes of response data and {sense_len} bytes of sense data",
        )
        rsp = cls(
            tag=_tag(tag),
            req_lim_delta=delta,
            status=status,
            data_out_res_cnt=_residual(do_raw, flags, SrpRspFlag.DOUNDER, SrpRspFlag.DOOVER),
            data_in_res_cnt=_residual(di_raw, flags, SrpRspFlag.DIUNDER, SrpRspFlag.DIOVER),
            sense=bytes(mv[cls.SIZE + resp_len : end]),
            resp_data=bytes(mv[cls.SIZE : cls.SIZE + resp_len]),
            sol_not=sol_not,
        )
        if rsp.implied_flags != flags:
            object.__setattr__(rsp, "raw_flags", flags)
        return rsp


# --- dispatch ------------------------------------------------------------------------------


SrpIu: TypeAlias = (
    SrpLoginReq
    | SrpLoginRsp
    | SrpLoginRej
    | SrpILogout
    | SrpTLogout
    | SrpTskMgmt
    | SrpCmd
    | SrpRsp
    | SrpCredReq
    | SrpCredRsp
    | SrpAerReq
    | SrpAerRsp
)
"""Any SRP information unit."""

_BY_OPCODE: dict[int, type[SrpIu]] = {
    cls.OPCODE: cls
    for cls in (
        SrpLoginReq,
        SrpLoginRsp,
        SrpLoginRej,
        SrpILogout,
        SrpTLogout,
        SrpTskMgmt,
        SrpCmd,
        SrpRsp,
        SrpCredReq,
        SrpCredRsp,
        SrpAerReq,
        SrpAerRsp,
    )
}


def decode_srp_iu(data: BytesLike, imm_data_offset: int | None = None) -> SrpIu:
    """The IU at the start of ``data``, by its opcode byte (the ``switch`` in
    ib_srp.c ``srp_recv_done`` and ib_srpt.c ``srpt_handle_new_iu``, for
    every IU type). ``imm_data_offset`` is passed to :meth:`SrpCmd.decode`.
    A login request here is the 64-byte IB CM form; the RDMA CM form, found
    in CM private data, is :meth:`SrpLoginReq.decode_rdma`. Raises
    :class:`SrpProtocolError` for empty data or an unknown opcode."""
    if len(data) == 0:
        raise SrpProtocolError("SRP IU: no bytes received")
    opcode = data[0]
    cls = _BY_OPCODE.get(opcode)
    if cls is None:
        raise SrpProtocolError(f"SRP IU: unknown opcode {opcode:#04x}")
    if cls is SrpCmd:
        return SrpCmd.decode(data, imm_data_offset)
    return cls.decode(data)
