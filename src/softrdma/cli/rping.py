"""``softrdma rping``: rdma-core's ``rping`` (``librdmacm/examples/rping.c``,
rdma-core 44 as Debian bookworm ships it) on softrdma's RDMA CM — the same
flags, defaults, protocol, output lines and exit statuses.

One "ping" (``-C`` of them, forever by default), over an RC connection set
up by the RDMA CM (port space TCP, port 7174):

1. the client fills its *start* buffer with ``rdma-ping-<n>: `` and a run of
   the characters ``A``..``z`` that starts one further on each ping, and
   SENDs a ``struct rping_rdma_info`` advertising it (``__be64 buf; __be32
   rkey; __be32 size``, 16 bytes);
2. the server RDMA-READs the start buffer into its own buffer (``-v``:
   ``server ping data: ...``) and SENDs a "go ahead";
3. the client SENDs an info advertising its *sink* buffer;
4. the server RDMA-WRITEs its buffer there and SENDs "go ahead";
5. the client compares (``-V``: ``data mismatch!``) and prints (``-v``:
   ``ping data: ...``).

The client then disconnects; the server sees DISCONNECTED (``server
DISCONNECT EVENT...`` and ``wait for RDMA_READ_ADV state 10``, as rping
prints them), disconnects and exits, or with ``-P`` serves the next client.

Memory is handed to the device the way a kernel consumer hands it: each
buffer is ``kmalloc``'ed and mapped with ``ib_dma_map_single``, so the
``buf`` that travels in ``rping_rdma_info`` is whatever the device's DMA API
gives — the kernel virtual address on a CPU-copy device (rxe), the bus
address, a swiotlb bounce slot, or an IOVA behind an IOMMU. Where rping
calls ``ibv_reg_mr``, the start and sink buffers are registered for remote
access with a fast-registration MR (``ib_alloc_mr``; the mapping as a
one-entry scatterlist for ``ib_map_mr_sg``, as krping does; an
``IB_WR_REG_MR`` posted unsignaled ahead of the first SEND, under a fresh key
from ``ib_inc_rkey``). Each is granted what its DMA direction allows: the
start buffer ``REMOTE_READ`` (``DMA_TO_DEVICE``), the client's sink
``LOCAL_WRITE | REMOTE_WRITE`` (``DMA_FROM_DEVICE``), the server's buffer
``LOCAL_WRITE`` only (``DMA_BIDIRECTIONAL``; rping grants
``LOCAL_WRITE | REMOTE_READ | REMOTE_WRITE`` on all three). The 16-byte
message buffers use the PD's ``local_dma_lkey``. Everything is unmapped and
freed at the end.

rping runs a main thread, a CM event thread and a CQ thread (one per
connection with ``-P``) that signal each other through semaphores. Here
each is a generator that yields what it waits for, and
:class:`RpingProcess` runs them in turn (:meth:`RpingProcess.step`), so the
same code runs one process over UDP in real time (:func:`run_realtime`) and
several processes together on the in-process fabric's simulated time
(:func:`run_simulated`).

Differences from the C tool: ``-q`` (a self-created QP) is refused, as are
IPv6 addresses (the RDMA CM here is IPv4). An unknown option is argparse's
usage error (exit 2); where rping prints its own usage text (neither ``-s``
nor ``-c``; ``-t``) this prints argparse's, with rping's exit status 22.
Additions: the device options of every softrdma tool (``--ib-dev``, since
``-d`` is rping's debug flag; ``--ip``, by default the server's ``-a`` and
the client's ``-I`` or the address that routes to its ``-a``;
``--udp-port``) and ``--pcap``. A device that cannot be opened is one line
and exit status 19 (rping's ``No RDMA devices were detected`` is
``ENODEV``). A client that ran without error waits up to
:data:`DISCONNECT_GRACE` seconds for its DISCONNECTED event before it
destroys its ID, so ``client DISCONNECT EVENT...`` is printed whenever the
peer answers (rping races the answer against its own teardown, and on a
lossy link may leave its server waiting forever). SIGTERM or SIGINT tears
down as the kernel does for a killed process (the peer gets a DREQ), then
the process dies of the signal.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import errno
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from types import FrameType
from typing import TextIO

from softrdma.cli.netdev import OpenDevice, add_device_options, open_device
from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEvent,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.dma.types import (
    DMA_BIDIRECTIONAL,
    DMA_FROM_DEVICE,
    DMA_TO_DEVICE,
    DmaDirection,
)
from softrdma.errors import SoftRdmaError
from softrdma.fabric.netif import route_source
from softrdma.memory.scatterlist import Scatterlist
from softrdma.time.sim import SimLoop
from softrdma.verbs.cq import CompChannel, CompletionQueue
from softrdma.verbs.device import IbDevice
from softrdma.verbs.dma import (
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_single,
)
from softrdma.verbs.enums import IbAccess, IbQpType, IbSendFlags, IbWcOpcode, IbWcStatus, IbWrOpcode
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.mr import MemoryRegion, ib_inc_rkey
from softrdma.verbs.pd import ProtectionDomain
from softrdma.verbs.qp import IbSigType, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RdmaWR, RecvWR, RegWR, SendWR, Sge

__all__ = [
    "DISCONNECT_GRACE",
    "RPING_BUFSIZE",
    "RPING_MIN_BUFSIZE",
    "RPING_PORT",
    "RpingCb",
    "RpingOptions",
    "RpingProcess",
    "RpingRdmaInfo",
    "TestState",
    "build_parser",
    "ping_pattern",
    "run",
    "run_realtime",
    "run_simulated",
]

RPING_BUFSIZE = 64 * 1024
"""``RPING_BUFSIZE``: sizes up to one less are accepted."""
RPING_MIN_BUFSIZE = 23
"""``RPING_MIN_BUFSIZE`` as the Debian binary has it: ``sizeof`` the
stringified ``INT_MAX`` — the bare name, 8 bytes, since ``rping.c`` does not
include ``<limits.h>`` — plus ``sizeof "rdma-ping-%d: "``."""
RPING_SQ_DEPTH = 16
RPING_PORT = 7174
RPING_MSG_FMT = "rdma-ping-%d: "
RDMA_INFO = struct.Struct(">QII")
"""``struct rping_rdma_info``: ``__be64 buf; __be32 rkey; __be32 size``."""
DISCONNECT_GRACE = 15.0
"""How long a client that ran without error and disconnected waits for its
DISCONNECTED event: long enough for the CM to send a lost DREQ twice more
(every 6.4 s), so the server hears of the end on a lossy network too."""
WAIT_SLICE = 0.2
"""How long the real-time runner sleeps before looking again."""
EXIT_ENODEV = errno.ENODEV


class TestState(enum.IntEnum):
    """``enum test_state``: how the CM and CQ handlers tell the main thread
    what happened (rping prints the number in its ``wait for ... state %d``
    lines)."""

    __test__ = False  # not a pytest class

    IDLE = 1
    CONNECT_REQUEST = 2
    ADDR_RESOLVED = 3
    ROUTE_RESOLVED = 4
    CONNECTED = 5
    RDMA_READ_ADV = 6
    RDMA_READ_COMPLETE = 7
    RDMA_WRITE_ADV = 8
    RDMA_WRITE_COMPLETE = 9
    DISCONNECTED = 10
    ERROR = 11


@dataclass(frozen=True)
class RpingRdmaInfo:
    """``struct rping_rdma_info``: a buffer advertised to the peer."""

    buf: int
    rkey: int
    size: int

    def pack(self) -> bytes:
        """The 16 bytes on the wire (big-endian)."""
        return RDMA_INFO.pack(self.buf, self.rkey, self.size)

    @classmethod
    def unpack(cls, data: bytes) -> RpingRdmaInfo:
        """``be64toh`` / ``be32toh`` of the received message."""
        buf, rkey, size = RDMA_INFO.unpack(data)
        return cls(buf, rkey, size)


def ping_pattern(ping: int, start: int, size: int) -> bytes:
    """The start buffer of ping ``ping`` (``rping_test_client``): the
    ``rdma-ping-%d: `` prefix (cut by ``snprintf`` at ``size - 1``), then the
    characters from ``start`` on, wrapping from ``z`` (122) to ``A`` (65),
    and a NUL in the last byte."""
    head = (RPING_MSG_FMT % ping).encode()
    buf = bytearray(head[: size - 1])
    c = start
    while len(buf) < size:
        buf.append(c)
        c = 65 if c >= 122 else c + 1
    buf[size - 1] = 0
    return bytes(buf)


def _cstr(data: bytes) -> str:
    """``printf("%s")`` of a buffer: up to the first NUL."""
    end = data.find(b"\0")
    return (data if end < 0 else data[:end]).decode("latin-1")


def _ptr(obj: object) -> str:
    """``%p`` of an object (its identity)."""
    return f"{id(obj):#x}"


@dataclass
class RpingOptions:
    """What rping's ``main`` takes from its command line."""

    server: bool
    addr: str = "0.0.0.0"
    """``-a``: the server's bind address, the client's destination."""
    source: str | None = None
    """``-I``: the client's source address."""
    port: int = RPING_PORT
    count: int = 0
    """``-C``: pings (0: forever)."""
    size: int = 64
    verbose: bool = False
    validate: bool = False
    debug: bool = False
    persistent: bool = False


