"""Verbs constants with the kernel's names and values
(``include/rdma/ib_verbs.h``, ``include/uapi/rdma/ib_user_verbs.h``)."""

from __future__ import annotations

import enum
import errno

from softrdma.verbs.errors import VerbsError


class IbWrOpcode(enum.IntEnum):
    """``enum ib_wr_opcode``."""

    RDMA_WRITE = 0
    RDMA_WRITE_WITH_IMM = 1
    SEND = 2
    SEND_WITH_IMM = 3
    RDMA_READ = 4
    ATOMIC_CMP_AND_SWP = 5
    ATOMIC_FETCH_AND_ADD = 6
    LOCAL_INV = 7
    BIND_MW = 8
    SEND_WITH_INV = 9
    FLUSH = 14
    """``IB_WR_FLUSH`` (= ``IB_UVERBS_WR_FLUSH``): RC FLUSH, IBTA annex A19."""
    ATOMIC_WRITE = 15
    """``IB_WR_ATOMIC_WRITE`` (= ``IB_UVERBS_WR_ATOMIC_WRITE``): RC ATOMIC WRITE."""
    REG_MR = 0x20


class IbWcOpcode(enum.IntEnum):
    """``enum ib_wc_opcode``; receive opcodes have bit 7 set."""

    SEND = 0
    RDMA_WRITE = 1
    RDMA_READ = 2
    COMP_SWAP = 3
    FETCH_ADD = 4
    BIND_MW = 5
    LOCAL_INV = 6
    FLUSH = 8
    """``IB_WC_FLUSH`` (= ``IB_UVERBS_WC_FLUSH``)."""
    ATOMIC_WRITE = 9
    """``IB_WC_ATOMIC_WRITE`` (= ``IB_UVERBS_WC_ATOMIC_WRITE``)."""
    REG_MR = 10
    RECV = 1 << 7
    RECV_RDMA_WITH_IMM = (1 << 7) + 1


class IbWcStatus(enum.IntEnum):
    """``enum ib_wc_status``."""

    SUCCESS = 0
    LOC_LEN_ERR = 1
    LOC_QP_OP_ERR = 2
    LOC_EEC_OP_ERR = 3
    LOC_PROT_ERR = 4
    WR_FLUSH_ERR = 5
    MW_BIND_ERR = 6
    BAD_RESP_ERR = 7
    LOC_ACCESS_ERR = 8
    REM_INV_REQ_ERR = 9
    REM_ACCESS_ERR = 10
    REM_OP_ERR = 11
    RETRY_EXC_ERR = 12
    RNR_RETRY_EXC_ERR = 13
    LOC_RDD_VIOL_ERR = 14
    REM_INV_RD_REQ_ERR = 15
    REM_ABORT_ERR = 16
    INV_EECN_ERR = 17
    INV_EEC_STATE_ERR = 18
    FATAL_ERR = 19
    RESP_TIMEOUT_ERR = 20
    GENERAL_ERR = 21

    @property
    def kernel_name(self) -> str:
        return "IB_WC_" + self.name


class IbWcFlags(enum.IntFlag):
    """``enum ib_wc_flags``."""

    GRH = 1
    WITH_IMM = 2
    WITH_INVALIDATE = 4
    IP_CSUM_OK = 8
    WITH_SMAC = 16
    WITH_VLAN = 32
    WITH_NETWORK_HDR_TYPE = 64


class IbSendFlags(enum.IntFlag):
    """``enum ib_send_flags``."""

    FENCE = 1
    SIGNALED = 2
    SOLICITED = 4
    INLINE = 8


class IbAccess(enum.IntFlag):
    """``enum ib_access_flags``."""

    LOCAL_WRITE = 1
    REMOTE_WRITE = 2
    REMOTE_READ = 4
    REMOTE_ATOMIC = 8
    MW_BIND = 16
    ZERO_BASED = 32
    FLUSH_GLOBAL = 1 << 8
    """``IB_ACCESS_FLUSH_GLOBAL``: the target of FLUSH with placement type global."""
    FLUSH_PERSISTENT = 1 << 9
    """``IB_ACCESS_FLUSH_PERSISTENT``: FLUSH to persistence (persistent memory only)."""


