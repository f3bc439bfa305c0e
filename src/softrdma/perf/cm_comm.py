"""perftest's out-of-band exchange over the RDMA CM (``-z``, and ``-R``,
which perftest 6.06 runs the same way): ``create_comm_struct``,
``establish_connection``, ``rdma_client_connect`` / ``rdma_server_connect``
on the ``comm`` context, ``ctx_xchg_data_rdma``, ``rdma_write_keys`` /
``rdma_read_keys``; on softrdma's RDMA CM (:mod:`softrdma.cm`, librdmacm's
counterpart).

Instead of a TCP connection, the two sides connect one RC QP with the RDMA
CM on the test's port (RDMA_PS_TCP; its port space is not the kernel's TCP
one), with no private data after the ``cma_hdr`` and no READ or atomic
depth. Each message of the exchange (:mod:`softrdma.perf.oob`) is then one
SEND of exactly its size, received into a buffer of at least
``sizeof(struct pingpong_dest)`` (56 bytes) that is reposted after each
message; the sender waits for its SEND to complete. The server posts its
receive before ``rdma_accept``, the client before ``rdma_connect``.
"""

from __future__ import annotations

import contextlib
import time

from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.perf.context import PerfError
from softrdma.verbs.cq import CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import ib_dma_alloc_coherent, ib_dma_free_coherent
from softrdma.verbs.enums import IbQpType, IbSendFlags, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR, Sge

__all__ = ["CM_TIMEOUT", "NUM_OF_RETRIES", "RETRY_DELAY", "CmComm", "expect_event", "resolve"]

SYNC_SPEC_ID = 5
"""perftest's ``SYNC_SPEC_ID``: the wr_id of the exchange's SEND and RECV."""
NUM_OF_RETRIES = 10
"""``retry_rdma_connect``: the client tries this often, 100 ms apart (the
server may not listen yet)."""
RETRY_DELAY = 0.1
CM_TIMEOUT = 30.0
"""How long one wait for a CM event may take."""
RESOLVE_TIMEOUT_MS = 2000
_SEND_OFF, _RECV_OFF, _BUF = 0, 64, 128


def expect_event(channel: RdmaEventChannel, want: RdmaCmEventType, timeout: float) -> None:
    """``rdma_get_cm_event`` and perftest's check of what came."""
    try:
        ev = channel.get_cm_event(timeout)
    except RdmaCmError:
        raise PerfError(f"rdma_get_cm_events failed (nothing in {timeout:.0f} s)") from None
    if ev.event != want:
        raise PerfError(f"unexpected CM event {int(ev.event)}")


def resolve(cid: RdmaCmId, server: str, port: int, local_ip: str | None) -> None:
    """``rdma_resolve_addr`` + ``rdma_resolve_route``, waited for."""
    try:
        cid.resolve_addr(server, port, src=local_ip, timeout_ms=RESOLVE_TIMEOUT_MS)
    except RdmaCmError as e:
        raise PerfError(f"rdma_resolve_addr failed: {e}") from None
    expect_event(cid.channel, RdmaCmEventType.ADDR_RESOLVED, CM_TIMEOUT)
    cid.resolve_route(RESOLVE_TIMEOUT_MS)
    expect_event(cid.channel, RdmaCmEventType.ROUTE_RESOLVED, CM_TIMEOUT)