Wait = Callable[[], bool]
"""What a thread waits for: it is resumed once this holds."""
Flow = Generator[Wait, None, int]


class Sem:
    """A ``sem_t``: :meth:`wait` is a ``yield from`` in a thread."""

    def __init__(self, value: int = 0) -> None:
        self.value = value

    def post(self) -> None:
        """``sem_post``."""
        self.value += 1

    def wait(self) -> Generator[Wait, None, None]:
        """``sem_wait``."""
        while self.value == 0:
            yield lambda: self.value > 0
        self.value -= 1


class _Thread:
    """A cooperative thread: a generator resumed whenever what it waits for
    holds."""

    def __init__(self, name: str, flow: Flow) -> None:
        self.name = name
        self.flow = flow
        self.wait: Wait | None = None
        self.done = False
        self.result = 0

    def runnable(self) -> bool:
        """Whether it has not ended and what it waits for holds."""
        return not self.done and (self.wait is None or self.wait())

    def run(self) -> bool:
        """Run until it blocks or ends (its time slice on a CPU); whether it moved."""
        moved = False
        while self.runnable():
            moved = True
            try:
                self.wait = self.flow.send(None)
            except StopIteration as stop:
                self.done = True
                self.result = int(stop.value or 0)
        return moved


class _CompChannel(CompChannel):
    """``ibv_comp_channel``, which ``poll`` on its fd also asks whether an
    event is pending."""

    def __len__(self) -> int:
        return len(self._events)


class RpingError(SoftRdmaError):
    """A buffer that cannot be set up (``rping_setup_buffers``)."""

    def __init__(self, err: int, why: str) -> None:
        super().__init__(why)
        self.errno = err


class DmaBuffer:
    """A buffer as a kernel consumer hands it to a device: ``kzalloc`` +
    ``ib_dma_map_single``; optionally registered for remote access with a
    fast-registration MR (:meth:`register`)."""

    def __init__(self, dev: IbDevice, size: int, direction: DmaDirection, name: str) -> None:
        self.dev = dev
        self.size = size
        self.direction = direction
        self.kva = dev.host.kzalloc(size)
        self.dma = ib_dma_map_single(dev, self.kva, size, direction)
        if ib_dma_mapping_error(dev, self.dma):
            dev.host.kfree(self.kva)
            raise RpingError(errno.ENOMEM, f"{name} reg_mr failed")
        self.mr: MemoryRegion | None = None
        self.key = 0
        """The MR's key once the REG_MR has run (its lkey and rkey)."""

    def register(self, pd: ProtectionDomain, access: IbAccess) -> RegWR:
        """``ib_alloc_mr`` + ``ib_map_mr_sg`` over the mapping (a one-entry
        scatterlist carrying the DMA address, as krping builds it); returns
        the ``IB_WR_REG_MR`` that makes it valid under a fresh key."""
        sgl = Scatterlist.from_buffer(self.dev.host, self.kva, self.size)
        first = sgl[0]
        first.dma_address, first.dma_length = self.dma, self.size
        sgl.nents = 1
        pages = ((self.dma & 4095) + self.size + 4095) // 4096
        mr = self.dev.alloc_mr(pd, pages)
        self.mr = mr
        if mr.map_sg(sgl, 1) != 1:
            raise RpingError(errno.EINVAL, "ib_map_mr_sg failed")
        self.key = ib_inc_rkey(mr.rkey)  # ib_update_fast_reg_key
        return RegWR(0, IbWrOpcode.REG_MR, mr=mr, key=self.key, access=access)

    @property
    def iova(self) -> int:
        """The address a peer (or a local SGE) names the buffer by: the
        MR's iova (``mr->iova``), which is the DMA address."""
        return self.mr.iova if self.mr is not None else self.dma

    def write(self, data: bytes) -> None:
        """The CPU fills the buffer, then gives it to the device
        (``ib_dma_sync_single_for_cpu``, store, ``ib_dma_sync_single_for_device``)."""
        ib_dma_sync_single_for_cpu(self.dev, self.dma, self.size, self.direction)
        self.dev.host.cpu_write(self.kva, data)
        ib_dma_sync_single_for_device(self.dev, self.dma, self.size, self.direction)

    def read(self) -> bytes:
        """The CPU takes the buffer back (``ib_dma_sync_single_for_cpu``),
        reads it, and gives it back (``ib_dma_sync_single_for_device``)."""
        ib_dma_sync_single_for_cpu(self.dev, self.dma, self.size, self.direction)
        data = bytes(self.dev.host.cpu_read(self.kva, self.size))
        ib_dma_sync_single_for_device(self.dev, self.dma, self.size, self.direction)
        return data

    def free(self) -> None:
        """``ibv_dereg_mr`` + ``free``: deregister, unmap, ``kfree``."""
        if self.mr is not None:
            self.dev.dereg_mr(self.mr)
            self.mr = None
        ib_dma_unmap_single(self.dev, self.dma, self.size, self.direction)
        self.dev.host.kfree(self.kva)


