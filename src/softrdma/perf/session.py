"""One run of a perftest tool: the TCP connection, the out-of-band exchange
(:mod:`softrdma.perf.oob`) over it, the resources, the test and what is
printed — the ``main`` of perftest's ``write_bw.c``, ``read_lat.c`` etc.,
on a softrdma device.

The socket follows perftest's framing: each message one ``send`` (with
``TCP_NODELAY``), each read waiting for exactly its size. perftest reads a
message with one ``read`` and fails when it is short; here the rest of a
message may take up to :data:`SHORT_READ_GRACE` seconds, then it fails the
same way. Waiting for a message at all is bounded by ``timeout`` (the
server waits there while the client runs its test). With ``-z`` / ``-R``
the same exchange runs over an RDMA CM connection instead
(:mod:`softrdma.perf.cm_comm`), one SEND a message.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from softrdma.cm.cma import RdmaCmId
from softrdma.perf.cm_comm import CmComm
from softrdma.perf.context import PerfContext, PerfError
from softrdma.perf.engine_bw import (
    BwSamples,
    Receives,
    post_receives,
    run_iter_bi,
    run_iter_bw,
    run_iter_bw_server,
)
from softrdma.perf.engine_lat import (
    DurationSample,
    run_iter_lat_read,
    run_iter_lat_send,
    run_iter_lat_write,
)
from softrdma.perf.oob import (
    XCHG_ERROR,
    BwReport,
    Checkpoint,
    Event,
    Finished,
    MtuAgreed,
    OobError,
    OobExchange,
    PingpongDest,
    ReportReceived,
    Role,
    SysData,
    gid_is_v4mapped,
)
from softrdma.perf.params import PerfParams, TestKind, Verb
from softrdma.perf.rdma_cm import (
    WAITING_FOR_CM_QP,
    listen_for_qp,
    rdma_client_connect,
    rdma_server_connect,
)
from softrdma.perf.report import (
    RESULT_LINE,
    ResultRow,
    bw_header,
    bw_line,
    bw_report,
    duplex_report,
    info_block,
    lat_duration_header,
    lat_duration_line,
    lat_header,
    lat_line,
    lat_result,
    make_progress,
    pingpong_data,
)
from softrdma.verbs.device import IbDevice
from softrdma.verbs.enums import IbMtu
from softrdma.verbs.errors import VerbsError

__all__ = [
    "EXCHANGE_TIMEOUT",
    "SHORT_READ_GRACE",
    "PerfSession",
    "accept_client",
    "connect_server",
    "default_gid_index",
]

EXCHANGE_TIMEOUT = 300.0
SHORT_READ_GRACE = 2.0
CONNECT_TIMEOUT = 30.0


def default_gid_index(dev: IbDevice) -> int:
    """perftest without ``-x`` on RoCE: the first IPv4-mapped (RoCEv2) GID."""
    for i in range(dev.query_port(1).gid_tbl_len):
        try:
            if gid_is_v4mapped(dev.query_gid(1, i)):
                return i
        except VerbsError:
            break
    return 0


def connect_server(host: str, port: int) -> socket.socket:
    """``ethernet_client_connect``: one attempt, as perftest."""
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError:
        raise OobError(
            f"Couldn't connect to {host}:{port}\n"
            "Unable to open file descriptor for socket connection Unable to init the socket "
            "connection"
        ) from None
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def accept_client(port: int, bind: str = "", timeout: float | None = None) -> socket.socket:
    """``ethernet_server_connect``: listen on ``port``, take one client."""
    try:
        listener = socket.create_server((bind, port), reuse_port=False)
    except OSError:
        raise OobError(
            f"Couldn't listen to port {port}\n"
            "Unable to open file descriptor for socket connection Unable to init the socket "
            "connection"
        ) from None
    with listener:
        listener.settimeout(timeout)
        try:
            conn, _ = listener.accept()
        except TimeoutError:
            raise OobError(f"No client connected to port {port} in {timeout:.0f} s") from None
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


@dataclass
class PerfSession:
    """One side of one test on ``dev`` (``params.servername`` set: the
    client), printing to ``out`` as perftest does."""

    params: PerfParams
    dev: IbDevice
    out: TextIO
    device_name: str = "rxe0"
    timeout: float = EXCHANGE_TIMEOUT
    progress_stream: TextIO | None = None
    rows: list[ResultRow] = field(default_factory=list)
    remote_report: BwReport | None = None
    ctx: PerfContext | None = None
    local_ip: str | None = None
    """The local address an RDMA CM listener binds or a client resolves from."""
    comm: CmComm | None = None

    def __post_init__(self) -> None:
        p = self.params
        self.role = Role.CLIENT if p.servername is not None else Role.SERVER
        self.gid_index = p.gid_index if p.gid_index >= 0 else default_gid_index(self.dev)
        port = self.dev.query_port(1)
        mtu = port.active_mtu
        if p.mtu:
            want = IbMtu.from_size(p.mtu)
            if want > port.active_mtu:
                raise PerfError(
                    f" Requested mtu is higher than active mtu \n Changing to active mtu - "
                    f"{port.active_mtu.size}"
                )
            mtu = want
        self.mtu = mtu
        self._my: list[PingpongDest] = []
        self._remote: list[PingpongDest] = []
        self._report: BwReport | None = None
        self._recvs: Receives | None = None
        self._round = 0
        self._listener: RdmaCmId | None = None

    def _print(self, *lines: str) -> None:
        for line in lines:
            self.out.write(line + "\n")
        self.out.flush()

    # -- the exchange over a socket or the RDMA CM ---------------------------------------

    def run(self, link: socket.socket | CmComm) -> None:
        """Run the whole tool over a connected socket, or (``-z`` / ``-R``)
        the exchange's RDMA CM connection; raises :class:`OobError` /
        :class:`PerfError` with perftest's message."""
        p = self.params
        placeholder = [PingpongDest(0, 0, 0, 0, 0, 0, bytes(16))] * p.num_qps
        per_size = p.tool.verb == Verb.SEND or p.duplex  # a sync for each -a size
        rounds = len(p.sizes) if p.run_all and per_size else 0
        ex = OobExchange(
            p.tool, self.role, placeholder, mtu=int(self.mtu), cycle_buffer=p.cycle_buffer,
            cache_line_size=p.cache_line_size, rounds=rounds, duplex=p.duplex,
            rdma_cm=isinstance(link, CmComm), gid_index=self.gid_index, cm_qp=p.work_rdma_cm,
        )  # fmt: skip
        if isinstance(link, CmComm):
            self.comm = link
            send, receive = self._send_cm, self._receive_cm
            if p.work_rdma_cm and self.role == Role.SERVER:
                self._listener = listen_for_qp(link, p, self.local_ip)
        else:
            sock = link

            def send(ex: OobExchange) -> None:
                _send(sock, ex.data_to_send(), ex.finished)

            def receive(ex: OobExchange) -> list[Event]:
                return self._receive(sock, ex)

        events: deque[Event] = deque(ex.start())
        try:
            while True:
                send(ex)
                while events:
                    more = self._handle(ex, events.popleft())
                    events.extend(more)
                    send(ex)
                if ex.finished:
                    return
                events.extend(receive(ex))
        finally:
            if self.ctx is not None:
                self.ctx.close()
                self.ctx = None
            if self._listener is not None:
                self._listener.destroy()
                self._listener = None

    def _receive(self, sock: socket.socket, ex: OobExchange) -> list[Event]:
        need = ex.pending_read
        if need <= 0:
            raise OobError(XCHG_ERROR)  # nothing to wait for: a script bug
        sock.settimeout(SHORT_READ_GRACE if ex.partial else self.timeout)
        try:
            data = sock.recv(need)
        except TimeoutError:
            if ex.partial:
                ex.short_read()
            raise OobError(f"{XCHG_ERROR} (nothing came in {self.timeout:.0f} s)") from None
        except (ConnectionResetError, BrokenPipeError):
            data = b""
        return ex.receive_data(data)

    def _send_cm(self, ex: OobExchange) -> None:
        assert self.comm is not None
        for msg in ex.messages_to_send():
            self.comm.send(msg)

    def _receive_cm(self, ex: OobExchange) -> list[Event]:
        assert self.comm is not None
        if ex.pending_read <= 0:
            raise OobError(XCHG_ERROR)
        try:
            msg = self.comm.recv(self.timeout)
        except TimeoutError:
            raise OobError(f"{XCHG_ERROR} (nothing came in {self.timeout:.0f} s)") from None
        return ex.receive_message(msg)

    # -- what the tool does at each point ------------------------------------------------

    def _handle(self, ex: OobExchange, ev: Event) -> list[Event]:
        p = self.params
        if isinstance(ev, SysData):
            p.cycle_buffer, p.cache_line_size = ev.cycle_buffer, ev.cache_line_size
            return []
        if isinstance(ev, MtuAgreed):
            self.mtu = IbMtu(ev.mtu)
            if p.ud:  # check_mtu: a UD message is one packet
                p.limit_to_mtu(self.mtu.size)
                if p.run_all and p.tool.verb == Verb.SEND:
                    ex.set_rounds(len(p.sizes))
            return []
        if isinstance(ev, ReportReceived):
            self.remote_report = ev.report
            if p.duplex:
                # print_full_bw_report(my, rem): both directions summed
                assert self._report is not None
                both = duplex_report(self._report, ev.report)
                self._print(bw_line(both, p.report_gbits))
                self.rows.append(ResultRow.from_bw(p.tool.name, both, p.report_gbits))
            elif self.role == Role.SERVER:
                # the server prints the client's numbers (print_full_bw_report)
                self._print(bw_line(ev.report, p.report_gbits))
            return []
        if isinstance(ev, Finished):
            self._print(RESULT_LINE)
            return []
        if not isinstance(ev, Checkpoint):
            return []
        name = ev.name
        # over the RDMA CM, the address lines are printed as SEND's (the
        # comm's parameters say SEND): no RKey, no VAddr
        shown = Verb.SEND if p.use_rdma_cm else p.tool.verb
        if name == "setup":
            self._print(*info_block(p, self.device_name, self.mtu.size, self.gid_index))
            self.ctx = self._create_context()
            self._my = self.ctx.my_dests()
            for d in self._my:
                self._print(*pingpong_data("local", d, shown))
            return ex.resume(dests=self._my)
        if name == "connect":
            self._remote = [d for d in ex.remote_dests if d is not None]
            for d in self._remote:
                self._print(*pingpong_data("remote", d, shown))
            assert self.ctx is not None
            if not p.work_rdma_cm:  # -R: the CM connected the QP already
                self.ctx.connect(self.mtu, self._my, self._remote)
            return ex.resume()
        if name == "post_receives":
            self._post_receives()
            return ex.resume()
        if name == "run":
            self._run_test()
            return ex.resume()
        if name == "report":
            mine = self._report or BwReport(p.size, p.iters, 0.0, 0.0, 0.0)
            return ex.resume(report=mine)
        raise PerfError(f"unknown checkpoint {name}")

    def _create_context(self) -> PerfContext:
        """``ctx_init``, or with ``-R`` the CM's connection of the test QP."""
        p = self.params
        if not p.work_rdma_cm:
            return PerfContext(self.dev, p, sgid_index=self.gid_index)
        if self.comm is None:
            raise PerfError(" -R needs the exchange over the RDMA CM")
        if self.role == Role.SERVER:
            self._print(*WAITING_FOR_CM_QP, RESULT_LINE)
            assert self._listener is not None
            listener, self._listener = self._listener, None
            return rdma_server_connect(self.comm, p, listener, sgid_index=self.gid_index)
        assert p.servername is not None
        return rdma_client_connect(
            self.comm, p, p.servername, self.local_ip, sgid_index=self.gid_index
        )

    def _sizes_now(self) -> list[int]:
        """The sizes this "run" checkpoint measures: all of them, except for
        send_bw / send_lat, whose ``-a`` syncs once per size."""
        p = self.params
        if p.tool.verb == Verb.SEND or p.duplex:
            return [p.sizes[self._round]]
        return p.sizes

    def _post_receives(self) -> None:
        p, ctx = self.params, self.ctx
        assert ctx is not None
        if p.tool.kind == TestKind.BW and self.role == Role.CLIENT and not p.duplex:
            return  # send_bw: only the server receives (both, --bidirectional)
        self._recvs = post_receives(ctx, self._sizes_now()[0])

    def _run_test(self) -> None:
        p, ctx = self.params, self.ctx
        assert ctx is not None
        tool = p.tool
        gbits = p.report_gbits
        remote = [(d.vaddr, d.rkey) for d in self._remote]
        sizes = self._sizes_now()
        first = self._round == 0
        self._round += 1
        if tool.kind == TestKind.BW:
            if first:
                self._print(RESULT_LINE, bw_header(gbits))
            if self.role == Role.SERVER and tool.verb != Verb.SEND and not p.duplex:
                return  # the server just waits for the client to finish
            if tool.verb == Verb.SEND and p.duplex:
                assert self._recvs is not None
                bar = self._progress(p.iters * p.num_qps, f"{sizes[0]} B")
                self._bw_done(run_iter_bi(ctx, self._recvs, progress=bar))
                return
            if self.role == Role.SERVER and tool.verb == Verb.SEND:
                assert self._recvs is not None
                bar = self._progress(p.iters * p.num_qps, f"{sizes[0]} B")
                samples = run_iter_bw_server(ctx, self._recvs, progress=bar,
                                             duration=p.duration)  # fmt: skip
                self._bw_done(samples)
                return
            for size in sizes:
                bar = self._progress(p.iters * p.num_qps, f"{size} B")
                samples = run_iter_bw(ctx, size, remote, duration=p.duration, progress=bar)
                self._bw_done(samples)
            return
        if tool.verb == Verb.READ and self.role == Role.SERVER:
            return  # read_lat's server only answers, and prints no table
        if first:
            self._print(RESULT_LINE, lat_duration_header() if p.duration else lat_header())
        d = float(p.duration)
        for size in sizes:
            bar = None if d else self._progress(p.iters, f"{size} B")
            if tool.verb == Verb.WRITE:
                got = run_iter_lat_write(ctx, size, remote[0], progress=bar, duration=d)
            elif tool.verb == Verb.READ:
                got = run_iter_lat_read(ctx, size, remote[0], progress=bar, duration=d)
            else:
                assert self._recvs is not None
                got = run_iter_lat_send(ctx, self._recvs, progress=bar, duration=d)
            if isinstance(got, DurationSample):
                self._print(lat_duration_line(size, got.iters, got.seconds, tool.verb))
                self.rows.append(
                    ResultRow.from_lat_duration(tool.name, size, got.iters, got.seconds, tool.verb)
                )
                continue
            r = lat_result(size, p.iters, got, tool.verb)
            self._print(lat_line(r))
            self.rows.append(ResultRow.from_lat(tool.name, r))

    def _bw_done(self, samples: BwSamples) -> None:
        p = self.params
        rep = bw_report(samples, p.report_gbits)
        self._report = rep
        if p.duplex:
            return  # printed with the peer's numbers once they came
        self._print(bw_line(rep, p.report_gbits))
        self.rows.append(ResultRow.from_bw(p.tool.name, rep, p.report_gbits))

    def _progress(self, total: int, desc: str) -> Callable[[int], None] | None:
        if self.progress_stream is None:
            return None
        return make_progress(total, f"{self.params.tool.name} {desc}", self.progress_stream)


def _send(sock: socket.socket, data: bytes, finished: bool) -> None:
    """Write ``data``; the last ``"done"`` may meet a peer that has gone
    (nobody reads it), which is not an error."""
    if not data:
        return
    try:
        sock.sendall(data)
    except OSError:
        if not finished:
            raise OobError(XCHG_ERROR) from None
