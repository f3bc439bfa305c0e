"""``softrdma rc-pingpong``: rdma-core's ``ibv_rc_pingpong`` on a softrdma
device over real UDP — same flags, defaults, out-of-band exchange and
output, so either end can be the real tool on a Linux host with rxe.

The exchange (``libibverbs/examples/rc_pingpong.c``): TCP port 18515; the
client connects and writes its 52-byte ``"%04x:%06x:%06x:%s"`` message
(LID, QPN, PSN, GID as 32 hex digits, NUL-terminated), reads the server's,
and writes ``"done"``. The server reads the client's message, connects its
QP, then answers with its own. Then the client SENDs ``size`` bytes, each
side answers every receive with a SEND of its buffer, ``iters`` times.

Differences from the C tool, all additions: ``--ip`` chooses the local
RoCE address (default: the one the kernel would use to reach the peer;
a server without ``--ip`` takes the address the client connected to);
``--pcap`` records every frame; ``--counters`` prints the device's
counters at exit; ``-c`` checks the whole received buffer (the C tool
checks the first byte of each page) and also on the client, and exits 1
when a check fails. Polling sleeps in :meth:`CompletionQueue.wait` instead
of spinning.
"""

from __future__ import annotations

import argparse
import random
import socket
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from typing import TextIO

from softrdma.cli.netdev import (
    OpenDevice,
    add_device_options,
    local_address,
    open_device,
    parse_int,
)
from softrdma.dma.types import DMA_BIDIRECTIONAL
from softrdma.errors import SoftRdmaError
from softrdma.memory.layout import PAGE_SIZE
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.cq import CompChannel, CompletionQueue
from softrdma.verbs.dma import (
    ib_dma_map_single,
    ib_dma_mapping_error,
    ib_dma_sync_single_for_cpu,
    ib_dma_sync_single_for_device,
    ib_dma_unmap_single,
)
from softrdma.verbs.enums import (
    IbAccess,
    IbMtu,
    IbQpAttrMask,
    IbQpState,
    IbQpType,
    IbSendFlags,
    IbWcStatus,
    IbWrOpcode,
)
from softrdma.verbs.errors import VerbsError
from softrdma.verbs.qp import QpAttr, QpCap, QpInitAttr, QueuePair
from softrdma.verbs.wr import RecvWR, SendWR, Sge, WorkCompletion

__all__ = ["IBV_WC_STATUS_STR", "build_parser", "run"]

PINGPONG_RECV_WRID = 1
PINGPONG_SEND_WRID = 2
#: sizeof "0000:000000:000000:00000000000000000000000000000000"
MSG_SIZE = 52
DONE = b"done\0"
#: How long one wait for a completion may sleep before polling again.
WAIT_SLICE = 1.0
#: The out-of-band exchange must finish within this many seconds.
EXCHANGE_TIMEOUT = 60.0

#: libibverbs ``ibv_wc_status_str``.
IBV_WC_STATUS_STR: dict[IbWcStatus, str] = {
    IbWcStatus.SUCCESS: "success",
    IbWcStatus.LOC_LEN_ERR: "local length error",
    IbWcStatus.LOC_QP_OP_ERR: "local QP operation error",
    IbWcStatus.LOC_EEC_OP_ERR: "local EE context operation error",
    IbWcStatus.LOC_PROT_ERR: "local protection error",
    IbWcStatus.WR_FLUSH_ERR: "Work Request Flushed Error",
    IbWcStatus.MW_BIND_ERR: "memory management operation error",
    IbWcStatus.BAD_RESP_ERR: "bad response error",
    IbWcStatus.LOC_ACCESS_ERR: "local access error",
    IbWcStatus.REM_INV_REQ_ERR: "remote invalid request error",
    IbWcStatus.REM_ACCESS_ERR: "remote access error",
    IbWcStatus.REM_OP_ERR: "remote operation error",
    IbWcStatus.RETRY_EXC_ERR: "transport retry counter exceeded",
    IbWcStatus.RNR_RETRY_EXC_ERR: "RNR retry counter exceeded",
    IbWcStatus.LOC_RDD_VIOL_ERR: "local RDD violation error",
    IbWcStatus.REM_INV_RD_REQ_ERR: "remote invalid RD request",
    IbWcStatus.REM_ABORT_ERR: "aborted error",
    IbWcStatus.INV_EECN_ERR: "invalid EE context number",
    IbWcStatus.INV_EEC_STATE_ERR: "invalid EE context state",
    IbWcStatus.FATAL_ERR: "fatal error",
    IbWcStatus.RESP_TIMEOUT_ERR: "response timeout error",
    IbWcStatus.GENERAL_ERR: "general error",
}