class RpingCb:
    """``struct rping_cb``: one connection (a client, a server's, or with
    ``-P`` the listener and a clone per connection) and its handlers."""

    def __init__(self, proc: RpingProcess, opts: RpingOptions) -> None:
        self.proc = proc
        self.opts = opts
        self.server = opts.server
        self.size = opts.size
        self.count = opts.count
        self.state = TestState.IDLE
        self.sem = Sem()
        self.accept_ready = Sem(1)
        self.cm_id: RdmaCmId | None = None
        self.child_cm_id: RdmaCmId | None = None
        self.conn_request: RdmaConnParam | None = None
        self.dev: IbDevice | None = None
        self.pd: ProtectionDomain | None = None
        self.channel: _CompChannel | None = None
        self.cq: CompletionQueue | None = None
        self.qp: QueuePair | None = None
        self.recv_buf: DmaBuffer | None = None
        self.send_buf: DmaBuffer | None = None
        self.rdma_buf: DmaBuffer | None = None
        self.start_buf: DmaBuffer | None = None
        self.pending_reg: list[SendWR] = []
        self.remote_rkey = 0
        self.remote_addr = 0
        self.remote_len = 0
        self.cq_thread: _Thread | None = None
        self.cq_cancel = False
        self.disconnected = False
        self.sent: list[RpingRdmaInfo] = []
        """Every ``rping_rdma_info`` this side SENT (client; with ``record``)."""
        self.received: list[RpingRdmaInfo] = []
        """Every ``rping_rdma_info`` this side received (server; with ``record``)."""
        self.addresses: dict[str, tuple[int, int]] = {}
        """``start_buf`` and ``rdma_buf``: (kernel virtual address, DMA
        address) as set up."""
        self.data: list[bytes] = []
        """The server: what each RDMA READ brought; the client: what each
        RDMA WRITE left in its sink buffer (with ``record``)."""

    # -- output -------------------------------------------------------------------

    def debug(self, text: str) -> None:
        """``DEBUG_LOG`` (printf to stdout under ``-d``)."""
        if self.opts.debug:
            self.proc.print(text)

    def error(self, text: str) -> None:
        """``fprintf(stderr, ...)``."""
        self.proc.eprint(text)

    def perror(self, what: str, e: RdmaCmError | VerbsError) -> None:
        """``perror(what)`` after a librdmacm or verbs call failed."""
        self.proc.eprint(f"{what}: {os.strerror(e.errno)}")

    # -- rping_cma_event_handler ----------------------------------------------------

    def cma_event_handler(self, cma_id: RdmaCmId, ev: RdmaCmEvent) -> Generator[Wait, None, int]:
        """``rping_cma_event_handler``: runs on the CM thread; nonzero makes
        the thread ``exit()`` the process."""
        E = RdmaCmEventType
        name = f"RDMA_CM_EVENT_{ev.event.name}"
        who = "parent" if cma_id is self.cm_id else "child"
        self.debug(f"cma_event type {name} cma_id {_ptr(cma_id)} ({who})")
        t = ev.event
        if t is E.ADDR_RESOLVED:
            self.state = TestState.ADDR_RESOLVED
            try:
                cma_id.resolve_route(2000)
            except RdmaCmError as e:
                self.state = TestState.ERROR
                self.perror("rdma_resolve_route", e)
                self.sem.post()
        elif t is E.ROUTE_RESOLVED:
            self.state = TestState.ROUTE_RESOLVED
            self.sem.post()
        elif t is E.CONNECT_REQUEST:
            yield from self.accept_ready.wait()
            self.state = TestState.CONNECT_REQUEST
            self.child_cm_id = cma_id
            self.conn_request = ev.param
            self.debug(f"child cma {_ptr(cma_id)}")
            self.sem.post()
        elif t is E.CONNECT_RESPONSE:
            self.debug("CONNECT_RESPONSE")
            self.state = TestState.CONNECTED
            self.sem.post()
        elif t is E.ESTABLISHED:
            self.debug("ESTABLISHED")
            if not self.server:  # the server wakes up when the first RECV completes
                self.state = TestState.CONNECTED
            self.sem.post()
        elif t in (E.ADDR_ERROR, E.ROUTE_ERROR, E.CONNECT_ERROR, E.UNREACHABLE, E.REJECTED):
            self.error(f"cma event {name}, error {ev.status}")
            self.sem.post()
            return -1
        elif t is E.DISCONNECTED:
            self.error(f"{'server' if self.server else 'client'} DISCONNECT EVENT...")
            self.state = TestState.DISCONNECTED
            self.disconnected = True
            self.sem.post()
        elif t is E.DEVICE_REMOVAL:
            self.error("cma detected device removal!!!!")
            self.state = TestState.ERROR
            self.sem.post()
            return -1
        else:
            self.error(f"unhandled event: {name}, ignoring")
        return 0

    # -- rping_cq_event_handler -----------------------------------------------------

    def _server_recv(self, byte_len: int) -> int:
        """``server_recv``: the client advertised a buffer."""
        if byte_len != RDMA_INFO.size:
            self.error(f"Received bogus data, size {byte_len}")
            return -1
        assert self.recv_buf is not None
        info = RpingRdmaInfo.unpack(self.recv_buf.read()[: RDMA_INFO.size])
        if self.proc.record:
            self.received.append(info)
        self.remote_rkey, self.remote_addr, self.remote_len = info.rkey, info.buf, info.size
        self.debug(f"Received rkey {info.rkey:x} addr {info.buf:x} len {info.size} from peer")
        if self.state <= TestState.CONNECTED or self.state is TestState.RDMA_WRITE_COMPLETE:
            self.state = TestState.RDMA_READ_ADV
        else:
            self.state = TestState.RDMA_WRITE_ADV
        return 0

    def _client_recv(self, byte_len: int) -> int:
        """``client_recv``: the server's "go ahead"."""
        if byte_len != RDMA_INFO.size:
            self.error(f"Received bogus data, size {byte_len}")
            return -1
        if self.state is TestState.RDMA_READ_ADV:
            self.state = TestState.RDMA_WRITE_ADV
        else:
            self.state = TestState.RDMA_WRITE_COMPLETE
        return 0

    def cq_event_handler(self) -> int:
        """``rping_cq_event_handler``: drain the CQ; nonzero (1 after a
        flushed completion, -1 after an error) ends the CQ thread."""
        cq = self.cq
        assert cq is not None
        flushed = 0
        while len(cq):
            (wc,) = cq.poll(1)
            if wc.status is not IbWcStatus.SUCCESS:
                if wc.status is IbWcStatus.WR_FLUSH_ERR:
                    flushed = 1
                    continue
                self.error(f"cq completion failed status {int(wc.status)}")
                return self._cq_error(-1)
            op = wc.opcode
            if op is IbWcOpcode.SEND:
                self.debug("send completion")
            elif op is IbWcOpcode.RDMA_WRITE:
                self.debug("rdma write completion")
                self.state = TestState.RDMA_WRITE_COMPLETE
                self.sem.post()
            elif op is IbWcOpcode.RDMA_READ:
                self.debug("rdma read completion")
                self.state = TestState.RDMA_READ_COMPLETE
                self.sem.post()
            elif op is IbWcOpcode.RECV:
                self.debug("recv completion")
                ret = (
                    self._server_recv(wc.byte_len)
                    if self.server
                    else self._client_recv(wc.byte_len)
                )
                if ret:
                    self.error(f"recv wc error: {ret}")
                    return self._cq_error(ret)
                ret = self.post_recv()
                if ret:
                    self.error(f"post recv error: {ret}")
                    return self._cq_error(ret)
                self.sem.post()
            else:
                self.debug("unknown!!!!! completion")
                return self._cq_error(-1)
        return flushed

    def at(self, state: TestState) -> bool:
        """``cb->state == state`` (a call: the state changes under a waiting thread)."""
        return self.state is state

    def _cq_error(self, ret: int) -> int:
        """The ``error:`` exit of ``rping_cq_event_handler``."""
        self.state = TestState.ERROR
        self.sem.post()
        return ret

    def cq_thread_flow(self) -> Flow:
        """``cq_thread``: sleep on the completion channel, re-arm, drain."""
        self.debug("cq_thread started.")
        channel, cq, dev = self.channel, self.cq, self.dev
        assert channel is not None and cq is not None and dev is not None
        while True:
            yield lambda: len(channel) > 0 or self.cq_cancel
            if self.cq_cancel:  # pthread_cancel
                return 0
            if channel.get_cq_event(dev, 0.0) is not cq:
                self.error("Unknown CQ!")
                return 0
            cq.req_notify()
            ret = self.cq_event_handler()
            channel.ack_cq_events(1)
            if ret:
                return 0

    # -- setup and teardown ---------------------------------------------------------

    def setup_qp(self, cm_id: RdmaCmId) -> int:
        """``rping_setup_qp``: PD, completion channel, CQ (armed), and the QP
        through ``rdma_create_qp``."""
        dev = cm_id.device
        assert dev is not None
        self.dev = dev
        try:
            self.pd = dev.alloc_pd()
        except VerbsError as e:
            self.error("ibv_alloc_pd failed")
            return e.errno
        self.debug(f"created pd {_ptr(self.pd)}")
        self.channel = _CompChannel()
        self.debug(f"created channel {_ptr(self.channel)}")
        try:
            self.cq = dev.create_cq(RPING_SQ_DEPTH * 2, comp_handler=self.channel)
        except VerbsError as e:
            self.error("ibv_create_cq failed")
            self.pd.dealloc()
            return e.errno
        self.debug(f"created cq {_ptr(self.cq)}")
        self.cq.req_notify()
        init = QpInitAttr(
            IbQpType.RC,
            self.cq,
            self.cq,
            QpCap(max_send_wr=RPING_SQ_DEPTH, max_recv_wr=2, max_send_sge=1, max_recv_sge=1),
            sq_sig_type=IbSigType.REQ_WR,  # ibv's sq_sig_all = 0
        )
        try:
            self.qp = cm_id.create_qp(self.pd, init)
        except (RdmaCmError, VerbsError) as e:
            self.perror("rdma_create_qp", e)
            self.cq.destroy()
            self.pd.dealloc()
            return -1
        self.debug(f"created qp {_ptr(self.qp)}")
        return 0

    def free_qp(self) -> None:
        """``rping_free_qp``."""
        qp, self.qp = self.qp, None
        if qp is not None and not qp.destroyed:
            owner = self.child_cm_id if self.server else self.cm_id
            if owner is not None and owner.qp is qp:
                owner.destroy_qp()
            else:
                qp.destroy()
        if self.cq is not None:
            self.cq.destroy()
            self.cq = None
        self.channel = None
        if self.pd is not None:
            self.pd.dealloc()
            self.pd = None

    def setup_buffers(self) -> int:
        """``rping_setup_buffers``: the message buffers and the RDMA buffers,
        mapped; the RDMA buffers' MRs allocated, their REG_MRs kept for the
        first post."""
        self.debug(f"rping_setup_buffers called on cb {_ptr(self)}")
        dev, pd = self.dev, self.pd
        assert dev is not None and pd is not None
        try:
            self.recv_buf = DmaBuffer(dev, RDMA_INFO.size, DMA_FROM_DEVICE, "recv_buf")
            self.send_buf = DmaBuffer(dev, RDMA_INFO.size, DMA_TO_DEVICE, "send_buf")
            if self.server:
                self.rdma_buf = DmaBuffer(dev, self.size, DMA_BIDIRECTIONAL, "rdma_buf")
                self.pending_reg = [self.rdma_buf.register(pd, IbAccess.LOCAL_WRITE)]
            else:
                self.rdma_buf = DmaBuffer(dev, self.size, DMA_FROM_DEVICE, "rdma_buf")
                self.start_buf = DmaBuffer(dev, self.size, DMA_TO_DEVICE, "start_buf")
                self.pending_reg = [
                    self.start_buf.register(pd, IbAccess.REMOTE_READ),
                    self.rdma_buf.register(pd, IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE),
                ]
        except (RpingError, VerbsError) as e:
            self.error(str(e) if isinstance(e, RpingError) else f"reg_mr failed: {e}")
            self.free_buffers(quiet=True)
            return e.errno
        for name in ("start_buf", "rdma_buf"):
            buf = getattr(self, name)
            if buf is not None:
                self.addresses[name] = (buf.kva, buf.dma)
        self.debug("allocated & registered buffers...")
        return 0

    def free_buffers(self, quiet: bool = False) -> None:
        """``rping_free_buffers``."""
        if not quiet:
            self.debug(f"rping_free_buffers called on cb {_ptr(self)}")
        for name in ("recv_buf", "send_buf", "rdma_buf", "start_buf"):
            buf: DmaBuffer | None = getattr(self, name)
            if buf is not None:
                buf.free()
                setattr(self, name, None)
        self.pending_reg = []

    # -- work requests ----------------------------------------------------------------

    def post_recv(self) -> int:
        """``ibv_post_recv`` of the one receive (``rq_wr``)."""
        buf, qp, pd = self.recv_buf, self.qp, self.pd
        assert buf is not None and qp is not None and pd is not None
        try:
            qp.post_recv(RecvWR(0, (Sge(buf.dma, buf.size, pd.local_dma_lkey),)))
        except VerbsError as e:
            return e.errno
        return 0

    def _post(self, wr: SendWR) -> int:
        """``ibv_post_send``, with the REG_MRs still pending in front."""
        qp = self.qp
        assert qp is not None
        wrs = [*self.pending_reg, wr]
        try:
            qp.post_send(wrs)
        except VerbsError as e:
            return e.errno
        self.pending_reg = []
        return 0

    def post_send(self) -> int:
        """``ibv_post_send(&cb->sq_wr)``: SEND the 16-byte message buffer."""
        buf, pd = self.send_buf, self.pd
        assert buf is not None and pd is not None
        sge = Sge(buf.dma, buf.size, pd.local_dma_lkey)
        return self._post(SendWR(0, IbWrOpcode.SEND, (sge,), send_flags=IbSendFlags.SIGNALED))

    def post_rdma(self, opcode: IbWrOpcode, length: int) -> int:
        """``ibv_post_send(&cb->rdma_sq_wr)``: READ or WRITE between the
        RDMA buffer and the advertised one."""
        buf = self.rdma_buf
        assert buf is not None and buf.mr is not None
        sge = Sge(buf.iova, length, buf.key)
        if opcode is IbWrOpcode.RDMA_WRITE:
            self.debug(f"rdma write from lkey {sge.lkey:x} laddr {sge.addr:x} len {sge.length}")
        wr = RdmaWR(
            0, opcode, (sge,), send_flags=IbSendFlags.SIGNALED,
            remote_addr=self.remote_addr, rkey=self.remote_rkey,
        )  # fmt: skip
        return self._post(wr)

    def format_send(self, buf: DmaBuffer) -> None:
        """``rping_format_send``: advertise ``buf`` in the message buffer."""
        assert buf.mr is not None and self.send_buf is not None
        info = RpingRdmaInfo(buf.iova, buf.key, self.size)
        if self.proc.record:
            self.sent.append(info)
        self.send_buf.write(info.pack())
        self.debug(f"RDMA addr {info.buf:x} rkey {info.rkey:x} len {info.size}")

    def start_cq_thread(self) -> None:
        """``pthread_create(&cb->cqthread, NULL, cq_thread, cb)``."""
        self.cq_thread = self.proc.spawn("cq", self.cq_thread_flow())

    def join_cq_thread(self) -> Generator[Wait, None, None]:
        """``pthread_join(cb->cqthread)``."""
        thread = self.cq_thread
        if thread is not None:
            yield lambda: thread.done

    # -- connecting ---------------------------------------------------------------------

    def accept(self) -> Flow:
        """``rping_accept``: ``rdma_accept`` with what librdmacm takes for a
        NULL ``conn_param`` (the depths the request asked for)."""
        self.debug("accepting client connection request")
        child = self.child_cm_id
        assert child is not None
        req = self.conn_request or RdmaConnParam()
        param = RdmaConnParam(
            responder_resources=req.responder_resources, initiator_depth=req.initiator_depth
        )
        try:
            child.accept(param)
        except RdmaCmError as e:
            self.perror("rdma_accept", e)
            return -1
        yield from self.sem.wait()
        if self.state is TestState.ERROR:
            self.error(f"wait for CONNECTED state {int(self.state)}")
            return -1
        return 0

    def disconnect(self, cm_id: RdmaCmId | None) -> None:
        """``rping_disconnect``: ``rdma_disconnect``."""
        if cm_id is None:
            return
        with contextlib.suppress(RdmaCmError):  # rping ignores what it returns
            cm_id.disconnect()

    # -- the ping loops -------------------------------------------------------------------

    def test_server(self) -> Flow:
        """``rping_test_server``."""
        ret = 0
        while True:
            yield from self.sem.wait()
            if not self.at(TestState.RDMA_READ_ADV):
                self.error(f"wait for RDMA_READ_ADV state {int(self.state)}")
                ret = -1
                break
            self.debug("server received sink adv")
            ret = self.post_rdma(IbWrOpcode.RDMA_READ, self.remote_len)
            if ret:
                self.error(f"post send error {ret}")
                break
            self.debug("server posted rdma read req ")
            yield from self.sem.wait()
            if not self.at(TestState.RDMA_READ_COMPLETE):
                self.error(f"wait for RDMA_READ_COMPLETE state {int(self.state)}")
                ret = -1
                break
            self.debug("server received read complete")
            assert self.rdma_buf is not None
            data = self.rdma_buf.read()
            if self.proc.record:
                self.data.append(data[: self.remote_len])
            if self.opts.verbose:
                self.proc.print(f"server ping data: {_cstr(data)}")
            ret = self.post_send()
            if ret:
                self.error(f"post send error {ret}")
                break
            self.debug("server posted go ahead")
            yield from self.sem.wait()
            if not self.at(TestState.RDMA_WRITE_ADV):
                self.error(f"wait for RDMA_WRITE_ADV state {int(self.state)}")
                ret = -1
                break
            self.debug("server received sink adv")
            nul = data.find(b"\0")
            ret = self.post_rdma(IbWrOpcode.RDMA_WRITE, (len(data) if nul < 0 else nul) + 1)
            if ret:
                self.error(f"post send error {ret}")
                break
            yield from self.sem.wait()
            if not self.at(TestState.RDMA_WRITE_COMPLETE):
                self.error(f"wait for RDMA_WRITE_COMPLETE state {int(self.state)}")
                ret = -1
                break
            self.debug("server rdma write complete ")
            ret = self.post_send()
            if ret:
                self.error(f"post send error {ret}")
                break
            self.debug("server posted go ahead")
        return 0 if self.state is TestState.DISCONNECTED else ret

    def test_client(self) -> Flow:
        """``rping_test_client``."""
        ret = 0
        start = 65
        ping = 0
        start_buf, rdma_buf = self.start_buf, self.rdma_buf
        assert start_buf is not None and rdma_buf is not None
        while not self.count or ping < self.count:
            self.state = TestState.RDMA_READ_ADV
            sent = ping_pattern(ping, start, self.size)
            start = 65 if start >= 122 else start + 1
            start_buf.write(sent)
            self.format_send(start_buf)
            ret = self.post_send()
            if ret:
                self.error(f"post send error {ret}")
                break
            yield from self.sem.wait()
            if not self.at(TestState.RDMA_WRITE_ADV):
                self.error(f"wait for RDMA_WRITE_ADV state {int(self.state)}")
                ret = -1
                break
            self.format_send(rdma_buf)
            ret = self.post_send()
            if ret:
                self.error(f"post send error {ret}")
                break
            yield from self.sem.wait()
            if not self.at(TestState.RDMA_WRITE_COMPLETE):
                self.error(f"wait for RDMA_WRITE_COMPLETE state {int(self.state)}")
                ret = -1
                break
            got = rdma_buf.read()
            if self.proc.record:
                self.data.append(got)
            if self.opts.validate and got != sent:
                self.error("data mismatch!")
                ret = -1
                break
            if self.opts.verbose:
                self.proc.print(f"ping data: {_cstr(got)}")
            ping += 1
        return 0 if self.state is TestState.DISCONNECTED else ret

    # -- the runs -------------------------------------------------------------------------

    def bind_server(self) -> int:
        """``rping_bind_server``: bind and listen (backlog 3)."""
        cm_id = self.cm_id
        assert cm_id is not None
        try:
            cm_id.bind_addr(self.opts.addr, self.opts.port)
        except RdmaCmError as e:
            self.perror("rdma_bind_addr", e)
            return -1
        self.debug("rdma_bind_addr successful")
        self.debug("rdma_listen")
        try:
            cm_id.listen(3)
        except RdmaCmError as e:
            self.perror("rdma_listen", e)
            return -1
        return 0

    def prepare(self, cm_id: RdmaCmId) -> tuple[int, bool]:
        """What ``rping_run_server`` and ``rping_run_client`` both do before
        connecting: the QP, the buffers, the first receive. Returns the
        status and whether the run ends at once (the QP or the buffers
        failed); a failed receive still frees the buffers."""
        ret = self.setup_qp(cm_id)
        if ret:
            self.error(f"setup_qp failed: {ret}")
            return ret, True
        ret = self.setup_buffers()
        if ret:
            self.error(f"rping_setup_buffers failed: {ret}")
            self.free_qp()
            return ret, True
        ret = self.post_recv()
        if ret:
            self.error(f"ibv_post_recv failed: {ret}")
        return ret, False

    def run_server(self) -> Flow:
        """``rping_run_server``: one connection, then return."""
        ret = self.bind_server()
        if ret:
            return ret
        yield from self.sem.wait()
        if not self.at(TestState.CONNECT_REQUEST):
            self.error(f"wait for CONNECT_REQUEST state {int(self.state)}")
            return -1
        assert self.child_cm_id is not None
        ret, fatal = self.prepare(self.child_cm_id)
        if fatal:
            return ret
        if not ret:
            self.start_cq_thread()
            ret = yield from self.accept()
            if ret:
                self.error(f"connect error {ret}")
            else:
                ret = yield from self.test_server()
                if ret:
                    self.error(f"rping server failed: {ret}")
                else:
                    ret = 0
                self.disconnect(self.child_cm_id)
                yield from self.join_cq_thread()
                self.child_cm_id.destroy()
        self.free_buffers()
        self.free_qp()
        return ret

    def persistent_server_thread(self) -> Flow:
        """``rping_persistent_server_thread``: serve one connection of a
        ``-P`` server."""
        child = self.child_cm_id
        assert child is not None
        ret = self.setup_qp(child)
        if ret:
            self.error(f"setup_qp failed: {ret}")
            return 0
        ret = self.setup_buffers()
        if ret:
            self.error(f"rping_setup_buffers failed: {ret}")
            self.free_qp()
            return 0
        ret = self.post_recv()
        if ret:
            self.error(f"ibv_post_recv failed: {ret}")
            self.free_buffers()
            self.free_qp()
            return 0
        self.start_cq_thread()
        ret = yield from self.accept()
        if ret:
            self.error(f"connect error {ret}")
            self.cq_cancel = True
            yield from self.join_cq_thread()
            self.free_buffers()
            self.free_qp()
            return 0
        yield from self.test_server()
        self.disconnect(child)
        yield from self.join_cq_thread()
        self.free_buffers()
        self.free_qp()
        child.destroy()
        return 0

    def clone(self) -> RpingCb:
        """``clone_cb``: a copy for the connection just requested, which
        takes over the child ID's events."""
        cb = RpingCb(self.proc, self.opts)
        cb.state = self.state
        cb.sem = Sem(self.sem.value)
        cb.cm_id = self.cm_id
        cb.child_cm_id = self.child_cm_id
        cb.conn_request = self.conn_request
        assert cb.child_cm_id is not None
        cb.child_cm_id.context = cb
        return cb

    def run_persistent_server(self) -> Flow:
        """``rping_run_persistent_server``: a thread per connection, forever."""
        ret = self.bind_server()
        if ret:
            return ret
        while True:
            yield from self.sem.wait()
            if not self.at(TestState.CONNECT_REQUEST):
                self.error(f"wait for CONNECT_REQUEST state {int(self.state)}")
                return -1
            cb = self.clone()
            self.proc.cbs.append(cb)
            self.accept_ready.post()
            self.proc.spawn("persistent server", cb.persistent_server_thread())

    def bind_client(self) -> Flow:
        """``rping_bind_client``: resolve the address (the route follows
        from the CM handler)."""
        cm_id = self.cm_id
        assert cm_id is not None
        try:
            cm_id.resolve_addr(self.opts.addr, self.opts.port, self.opts.source, 2000)
        except RdmaCmError as e:
            self.perror("rdma_resolve_addr", e)
            return -1
        yield from self.sem.wait()
        if not self.at(TestState.ROUTE_RESOLVED):
            self.error(f"waiting for addr/route resolution state {int(self.state)}")
            return -1
        self.debug("rdma_resolve_addr - rdma_resolve_route successful")
        return 0

    def connect_client(self) -> Flow:
        """``rping_connect_client``."""
        cm_id = self.cm_id
        assert cm_id is not None
        param = RdmaConnParam(
            responder_resources=1, initiator_depth=1, retry_count=7, rnr_retry_count=7
        )
        try:
            cm_id.connect(param)
        except RdmaCmError as e:
            self.perror("rdma_connect", e)
            return -1
        yield from self.sem.wait()
        if not self.at(TestState.CONNECTED):
            self.error(f"wait for CONNECTED state {int(self.state)}")
            return -1
        self.debug("rdma_connect successful")
        return 0

    def run_client(self) -> Flow:
        """``rping_run_client``."""
        ret = yield from self.bind_client()
        if ret:
            return ret
        assert self.cm_id is not None
        ret, fatal = self.prepare(self.cm_id)
        if fatal:
            return ret
        if not ret:
            self.start_cq_thread()
            ret = yield from self.connect_client()
            if ret:
                self.error(f"connect error {ret}")
            else:
                ret = yield from self.test_client()
                if ret:
                    self.error(f"rping client failed: {ret}")
                else:
                    ret = 0
                self.disconnect(self.cm_id)
                if not ret and not self.disconnected:
                    # rping races the DREP against its own teardown: wait for it
                    clock = self.proc.clock
                    deadline = clock() + DISCONNECT_GRACE
                    yield lambda: self.disconnected or clock() >= deadline
            yield from self.join_cq_thread()
        self.free_buffers()
        self.free_qp()
        return ret