class IbFlushType(enum.IntFlag):
    """``enum ib_placement_type`` (ib_user_verbs.h; IBTA A19.4.1.1): the FETH
    placement type of a FLUSH."""

    GLOBAL = 1 << 0
    PERSISTENT = 1 << 1


class IbFlushLevel(enum.IntEnum):
    """``enum ib_selectivity_level`` (ib_user_verbs.h; IBTA A19.4.1.2): what a
    FLUSH covers, its RETH range or the whole MR."""

    RANGE = 0
    MR = 1


IB_DEVICE_FLUSH_GLOBAL = 1 << 38
"""``IB_DEVICE_FLUSH_GLOBAL`` (= ``IB_UVERBS_DEVICE_FLUSH_GLOBAL``): the device
executes FLUSH with placement type global."""
IB_DEVICE_FLUSH_PERSISTENT = 1 << 39
"""``IB_DEVICE_FLUSH_PERSISTENT``: FLUSH to persistence."""
IB_DEVICE_ATOMIC_WRITE = 1 << 40
"""``IB_DEVICE_ATOMIC_WRITE``: the device executes RC ATOMIC WRITE."""


class IbQpType(enum.IntEnum):
    """``enum ib_qp_type``."""

    SMI = 0
    GSI = 1
    RC = 2
    UC = 3
    UD = 4
    XRC_INI = 9
    XRC_TGT = 10


class IbQpState(enum.IntEnum):
    """``enum ib_qp_state``."""

    RESET = 0
    INIT = 1
    RTR = 2
    RTS = 3
    SQD = 4
    SQE = 5
    ERR = 6


class IbQpAttrMask(enum.IntFlag):
    """``enum ib_qp_attr_mask``."""

    STATE = 1
    CUR_STATE = 1 << 1
    EN_SQD_ASYNC_NOTIFY = 1 << 2
    ACCESS_FLAGS = 1 << 3
    PKEY_INDEX = 1 << 4
    PORT = 1 << 5
    QKEY = 1 << 6
    AV = 1 << 7
    PATH_MTU = 1 << 8
    TIMEOUT = 1 << 9
    RETRY_CNT = 1 << 10
    RNR_RETRY = 1 << 11
    RQ_PSN = 1 << 12
    MAX_QP_RD_ATOMIC = 1 << 13
    ALT_PATH = 1 << 14
    MIN_RNR_TIMER = 1 << 15
    SQ_PSN = 1 << 16
    MAX_DEST_RD_ATOMIC = 1 << 17
    PATH_MIG_STATE = 1 << 18
    CAP = 1 << 19
    DEST_QPN = 1 << 20


class IbMtu(enum.IntEnum):
    """``enum ib_mtu``."""

    MTU_256 = 1
    MTU_512 = 2
    MTU_1024 = 3
    MTU_2048 = 4
    MTU_4096 = 5

    @property
    def size(self) -> int:
        """``ib_mtu_enum_to_int``."""
        return 128 << self.value

    @classmethod
    def from_size(cls, size: int) -> IbMtu:
        """``ib_mtu_int_to_enum``: the largest MTU not above ``size``."""
        for mtu in reversed(cls):
            if mtu.size <= size:
                return mtu
        raise VerbsError(errno.EINVAL, f"no IB MTU fits in {size} bytes")


class IbEventType(enum.IntEnum):
    """``enum ib_event_type`` (the asynchronous events softrdma raises)."""

    CQ_ERR = 0
    QP_FATAL = 1
    QP_REQ_ERR = 2
    QP_ACCESS_ERR = 3
    COMM_EST = 4
    SQ_DRAINED = 5
    SRQ_ERR = 14
    SRQ_LIMIT_REACHED = 15
    LAST_WQE_REACHED = 16


class IbMwType(enum.IntEnum):
    """``enum ib_mw_type``."""

    TYPE_1 = 1
    TYPE_2 = 2


class IbSrqType(enum.IntEnum):
    """``enum ib_srq_type``."""

    BASIC = 0
    XRC = 1
    TM = 2


class IbSrqAttrMask(enum.IntFlag):
    """``enum ib_srq_attr_mask``: what ``ib_modify_srq`` changes."""

    MAX_WR = 1 << 0
    LIMIT = 1 << 1