class ToolError(SoftRdmaError):
    """A failure the tool reports as one line on stderr and exit status 1."""


@dataclass(frozen=True)
class Dest:
    """``struct pingpong_dest``."""

    lid: int
    qpn: int
    psn: int
    gid: bytes

    def wire(self) -> bytes:
        """The 52-byte message (``gid_to_wire_gid``: each 32-bit word of the
        GID as 8 hex digits)."""
        text = f"{self.lid:04x}:{self.qpn:06x}:{self.psn:06x}:{self.gid.hex()}"
        return text.encode() + b"\0"

    @classmethod
    def parse(cls, msg: bytes) -> Dest:
        """``sscanf(msg, "%x:%x:%x:%s")`` + ``wire_gid_to_gid``."""
        try:
            lid, qpn, psn, gid = msg.split(b"\0", 1)[0].decode().split(":")
            raw = bytes.fromhex(gid[:32].ljust(32, "0"))
            return cls(int(lid, 16), int(qpn, 16), int(psn, 16), raw)
        except (ValueError, UnicodeDecodeError):
            raise ToolError(f"Couldn't parse remote address {msg!r}") from None


def gid_str(gid: bytes) -> str:
    """``inet_ntop(AF_INET6, gid)`` as glibc prints it: IPv4-mapped GIDs in
    dotted form (``::ffff:10.77.0.2``)."""
    ip = IPv6Address(gid)
    return f"::ffff:{ip.ipv4_mapped}" if ip.ipv4_mapped is not None else str(ip)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``ibv_rc_pingpong`` plus ``--ip``, ``--pcap`` and
    ``--counters``."""
    p = parser or argparse.ArgumentParser(prog="softrdma rc-pingpong")
    p.description = "Ping-pong SENDs over an RC QP, like rdma-core's ibv_rc_pingpong."
    p.add_argument("servername", nargs="?", help="connect to the server at this host")
    p.add_argument("-p", "--port", type=parse_int, default=18515, help="TCP port (default 18515)")
    p.add_argument("-i", "--ib-port", type=parse_int, default=1, help="device port (default 1)")
    p.add_argument("-s", "--size", type=parse_int, default=4096, help="message size (default 4096)")
    p.add_argument("-m", "--mtu", type=parse_int, default=1024, help="path MTU (default 1024)")
    p.add_argument(
        "-r", "--rx-depth", type=parse_int, default=500, help="receives posted at a time (500)"
    )
    p.add_argument("-n", "--iters", type=parse_int, default=1000, help="exchanges (default 1000)")
    p.add_argument("-l", "--sl", type=parse_int, default=0, help="service level")
    p.add_argument("-e", "--events", action="store_true", help="sleep on CQ events")
    p.add_argument("-g", "--gid-idx", type=parse_int, default=-1, help="local port GID index")
    p.add_argument("-c", "--chk", action="store_true", help="validate received buffer")
    add_device_options(p)
    p.add_argument("--pcap", metavar="FILE", help="write every frame sent and received")
    p.add_argument("--counters", action="store_true", help="print the device counters at exit")
    return p


class PingPong:
    """``struct pingpong_context`` and what ``main`` does with it."""

    def __init__(self, args: argparse.Namespace, opened: OpenDevice, out: TextIO) -> None:
        self.args = args
        self.out = out
        self.opened = opened
        dev = self.dev = opened.device
        self.size = args.size
        self.rx_depth = args.rx_depth
        self.channel = CompChannel() if args.events else None
        self.pd = dev.alloc_pd()
        host = dev.host
        self.kva = host.kmalloc(max(self.size, 1))
        host.cpu_write(self.kva, b"\x7b" * self.size)  # memset(ctx->buf, 0x7b, size)
        self.dma = ib_dma_map_single(dev, self.kva, max(self.size, 1), DMA_BIDIRECTIONAL)
        if ib_dma_mapping_error(dev, self.dma):
            raise ToolError("Couldn't register MR")
        self.cq: CompletionQueue = dev.create_cq(self.rx_depth + 1, comp_handler=self.channel)
        self.qp: QueuePair = dev.create_qp(
            self.pd,
            QpInitAttr(
                IbQpType.RC,
                self.cq,
                self.cq,
                QpCap(max_send_wr=1, max_recv_wr=self.rx_depth, max_send_sge=1, max_recv_sge=1),
            ),
        )
        self.qp.modify(
            QpAttr(qp_state=IbQpState.INIT, pkey_index=0, port_num=1, qp_access_flags=IbAccess(0)),
            IbQpAttrMask.STATE
            | IbQpAttrMask.PKEY_INDEX
            | IbQpAttrMask.PORT
            | IbQpAttrMask.ACCESS_FLAGS,
        )
        self.pending = 0
        self.routs = 0

    # -- work requests ----------------------------------------------------------------

    def _sge(self) -> Sge:
        return Sge(self.dma, self.size, self.pd.local_dma_lkey)

    def post_recv(self, n: int) -> int:
        """``pp_post_recv``: how many were posted."""
        for i in range(n):
            try:
                self.qp.post_recv(RecvWR(PINGPONG_RECV_WRID, (self._sge(),)))
            except VerbsError:
                return i
        return n

    def post_send(self) -> None:
        """``pp_post_send``: SEND the whole buffer, signalled."""
        wr = SendWR(
            PINGPONG_SEND_WRID, IbWrOpcode.SEND, (self._sge(),), send_flags=IbSendFlags.SIGNALED
        )
        self.qp.post_send(wr)

    # -- connection -----------------------------------------------------------------------

    def connect(self, my_psn: int, dest: Dest) -> None:
        """``pp_connect_ctx``: RTR then RTS with rc_pingpong's settings."""
        if not any(dest.gid[8:]):
            raise ToolError(
                "Failed to modify QP to RTR: the peer sent no GID (RoCE needs -g 1 on both sides)"
            )
        ah = AhAttr(dgid=dest.gid, sgid_index=max(self.args.gid_idx, 0), hop_limit=1)
        m = IbQpAttrMask
        try:
            self.qp.modify(
                QpAttr(
                    qp_state=IbQpState.RTR,
                    path_mtu=IbMtu.from_size(self.args.mtu),
                    dest_qp_num=dest.qpn,
                    rq_psn=dest.psn,
                    max_dest_rd_atomic=1,
                    min_rnr_timer=12,
                    ah_attr=ah,
                ),
                m.STATE | m.AV | m.PATH_MTU | m.DEST_QPN | m.RQ_PSN | m.MAX_DEST_RD_ATOMIC
                | m.MIN_RNR_TIMER,
            )  # fmt: skip
        except VerbsError as e:
            raise ToolError(f"Failed to modify QP to RTR: {e}") from None
        try:
            self.qp.modify(
                QpAttr(
                    qp_state=IbQpState.RTS,
                    timeout=14,
                    retry_cnt=7,
                    rnr_retry=7,
                    sq_psn=my_psn,
                    max_rd_atomic=1,
                ),
                m.STATE | m.TIMEOUT | m.RETRY_CNT | m.RNR_RETRY | m.SQ_PSN | m.MAX_QP_RD_ATOMIC,
            )
        except VerbsError as e:
            raise ToolError(f"Failed to modify QP to RTS: {e}") from None

    # -- the loop -----------------------------------------------------------------------

    def next_completions(self) -> list[WorkCompletion]:
        """Completions to process: with ``-e``, sleep on the completion
        channel then re-arm and poll; else poll, sleeping in ``wait``
        while the CQ is empty (no spinning)."""
        cq = self.cq
        if self.channel is not None:
            got = self.channel.get_cq_event(self.dev, timeout=None)
            if got is not cq:
                raise ToolError(f"CQ event for unknown CQ {got!r}")
            cq.req_notify()
            return cq.poll(2)
        while True:
            wcs = cq.poll(2)
            if wcs:
                return wcs
            cq.wait(WAIT_SLICE)

    def start(self) -> None:
        """Post ``rx_depth`` receives and, with ``-e``, arm the CQ — before the
        exchange, as ``main`` does: the peer may SEND as soon as it has our
        address, and a completion that lands before the CQ is armed would
        never raise an event."""
        self.routs = self.post_recv(self.rx_depth)
        if self.routs < self.rx_depth:
            raise ToolError(f"Couldn't post receive ({self.routs})")
        if self.channel is not None:
            self.cq.req_notify()

    def run(self, iters: int, client: bool) -> tuple[int, int]:
        """The ping-pong loop of ``main``; returns (scnt, rcnt)."""
        routs = self.routs
        self.pending = PINGPONG_RECV_WRID
        if client:
            self.post_send()
            self.pending |= PINGPONG_SEND_WRID
        rcnt = scnt = 0
        while rcnt < iters or scnt < iters:
            for wc in self.next_completions():
                if wc.status != IbWcStatus.SUCCESS:
                    raise ToolError(
                        f"Failed status {IBV_WC_STATUS_STR.get(wc.status, 'unknown')} "
                        f"({int(wc.status)}) for wr_id {wc.wr_id}"
                    )
                if wc.wr_id == PINGPONG_SEND_WRID:
                    scnt += 1
                elif wc.wr_id == PINGPONG_RECV_WRID:
                    routs -= 1
                    if routs <= 1:
                        routs += self.post_recv(self.rx_depth - routs)
                        if routs < self.rx_depth:
                            raise ToolError(f"Couldn't post receive ({routs})")
                    rcnt += 1
                else:
                    raise ToolError(f"Completion for unknown wr_id {wc.wr_id}")
                self.pending &= ~wc.wr_id
                if scnt < iters and not self.pending:
                    self.post_send()
                    self.pending = PINGPONG_RECV_WRID | PINGPONG_SEND_WRID
        return scnt, rcnt

    # -- -c ---------------------------------------------------------------------------------

    def expected(self) -> bytes:
        """What every buffer holds once ``-c`` is in force: 0x7b, with a 0 at
        each page start (``buf[i] = i / page_size % sizeof(char)``)."""
        buf = bytearray(b"\x7b" * self.size)
        buf[::PAGE_SIZE] = bytes(len(range(0, self.size, PAGE_SIZE)))
        return bytes(buf)

    def set_pattern(self) -> None:
        dev = self.dev
        ib_dma_sync_single_for_cpu(dev, self.dma, self.size, DMA_BIDIRECTIONAL)
        dev.host.cpu_write(self.kva, self.expected())
        ib_dma_sync_single_for_device(dev, self.dma, self.size, DMA_BIDIRECTIONAL)

    def bad_pages(self) -> list[int]:
        """Pages of the buffer that differ from :meth:`expected`."""
        dev = self.dev
        ib_dma_sync_single_for_cpu(dev, self.dma, self.size, DMA_BIDIRECTIONAL)
        got = bytes(dev.host.cpu_read(self.kva, self.size))
        want = self.expected()
        return [
            i // PAGE_SIZE
            for i in range(0, self.size, PAGE_SIZE)
            if got[i : i + PAGE_SIZE] != want[i : i + PAGE_SIZE]
        ]

    def close(self) -> None:
        """``pp_close_ctx``."""
        with self.dev.lock:
            self.qp.destroy()
            self.cq.destroy()
            ib_dma_unmap_single(self.dev, self.dma, max(self.size, 1), DMA_BIDIRECTIONAL)
            self.dev.host.kfree(self.kva)
            self.pd.dealloc()