class RpingProcess:
    """One rping process on one device: its main thread, its CM event
    thread, and the CQ threads of its connections. :meth:`step` runs
    whatever can run without waiting; :attr:`status` is the exit status
    once :attr:`done`."""

    def __init__(
        self,
        opts: RpingOptions,
        device: IbDevice,
        out: TextIO | None = None,
        err: TextIO | None = None,
        *,
        record: bool = False,
    ) -> None:
        self.opts = opts
        self.device = device
        self.out = sys.stdout if out is None else out
        self.err = sys.stderr if err is None else err
        self.record = record
        """Keep what travelled (:attr:`RpingCb.sent`, ``received``,
        ``data``) for inspection; off for the command, which may run forever."""
        self._lines: list[tuple[TextIO, str]] = []
        self.clock = device.scheduler.time
        self.channel = RdmaEventChannel(device.host)
        self.cb = RpingCb(self, opts)
        self.cbs: list[RpingCb] = [self.cb]
        self.threads: list[_Thread] = []
        self.cm_stop = False
        self.cm_exit: int | None = None
        self.status: int | None = None
        self.killed = False
        self.main = self.spawn("main", self._main())
        self.spawn("cm", self._cm_thread())

    def print(self, text: str) -> None:
        """``printf`` (stdout), written at the end of the step."""
        self._lines.append((self.out, text))

    def eprint(self, text: str) -> None:
        """``fprintf(stderr, ...)``, written at the end of the step."""
        self._lines.append((self.err, text))

    def _write(self) -> None:
        """Write what the step printed, outside the device lock (a slow
        reader must not stall the hardware)."""
        lines, self._lines = self._lines, []
        for stream, text in lines:
            stream.write(text + "\n")
        for stream in {stream for stream, _ in lines}:
            stream.flush()

    def spawn(self, name: str, flow: Flow) -> _Thread:
        """``pthread_create``."""
        thread = _Thread(name, flow)
        self.threads.append(thread)
        return thread

    @property
    def done(self) -> bool:
        """Whether the process has ended (``status`` is its exit status)."""
        return self.status is not None

    def _main(self) -> Flow:
        """``main`` after the options: an ID, the CM thread, the run."""
        cb = self.cb
        cb.cm_id = RdmaCmId(self.channel, cb)
        cb.debug(f"created cm_id {_ptr(cb.cm_id)}")
        if self.opts.server:
            run = cb.run_persistent_server() if self.opts.persistent else cb.run_server()
        else:
            run = cb.run_client()
        ret = yield from run
        cb.debug(f"destroy cm_id {_ptr(cb.cm_id)}")
        cb.cm_id.destroy()
        self.cm_stop = True  # the eventfd write that ends the CM thread
        return ret

    def _cm_thread(self) -> Flow:
        """``cm_thread``: each event to its ID's handler; a handler's error
        ``exit()``s."""
        channel = self.channel
        while True:
            yield lambda: len(channel) > 0 or self.cm_stop
            if self.cm_stop:
                return 0
            ev = channel.get_cm_event(0.0)
            cb = ev.id.context
            if not isinstance(cb, RpingCb):
                continue
            ret = yield from cb.cma_event_handler(ev.id, ev)
            if ret:
                self.cm_exit = ret
                return ret

    def step(self) -> bool:
        """Run every thread until all wait; whether anything ran. Ends the
        process when its main thread returns, or when the CM thread
        ``exit()``ed and nothing can run any more."""
        if self.done:
            return False
        moved = False
        with self.device.lock:
            while True:
                ran = [t.run() for t in list(self.threads)]
                self.threads = [t for t in self.threads if not t.done]
                if not any(ran):
                    break
                moved = True
        self._write()
        if self.main.done:
            self.status = self.main.result & 0xFF
        elif self.cm_exit is not None and not moved:
            self._reap()  # exit() from the CM thread: the kernel cleans up
            self.status = self.cm_exit & 0xFF
        return moved or self.done

    def ready(self) -> bool:
        """Whether some thread can run: what a runner sleeps on (the
        ``poll`` / ``sem_wait`` wake-ups of the C threads)."""
        return not self.done and any(t.runnable() for t in self.threads)

    def kill(self) -> None:
        """The process dies; what the kernel then does for it: its CM IDs
        are destroyed (the peer gets a REJ or DREQ), its verbs objects and
        buffers released."""
        if self.done:
            return
        self.killed = True
        self._reap()
        self.status = 128 + signal.SIGKILL

    def _reap(self) -> None:
        """What the kernel releases when a process ends without cleaning up."""
        with self.device.lock:
            for cb in self.cbs:
                for cm_id in (cb.child_cm_id, cb.cm_id):
                    if cm_id is not None:
                        cm_id.destroy()
                if cb.qp is not None and not cb.qp.destroyed:
                    cb.qp.destroy()
                cb.free_buffers(quiet=True)
                cb.free_qp()
            self.threads = []