class CmComm:
    """The exchange's RDMA CM connection (``struct perftest_comm`` with
    ``use_rdma_cm``): :meth:`client` or :meth:`server` to connect, then
    :meth:`send` / :meth:`recv` one message at a time."""

    def __init__(self, dev: IbDevice) -> None:
        self.dev = dev
        self.channel = RdmaEventChannel(dev.host)
        self.cm_id: RdmaCmId | None = None
        self.qp: QueuePair | None = None
        self.pd = dev.alloc_pd()
        # a send and a receive CQ, as perftest's: the peer's answer may
        # complete before this side's SEND does
        self.send_cq: CompletionQueue = dev.create_cq(2)
        self.recv_cq: CompletionQueue = dev.create_cq(2)
        got = ib_dma_alloc_coherent(dev, _BUF)
        if got is None:
            self.close()
            raise PerfError("Couldn't allocate the rdma_cm exchange buffer")
        self.kva, self.dma = got
        self.closed = False

    # -- connecting ---------------------------------------------------------------------

    def _create_qp(self, cid: RdmaCmId) -> None:
        init = QpInitAttr(IbQpType.RC, self.send_cq, self.recv_cq,
                          QpCap(max_send_wr=1, max_recv_wr=1, max_send_sge=1, max_recv_sge=1),
                          sq_sig_type=IbSigType.REQ_WR)  # fmt: skip
        try:
            self.qp = cid.create_qp(self.pd, init)
        except RdmaCmError as e:
            raise PerfError(f" Couldn't create the rdma_cm QP: {e}") from None
        self.cm_id = cid
        self._post_recv()  # post_one_recv_wqe, before the connection is up

    def client(self, server: str, port: int, local_ip: str | None) -> None:
        """``rdma_client_connect`` on the comm context, retried while the
        server does not listen yet (a REJ)."""
        last = ""
        for _ in range(NUM_OF_RETRIES):
            cid = RdmaCmId(self.channel)
            resolve(cid, server, port, local_ip)
            self._create_qp(cid)
            try:
                cid.connect(RdmaConnParam(responder_resources=0, initiator_depth=0))
            except RdmaCmError as e:
                raise PerfError(f"Function rdma_connect failed: {e}") from None
            try:
                ev = self.channel.get_cm_event(CM_TIMEOUT)
            except RdmaCmError:
                raise PerfError(" Unable to perform rdma_client function") from None
            if ev.event == RdmaCmEventType.ESTABLISHED:
                return
            last = f"Unexpected CM event bl blka {int(ev.event)}"
            self._drop_id()
            time.sleep(RETRY_DELAY)
        raise PerfError(f"{last}\n Unable to perform rdma_client function")

    def server(self, port: int, local_ip: str | None, timeout: float) -> None:
        """``rdma_server_connect`` on the comm context: listen on ``port``,
        take one connection request and accept it."""
        listener = RdmaCmId(self.channel)
        try:
            try:
                listener.bind_addr(local_ip or "0.0.0.0", port)
            except RdmaCmError as e:
                raise PerfError(f" rdma_bind_addr failed: {e}") from None
            listener.listen(1)
            try:
                ev = self.channel.get_cm_event(timeout)
            except RdmaCmError:
                raise PerfError(f"No client connected to port {port} in {timeout:.0f} s") from None
            if ev.event != RdmaCmEventType.CONNECT_REQUEST:
                raise PerfError(f"bad event waiting for connect request {int(ev.event)}")
        finally:
            listener.destroy()  # perftest destroys its listening ID after the request
        self._create_qp(ev.id)
        try:
            ev.id.accept(RdmaConnParam(responder_resources=0, initiator_depth=0))
        except RdmaCmError as e:
            raise PerfError(f"Function rdma_accept failed: {e}") from None

    # -- messages -----------------------------------------------------------------------

    def _post_recv(self) -> None:
        assert self.qp is not None
        # room for sizeof(struct pingpong_dest) and more, should a peer's be larger
        sge = Sge(self.dma + _RECV_OFF, _BUF - _RECV_OFF, self.pd.local_dma_lkey)
        try:
            self.qp.post_recv(RecvWR(SYNC_SPEC_ID, (sge,)))
        except VerbsError as e:
            raise PerfError(f"Function ibv_post_recv failed for RDMA_CM QP: {e}") from None

    def send(self, msg: bytes) -> None:
        """``rdma_write_data``: one signalled SEND of ``msg``, waited for."""
        assert self.qp is not None and len(msg) <= _RECV_OFF
        self.dev.host.cpu_write(self.kva + _SEND_OFF, msg)
        sge = Sge(self.dma + _SEND_OFF, len(msg), self.pd.local_dma_lkey)
        wr = SendWR(SYNC_SPEC_ID, IbWrOpcode.SEND, (sge,), IbSendFlags.SIGNALED)
        try:
            self.qp.post_send(wr)
        except VerbsError as e:
            raise PerfError(f"Function ibv_post_send failed: {e}") from None
        self._wait(IbWcOpcode.SEND, CM_TIMEOUT)

    def recv(self, timeout: float) -> bytes:
        """``rdma_read_data``: the next message (its length as sent), then
        the receive reposted; ``b""`` when the connection failed."""
        wc_len = self._wait(IbWcOpcode.RECV, timeout)
        if wc_len < 0:
            return b""
        data = bytes(self.dev.host.cpu_read(self.kva + _RECV_OFF, wc_len))
        self._post_recv()
        return data

    def _wait(self, opcode: IbWcOpcode, timeout: float) -> int:
        cq = self.recv_cq if opcode == IbWcOpcode.RECV else self.send_cq
        end = time.monotonic() + timeout
        while True:
            for wc in cq.poll(1):
                if wc.status != IbWcStatus.SUCCESS:
                    if opcode == IbWcOpcode.RECV:
                        return -1  # flushed: the peer went away
                    raise PerfError(f" Bad wc status {int(wc.status)}")
                if wc.opcode != opcode:
                    raise PerfError(f"Bad wc status -- {int(wc.status)} -- {wc.wr_id} ")
                return wc.byte_len
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError
            cq.wait(min(left, 0.05))

    # -- teardown -----------------------------------------------------------------------

    def _drop_id(self) -> None:
        if self.cm_id is not None:
            self.cm_id.destroy()
            self.cm_id = None
        if self.qp is not None:
            self.qp.destroy()
            self.qp = None

    def close(self) -> None:
        """Disconnect and free everything (``destroy_ctx`` of the comm)."""
        self.closed = True
        if self.cm_id is not None:
            with contextlib.suppress(RdmaCmError):  # not connected, or the peer left first
                self.cm_id.disconnect()
        self._drop_id()
        with self.dev.lock:
            self.send_cq.destroy()
            self.recv_cq.destroy()
            if hasattr(self, "kva"):
                ib_dma_free_coherent(self.dev, _BUF, self.kva, self.dma)
                del self.kva
            self.pd.dealloc()