def _read_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def client_exchange(host: str, port: int, my: Dest) -> Dest:
    """``pp_client_exch_dest``."""
    try:
        sock = socket.create_connection((host, port), timeout=EXCHANGE_TIMEOUT)
    except OSError:
        raise ToolError(f"Couldn't connect to {host}:{port}") from None
    with sock:
        try:
            sock.sendall(my.wire())
            msg = _read_exact(sock, MSG_SIZE)
            if len(msg) != MSG_SIZE:
                raise ToolError("Couldn't read/write remote address")
            sock.sendall(DONE)
        except OSError as e:
            raise ToolError(f"Couldn't read/write remote address: {e.strerror or e}") from None
    return Dest.parse(msg)


def server_accept(port: int) -> socket.socket:
    """The server's half of ``pp_server_exch_dest`` up to ``accept``."""
    try:
        listener = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
    except OSError:
        try:
            listener = socket.create_server(("", port))
        except OSError:
            raise ToolError(f"Couldn't listen to port {port}") from None
    with listener:
        conn, _ = listener.accept()
    conn.settimeout(EXCHANGE_TIMEOUT)
    return conn


def _v4(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run with parsed arguments; every failure is one line on ``err`` and
    exit status 1 (``usage`` for bad values, as the C tool)."""
    if not 0 <= args.port <= 65535 or args.ib_port != 1:
        parser.print_usage(err)
        return 1
    if args.mtu not in (256, 512, 1024, 2048, 4096):
        parser.print_usage(err)
        return 1
    try:
        return _run(args, out)
    except ToolError as e:
        print(e, file=err)
        return 1
    except KeyError as e:
        print(f"IB device {e.args[0]} not found", file=err)
        return 1
    except (SoftRdmaError, OSError) as e:
        print(f"softrdma rc-pingpong: {e}", file=err)
        return 1


def _run(args: argparse.Namespace, out: TextIO) -> int:
    client = args.servername is not None
    conn: socket.socket | None = None
    if client:
        ip = local_address(args, args.servername)
    elif args.ip:
        ip = IPv4Address(args.ip)
    else:
        # Like the kernel would: the address the client reached us on.
        conn = server_accept(args.port)
        ip = IPv4Address(_v4(conn.getsockname()[0]))
    opened = open_device(args, ip)
    try:
        if args.pcap:
            opened.device.link.capture(args.pcap)  # type: ignore[attr-defined]
        ctx = PingPong(args, opened, out)
        try:
            return _pingpong(args, ctx, client, conn, out)
        finally:
            if args.counters:
                stats = dict(sorted(opened.device.stats.items()))
                print("counters: " + " ".join(f"{k}={v}" for k, v in stats.items()), file=out)
            ctx.close()
    finally:
        if conn is not None:
            conn.close()
        opened.close()


def _pingpong(
    args: argparse.Namespace, ctx: PingPong, client: bool, conn: socket.socket | None, out: TextIO
) -> int:
    dev = ctx.dev
    ctx.start()
    gid = dev.query_gid(1, args.gid_idx) if args.gid_idx >= 0 else bytes(16)
    my = Dest(0, ctx.qp.qp_num, random.getrandbits(24), gid)
    print(
        f"  local address:  LID 0x{my.lid:04x}, QPN 0x{my.qpn:06x}, PSN 0x{my.psn:06x}, "
        f"GID {gid_str(my.gid)}",
        file=out,
        flush=True,
    )
    if client:
        rem = client_exchange(args.servername, args.port, my)
    else:
        if conn is None:
            conn = server_accept(args.port)
        msg = _read_exact(conn, MSG_SIZE)
        if len(msg) != MSG_SIZE:
            raise ToolError(f"{len(msg)}/{MSG_SIZE}: Couldn't read remote address")
        rem = Dest.parse(msg)
        ctx.connect(my.psn, rem)
        try:
            conn.sendall(my.wire())
            if not _read_exact(conn, len(DONE)).startswith(b"done"):
                raise ToolError("Couldn't send/recv local address")
        except OSError:
            raise ToolError("Couldn't send/recv local address") from None
    print(
        f"  remote address: LID 0x{rem.lid:04x}, QPN 0x{rem.qpn:06x}, PSN 0x{rem.psn:06x}, "
        f"GID {gid_str(rem.gid)}",
        file=out,
        flush=True,
    )
    if client:
        ctx.connect(my.psn, rem)
    if args.chk and client:
        ctx.set_pattern()
    start = time.monotonic()
    ctx.run(args.iters, client)
    usec = max((time.monotonic() - start) * 1e6, 1.0)
    nbytes = args.size * args.iters * 2
    print(
        f"{nbytes} bytes in {usec / 1e6:.2f} seconds = {nbytes * 8.0 / usec:.2f} Mbit/sec", file=out
    )
    print(
        f"{args.iters} iters in {usec / 1e6:.2f} seconds = {usec / max(args.iters, 1):.2f} usec/iter",
        file=out,
    )
    if args.chk:
        bad = ctx.bad_pages()
        for page in bad:
            print(f"invalid data in page {page}", file=out)
        if bad:
            return 1
    return 0