def run_simulated(
    procs: Sequence[RpingProcess],
    loop: SimLoop,
    *,
    until: Callable[[], bool] | None = None,
    limit: float = 600.0,
) -> None:
    """Run processes that share the in-process fabric's simulated time until
    all are done or ``until()`` holds; between their steps the simulation
    runs until one of them can go on. Raises :class:`TimeoutError` after
    ``limit`` simulated seconds (rping itself waits forever)."""
    deadline = loop.now + limit

    def stop() -> bool:
        return all(p.done for p in procs) or (until is not None and until())

    def ready() -> bool:
        return any(p.ready() for p in procs) or (until is not None and until())

    while not stop():
        moved = [p.step() for p in procs]
        if any(moved) or stop():
            continue
        if loop.now >= deadline:
            raise TimeoutError(f"rping: still running after {limit} simulated seconds")
        # at most a second at a time, so waits with a deadline see the clock move
        loop.run_until(ready, timeout=min(1.0, deadline - loop.now))


def run_realtime(proc: RpingProcess, interrupted: Callable[[], bool] | None = None) -> int | None:
    """Run one process whose device is on a real-time scheduler (the
    progress thread runs the hardware) to its end and return its exit
    status; None when ``interrupted()`` held first (checked between steps
    and at least every :data:`WAIT_SLICE` seconds)."""
    dev = proc.device
    while not proc.done:
        if interrupted is not None and interrupted():
            return None
        if proc.step():
            continue
        with dev.lock:
            dev.wait(proc.ready, WAIT_SLICE)
    return proc.status


