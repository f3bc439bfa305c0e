"""``pyverbs.wr``: scatter/gather elements and work requests (``struct
ibv_sge``, ``struct ibv_send_wr``, ``struct ibv_recv_wr``).

They are mutable values, chained with ``next_wr`` as in C; ``post_send`` /
``post_recv`` (:mod:`pyverbs.qp`) turn a chain into softrdma work requests.
An SGE's ``addr`` is a user virtual address inside the MR its ``lkey``
names (the MR's iova is the user address, as with ``ibv_reg_mr``).
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING

import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs.base import PyverbsCM, inc_rkey
from pyverbs.pyverbs_error import PyverbsError, PyverbsUserError
from softrdma.memory.mm import UserAddressError

if TYPE_CHECKING:
    from pyverbs.addr import AH
    from pyverbs.mr import MW, MWBindInfo

__all__ = ["SGE", "RecvWR", "SendWR"]


class SGE(PyverbsCM):
    """``struct ibv_sge``: ``SGE(addr, length, lkey)``."""

    def __init__(self, addr: int, length: int, lkey: int) -> None:
        super().__init__()
        self.addr = addr
        self.length = length
        self.lkey = lkey

    def read(self, length: int, offset: int) -> bytes:
        """``length`` bytes at ``addr + offset`` of the process's memory."""
        if length < 0 or offset < 0 or offset + length > self.length:
            raise PyverbsUserError(f"SGE read of {length} bytes at {offset}: outside the SGE")
        try:
            return sim.process().mm.read(self.addr + offset, length)
        except UserAddressError as ex:
            raise PyverbsError(f"SGE read: {ex}", errno.EFAULT) from None

    def __str__(self) -> str:
        return f"SGE: addr {self.addr:#x}, length {self.length}, lkey {self.lkey:#x}"


def _sg_list(sg: list[SGE] | SGE | None, num_sge: int) -> list[SGE]:
    items = [] if sg is None else [sg] if isinstance(sg, SGE) else list(sg)
    if num_sge < 0 or num_sge > len(items):
        raise PyverbsUserError(f"num_sge {num_sge} but {len(items)} SGEs given")
    return items[:num_sge]


class RecvWR(PyverbsCM):
    """``struct ibv_recv_wr``: ``RecvWR(wr_id=0, num_sge=0, sg=None, next_wr=None)``."""

    def __init__(
        self,
        wr_id: int = 0,
        num_sge: int = 0,
        sg: list[SGE] | SGE | None = None,
        next_wr: RecvWR | None = None,
    ) -> None:
        super().__init__()
        self.wr_id = wr_id
        self.sg_list = _sg_list(sg, num_sge)
        self.next_wr = next_wr

    @property
    def num_sge(self) -> int:
        return len(self.sg_list)


class SendWR(PyverbsCM):
    """``struct ibv_send_wr``: ``SendWR(wr_id=0, opcode=IBV_WR_SEND,
    num_sge=0, imm_data=0, sg=None, send_flags=IBV_SEND_SIGNALED,
    next_wr=None)``; ``set_wr_rdma`` / ``set_wr_atomic`` / ``set_wr_ud``
    fill the opcode's part of the union. ``imm_data`` is as C holds it (in
    network byte order: pass ``socket.htonl(value)``); for SEND_WITH_INV and
    LOCAL_INV it is the rkey to invalidate."""

    def __init__(
        self,
        wr_id: int = 0,
        opcode: int = e.IBV_WR_SEND,
        num_sge: int = 0,
        imm_data: int = 0,
        sg: list[SGE] | SGE | None = None,
        send_flags: int = e.IBV_SEND_SIGNALED,
        next_wr: SendWR | None = None,
    ) -> None:
        super().__init__()
        self.wr_id = wr_id
        self.opcode = opcode
        self.imm_data = imm_data
        self.sg_list = _sg_list(sg, num_sge)
        self.send_flags = send_flags
        self.next_wr = next_wr
        self.remote_addr = 0
        self.rkey = 0
        self.compare_add = 0
        self.swap = 0
        self.ah: AH | None = None
        self.remote_qpn = 0
        self.remote_qkey = 0
        self.remote_srqn = 0
        self.bind: tuple[MW, int, MWBindInfo] | None = None

    @property
    def num_sge(self) -> int:
        return len(self.sg_list)

    def set_wr_rdma(self, rkey: int, addr: int) -> None:
        """``wr.rdma``: the remote address and its rkey."""
        self.rkey = rkey
        self.remote_addr = addr

    def set_wr_atomic(self, rkey: int, addr: int, compare_add: int, swap: int = 0) -> None:
        """``wr.atomic``."""
        self.rkey = rkey
        self.remote_addr = addr
        self.compare_add = compare_add
        self.swap = swap

    def set_wr_ud(self, ah: AH, rqpn: int, rqkey: int = 0) -> None:
        """``wr.ud``: the address handle, remote QPN and Q_Key."""
        self.ah = ah
        self.remote_qpn = rqpn
        self.remote_qkey = rqkey

    def set_bind_wr(self, mw: MW, bind_info: MWBindInfo) -> None:
        """``bind_mw`` of an IBV_WR_BIND_MW (type 2 window): the window, the
        bind info and the new key, ``inc_rkey(mw.rkey)``, which ``rkey``
        then reads (as pyverbs' ``rkey`` reads ``bind_mw.rkey``)."""
        self.rkey = inc_rkey(mw.rkey)
        self.bind = (mw, self.rkey, bind_info)

    def set_qp_type_xrc(self, remote_srqn: int) -> None:
        """``qp_type.xrc.remote_srqn``."""
        self.remote_srqn = remote_srqn