class IbMrType(enum.IntEnum):
    """``enum ib_mr_type``."""

    MEM_REG = 0
    SG_GAPS = 1
    DM = 2
    USER = 3
    DMA = 4


class IbPdFlags(enum.IntFlag):
    """``enum ib_pd_flags``."""

    UNSAFE_GLOBAL_RKEY = 1


# The kernel's own spellings, for code ported from C.
IB_WR_RDMA_WRITE = IbWrOpcode.RDMA_WRITE
IB_WR_RDMA_WRITE_WITH_IMM = IbWrOpcode.RDMA_WRITE_WITH_IMM
IB_WR_SEND = IbWrOpcode.SEND
IB_WR_SEND_WITH_IMM = IbWrOpcode.SEND_WITH_IMM
IB_WR_RDMA_READ = IbWrOpcode.RDMA_READ
IB_WR_ATOMIC_CMP_AND_SWP = IbWrOpcode.ATOMIC_CMP_AND_SWP
IB_WR_ATOMIC_FETCH_AND_ADD = IbWrOpcode.ATOMIC_FETCH_AND_ADD
IB_WR_LOCAL_INV = IbWrOpcode.LOCAL_INV
IB_WR_SEND_WITH_INV = IbWrOpcode.SEND_WITH_INV
IB_WR_REG_MR = IbWrOpcode.REG_MR
IB_WR_FLUSH = IbWrOpcode.FLUSH
IB_WR_ATOMIC_WRITE = IbWrOpcode.ATOMIC_WRITE
IB_WC_FLUSH = IbWcOpcode.FLUSH
IB_WC_ATOMIC_WRITE = IbWcOpcode.ATOMIC_WRITE

IB_WC_SUCCESS = IbWcStatus.SUCCESS
IB_WC_LOC_LEN_ERR = IbWcStatus.LOC_LEN_ERR
IB_WC_LOC_QP_OP_ERR = IbWcStatus.LOC_QP_OP_ERR
IB_WC_LOC_PROT_ERR = IbWcStatus.LOC_PROT_ERR
IB_WC_WR_FLUSH_ERR = IbWcStatus.WR_FLUSH_ERR
IB_WC_BAD_RESP_ERR = IbWcStatus.BAD_RESP_ERR
IB_WC_LOC_ACCESS_ERR = IbWcStatus.LOC_ACCESS_ERR
IB_WC_REM_INV_REQ_ERR = IbWcStatus.REM_INV_REQ_ERR
IB_WC_REM_ACCESS_ERR = IbWcStatus.REM_ACCESS_ERR
IB_WC_REM_OP_ERR = IbWcStatus.REM_OP_ERR
IB_WC_RETRY_EXC_ERR = IbWcStatus.RETRY_EXC_ERR
IB_WC_RNR_RETRY_EXC_ERR = IbWcStatus.RNR_RETRY_EXC_ERR
IB_WC_GENERAL_ERR = IbWcStatus.GENERAL_ERR

IB_ACCESS_LOCAL_WRITE = IbAccess.LOCAL_WRITE
IB_ACCESS_REMOTE_WRITE = IbAccess.REMOTE_WRITE
IB_ACCESS_REMOTE_READ = IbAccess.REMOTE_READ
IB_ACCESS_REMOTE_ATOMIC = IbAccess.REMOTE_ATOMIC
IB_ACCESS_FLUSH_GLOBAL = IbAccess.FLUSH_GLOBAL
IB_ACCESS_FLUSH_PERSISTENT = IbAccess.FLUSH_PERSISTENT

IB_FLUSH_GLOBAL = IbFlushType.GLOBAL
IB_FLUSH_PERSISTENT = IbFlushType.PERSISTENT
IB_FLUSH_RANGE = IbFlushLevel.RANGE
IB_FLUSH_MR = IbFlushLevel.MR

IB_SEND_FENCE = IbSendFlags.FENCE
IB_SEND_SIGNALED = IbSendFlags.SIGNALED
IB_SEND_SOLICITED = IbSendFlags.SOLICITED
IB_SEND_INLINE = IbSendFlags.INLINE

IB_PD_UNSAFE_GLOBAL_RKEY = IbPdFlags.UNSAFE_GLOBAL_RKEY