# -- the command line -------------------------------------------------------------------


def _atoi(text: str) -> int:
    """C's ``atoi``: optional blanks and sign, then digits; 0 if none."""
    s = text.lstrip(" \t\n\v\f\r")
    sign = -1 if s[:1] == "-" else 1
    if s[:1] in "+-":
        s = s[1:]
    digits = ""
    for ch in s:
        if not ch.isdigit():
            break
        digits += ch
    value = sign * int(digits) if digits else 0
    return ((value + 2**31) % 2**32) - 2**31  # an int


class _Getopt(argparse.Action):
    """Records rping's options in command-line order: rping acts on them in
    its ``getopt`` loop, where order matters (``-d`` only prints what comes
    after it; a later ``-a`` clears an earlier error)."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        seen = getattr(namespace, "rping_opts", None) or []
        seen.append((self.dest, values))
        namespace.rping_opts = seen


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``rping`` plus the device options and ``--pcap``."""
    p = parser or argparse.ArgumentParser(prog="softrdma rping")
    p.description = "RDMA CM connection and RDMA ping-pong test, like rdma-core's rping."
    add_device_options(p)
    # rping's -d is its debug flag: it takes -d from the device option (--ib-dev)
    g = p.add_argument_group("rping's options", conflict_handler="resolve")
    flags = {
        "-s": ("server", "server side"),
        "-c": ("client", "client side"),
        "-v": ("verbose", "display ping data to stdout"),
        "-V": ("validate", "validate ping data"),
        "-d": ("debug", "debug printfs"),
        "-P": ("persistent", "persistent server mode allowing multiple connections"),
        "-q": ("self_create_qp", "use self-created, self-modified QP (not supported)"),
    }
    for opt, (dest, text) in flags.items():
        g.add_argument(opt, dest=dest, nargs=0, action=_Getopt, help=text)
    values = {
        "-a": ("addr", "ADDR", "address (server: bind to; client: the server's)"),
        "-I": ("source", "ADDR", "source address to bind to for client"),
        "-p": ("port", "PORT", f"port (default {RPING_PORT})"),
        "-C": ("count", "COUNT", "ping count times (default: forever)"),
        "-S": ("size", "SIZE", f"ping data size ({RPING_MIN_BUFSIZE}..{RPING_BUFSIZE - 1})"),
        "-t": ("tos", "TOS", argparse.SUPPRESS),
    }
    for opt, (dest, meta, text) in values.items():
        g.add_argument(opt, dest=dest, metavar=meta, action=_Getopt, help=text)
    p.add_argument("--pcap", metavar="FILE", help="write every frame sent and received")
    p.set_defaults(rping_opts=None)
    p.set_defaults(rping_usage=p.format_usage())  # printed where rping prints its usage
    return p


def _get_addr(text: str, out: TextIO) -> tuple[int, str | None]:
    """``get_addr``: ``getaddrinfo``, the first answer."""
    try:
        infos = socket.getaddrinfo(text, None)
    except socket.gaierror as e:
        out.write(f"getaddrinfo failed ({e.strerror}) - invalid hostname or IP address\n")
        out.flush()
        return int(e.errno or -1), None
    return 0, str(infos[0][4][0])


def parse_options(
    args: argparse.Namespace, usage: str, out: TextIO, err: TextIO
) -> RpingOptions | int:
    """rping's ``getopt`` loop over the options in order: the options, or
    the exit status (messages printed as rping prints them; where rping
    prints its usage on stdout, ``usage`` is printed)."""
    opts = RpingOptions(server=False)
    server: bool | None = None
    ret = 0

    def debug(text: str) -> None:
        if opts.debug:
            out.write(text + "\n")

    for dest, value in args.rping_opts or []:
        if dest == "addr":
            ret, addr = _get_addr(str(value), out)
            if addr is not None:
                opts.addr = addr
        elif dest == "source":
            ret, addr = _get_addr(str(value), out)
            if addr is not None:
                opts.source = addr
        elif dest == "persistent":
            opts.persistent = True
        elif dest == "port":
            opts.port = _atoi(str(value)) & 0xFFFF
            debug(f"port {_atoi(str(value))}")
        elif dest == "server":
            server = True
            debug("server")
        elif dest == "client":
            server = False
            debug("client")
        elif dest == "size":
            opts.size = _atoi(str(value))
            if not RPING_MIN_BUFSIZE <= opts.size <= RPING_BUFSIZE - 1:
                err.write(
                    f"Invalid size {opts.size} (valid range is {RPING_MIN_BUFSIZE} to "
                    f"{RPING_BUFSIZE})\n"
                )
                ret = errno.EINVAL
            else:
                debug(f"size {opts.size}")
        elif dest == "count":
            opts.count = _atoi(str(value))
            if opts.count < 0:
                err.write(f"Invalid count {opts.count}\n")
                ret = errno.EINVAL
            else:
                debug(f"count {opts.count}")
        elif dest == "verbose":
            opts.verbose = True
            debug("verbose")
        elif dest == "validate":
            opts.validate = True
            debug("validate data")
        elif dest == "debug":
            opts.debug = True
        elif dest == "self_create_qp":
            err.write("softrdma rping: -q (a self-created QP) is not supported\n")
            return errno.EINVAL
        else:  # -t: in rping's getopt string, but not in its switch
            out.write(usage)
            return errno.EINVAL
    if ret:
        return ret & 0xFF
    if server is None:
        out.write(usage)
        return errno.EINVAL
    opts.server = server
    for addr in (opts.addr, opts.source):
        if addr is not None and not _is_ipv4(addr):
            err.write(f"softrdma rping: {addr}: IPv6 is not supported (RoCEv2 over IPv4 here)\n")
            return errno.EINVAL
    # a size error cleared by a later -a or -I (rping's ret is overwritten) stays bad
    opts.size = max(opts.size, 1)
    return opts


def _is_ipv4(addr: str) -> bool:
    """Whether ``addr`` (as ``getaddrinfo`` gave it) is an IPv4 address."""
    try:
        return isinstance(ip_address(addr), IPv4Address)
    except ValueError:
        return False


def _local_ip(args: argparse.Namespace, opts: RpingOptions) -> IPv4Address:
    """The address the device binds: ``--ip``; else the server's ``-a``
    (127.0.0.1 for the wildcard), the client's ``-I`` or the address that
    routes to its ``-a``."""
    if args.ip:
        return IPv4Address(args.ip)
    if opts.server:
        addr = IPv4Address(opts.addr)
        return addr if addr != IPv4Address("0.0.0.0") else IPv4Address("127.0.0.1")
    if opts.source is not None:
        return IPv4Address(opts.source)
    return route_source(opts.addr, args.udp_port)


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Run with parsed arguments (rping's ``main``); the exit status as
    rping's: 0, 255 (-1) for a failed run, 22 (EINVAL) for bad options, 19
    (ENODEV) when the device cannot be opened. ``out`` and ``err`` default
    to ``sys.stdout`` and ``sys.stderr``."""
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    usage = getattr(args, "rping_usage", None) or parser.format_usage()
    parsed = parse_options(args, usage, out, err)
    out.flush()
    if isinstance(parsed, int):
        return parsed
    opts = parsed
    try:
        ip = _local_ip(args, opts)
        opened: OpenDevice = open_device(args, ip)
    except KeyError as e:
        print(f"softrdma rping: no device {e.args[0]!r}", file=err)
        return EXIT_ENODEV
    except (SoftRdmaError, OSError, ValueError) as e:
        print(f"softrdma rping: {e}", file=err)
        return EXIT_ENODEV
    try:
        if args.pcap:
            opened.device.link.capture(args.pcap)  # type: ignore[attr-defined]
        return _run_process(opts, opened, out, err)
    finally:
        opened.close()


def _run_process(opts: RpingOptions, opened: OpenDevice, out: TextIO, err: TextIO) -> int:
    """Run the process; on SIGTERM or SIGINT (noted by the handler, acted on
    between steps, never in the middle of one), tear down as the kernel does
    for a killed process, then die of the signal."""
    proc = RpingProcess(opts, opened.device, out, err)
    caught: list[int] = []

    def note(signum: int, frame: FrameType | None) -> None:
        caught.append(signum)

    old = {s: signal.signal(s, note) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        status = run_realtime(proc, lambda: bool(caught))
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if status is not None:
        return status
    proc.kill()
    opened.close()  # the CM's DREQs leave before the device goes
    signal.signal(caught[0], signal.SIG_DFL)
    os.kill(os.getpid(), caught[0])
    return 128 + caught[0]
