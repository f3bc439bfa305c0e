"""perftest's parameters: the tools, their flags, defaults and checks
(``perftest_parameters.c``: ``init_perftest_params``, ``parser``,
``force_dependecies``), with perftest's own messages for bad values.

The defaults are those of perftest 6.06 (Debian bookworm) on rxe: port
18515; message size 65536 for the BW tests, 2 for the latency tests and 8
(fixed) for atomics; 5000 iterations for ``write_bw``, 1000 otherwise; TX
depth 128 for BW, 1 for latency, capped at the iteration count; CQ
moderation 100, lowered to 1 for messages above 8 KiB unless ``-Q`` was
given, and capped at the TX depth; ``out_reads`` the device's
``max_qp_rd_atom`` for READ and atomic tests, 1 otherwise.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

__all__ = [
    "CONNECTION_TYPES",
    "DEF_CACHE_LINE_SIZE",
    "DEF_PAGE_SIZE",
    "DEF_PORT",
    "DEF_QKEY",
    "MAX_SIZE",
    "RESULT_LINE",
    "TOOLS",
    "UD_ADDITION",
    "ParamError",
    "PerfParams",
    "TestKind",
    "Tool",
    "Verb",
    "all_sizes",
]

DEF_PORT = 18515
DEF_PAGE_SIZE = 4096
"""``sysconf(_SC_PAGESIZE)``: perftest's ``cycle_buffer``."""
DEF_CACHE_LINE_SIZE = 64
"""``get_cache_line_size()``: the address step rounds sizes up to it."""
MAX_SIZE = 1 << 23
"""``-a`` runs every power of two from 2 bytes to 8 MiB (``MAX_SIZE``)."""
MIN_ITER, MAX_ITER = 5, 100_000_000
MIN_TX, MAX_TX = 1, 15000
MIN_RX, MAX_RX = 1, 16384
MIN_QP_NUM, MAX_QP_NUM = 1, 16384
MIN_CQ_MOD, MAX_CQ_MOD = 1, 1024
MIN_GID_IX, MAX_GID_IX = 0, 64
MIN_SL, MAX_SL = 0, 15
MAX_MSG_SIZE = 0xFFFFFFFF // 2  # UINT_MAX / 2
DEF_CQ_MOD = 100
DEF_RX_SEND = 512
DEF_RX_RDMA = 1
SIZE_ATOMIC = 8
MTU_SIZES = (256, 512, 1024, 2048, 4096)
RESULT_LINE = "-" * 87
"""perftest's ``RESULT_LINE`` (without its newline)."""
UD_ADDITION = 40
"""The GRH a UD receive buffer holds before the payload."""
DEF_QKEY = 0x11111111
"""perftest's ``DEF_QKEY`` for UD QPs."""
CONNECTION_TYPES = ("RC", "UD")


class ParamError(ValueError):
    """A bad flag or value: perftest prints the message (on stderr, after
    ``stdout`` on stdout, if any) and exits with 1."""

    def __init__(self, message: str, *, stdout: str = "") -> None:
        super().__init__(message)
        self.stdout = stdout


class Verb(enum.Enum):
    """perftest's ``VerbType``."""

    SEND = "SEND"
    WRITE = "WRITE"
    READ = "READ"
    ATOMIC = "ATOMIC"


class TestKind(enum.Enum):
    """perftest's ``TestType``."""

    __test__ = False  # not a pytest test class
    LAT = "LAT"
    BW = "BW"


@dataclass(frozen=True)
class Tool:
    """One perftest program: its verb, test type and the title of its info
    block (``ctx_print_test_info``)."""

    name: str
    verb: Verb
    kind: TestKind
    title: str

    @property
    def program(self) -> str:
        """The perftest binary this tool interoperates with."""
        return f"ib_{self.name}"


TOOLS: dict[str, Tool] = {
    t.name: t
    for t in (
        Tool("write_bw", Verb.WRITE, TestKind.BW, "RDMA_Write BW Test"),
        Tool("read_bw", Verb.READ, TestKind.BW, "RDMA_Read BW Test"),
        Tool("send_bw", Verb.SEND, TestKind.BW, "Send BW Test"),
        Tool("atomic_bw", Verb.ATOMIC, TestKind.BW, "Atomic FETCH_AND_ADD BW Test"),
        Tool("write_lat", Verb.WRITE, TestKind.LAT, "RDMA_Write Latency Test"),
        Tool("read_lat", Verb.READ, TestKind.LAT, "RDMA_Read Latency Test"),
        Tool("send_lat", Verb.SEND, TestKind.LAT, "Send Latency Test"),
    )
}


def all_sizes(tool: Tool) -> list[int]:
    """The sizes an ``-a`` run goes through: 2**1 .. 2**23."""
    del tool
    return [1 << i for i in range(1, 24)]


def _check(value: int, lo: int, hi: int, name: str) -> int:
    """perftest's ``CHECK_VALUE``."""
    if not lo <= value <= hi:
        raise ParamError(f" {name} should be between {lo} and {hi}")
    return value


@dataclass
class PerfParams:
    """``struct perftest_parameters``: what one run uses, after defaults and
    the checks of ``parser`` / ``force_dependecies``."""

    tool: Tool
    servername: str | None = None
    port: int = DEF_PORT
    size: int = 65536
    iters: int = 1000
    run_all: bool = False
    duration: int = 0
    num_qps: int = 1
    gid_index: int = -1
    mtu: int = 0
    tx_depth: int = 128
    rx_depth: int = DEF_RX_SEND
    cq_mod: int = DEF_CQ_MOD
    post_list: int = 1
    sl: int = 0
    out_reads: int = 0
    report_gbits: bool = False
    cmp_swap: bool = False
    cycle_buffer: int = DEF_PAGE_SIZE
    cache_line_size: int = DEF_CACHE_LINE_SIZE
    connection: str = "RC"
    """``-c``: ``RC`` or ``UD`` (send_bw / send_lat)."""
    duplex: bool = False
    """``--bidirectional``: both sides send (BW tests)."""
    use_rdma_cm: bool = False
    """``-z`` (and ``-R``): the exchange runs over an RDMA CM connection."""
    work_rdma_cm: bool = False
    """``-R``: the test's QP is connected by the RDMA CM."""
    mtu_sizes: list[int] | None = None
    """A UD ``-a`` run's sizes, once the MTU bounds them."""

    @property
    def ud(self) -> bool:
        """UD QPs (``-c UD``)."""
        return self.connection == "UD"

    @property
    def machine(self) -> str:
        """``"client"`` with a server name, else ``"server"``."""
        return "client" if self.servername is not None else "server"

    @property
    def sizes(self) -> list[int]:
        """Every message size the run measures."""
        if self.mtu_sizes is not None:
            return self.mtu_sizes
        return all_sizes(self.tool) if self.run_all else [self.size]

    @property
    def max_size(self) -> int:
        """The largest size, which the buffers are sized for."""
        return max(self.sizes)

    @property
    def buff_size(self) -> int:
        """``BUFF_SIZE(size, cycle_buffer)``: one QP's slot of the buffer
        (with room for the GRH of a UD receive)."""
        extra = UD_ADDITION if self.ud else 0
        return max(self.max_size + extra, self.cycle_buffer)

    def limit_to_mtu(self, mtu_bytes: int) -> None:
        """UD messages fit one packet (``check_mtu``, once both sides agreed
        on the MTU): ``-a`` stops at the MTU; a larger ``-s`` is perftest's
        error (raises :class:`ParamError`)."""
        if not self.ud:
            return
        if self.run_all:
            self.mtu_sizes = [s for s in all_sizes(self.tool) if s <= mtu_bytes]
        elif self.size > mtu_bytes:
            raise ParamError(
                " Max message size in UD cannot be greater than MTU \n"
                " Couldn't get context for the device"
            )

    @classmethod
    def build(
        cls,
        tool: Tool,
        *,
        servername: str | None = None,
        port: int = DEF_PORT,
        size: int | None = None,
        iters: int | None = None,
        run_all: bool = False,
        duration: int | None = None,
        num_qps: int = 1,
        gid_index: int = -1,
        mtu: int = 0,
        tx_depth: int | None = None,
        rx_depth: int | None = None,
        cq_mod: int | None = None,
        post_list: int = 1,
        sl: int = 0,
        out_reads: int | None = None,
        report_gbits: bool = False,
        cmp_swap: bool = False,
        max_qp_rd_atom: int = 128,
        connection: str = "RC",
        duplex: bool = False,
        rdma_cm: bool = False,
        rdma_cm_exchange: bool = False,
    ) -> PerfParams:
        """Defaults and checks as perftest's ``parser`` applies them; raises
        :class:`ParamError` with perftest's message."""
        bw = tool.kind == TestKind.BW
        if not 0 < port < 65536:
            raise ParamError(f" Port should be between 1 and 65535")  # noqa: F541
        p = cls(tool, servername=servername, port=port, report_gbits=report_gbits)
        p.cmp_swap = cmp_swap
        connection = connection.upper()
        if connection not in CONNECTION_TYPES:
            raise ParamError(f" Unsupported connection type {connection}: RC or UD")
        if connection == "UD" and tool.verb != Verb.SEND:
            raise ParamError(" UD connection only possible in SEND verb")
        p.connection = connection
        if duplex and not bw:
            raise ParamError(
                " Bidirectional is only available in BW test\n Parser function exited with Error"
            )
        if (rdma_cm or rdma_cm_exchange) and connection == "UD":
            raise ParamError(" softrdma's RDMA CM connects RC QPs only: no -c UD with -R or -z")
        if rdma_cm and num_qps != 1:
            raise ParamError(" -R connects one QP here: use -q 1")
        # perftest 6.06 runs -R's exchange over the RDMA CM as well
        p.use_rdma_cm = rdma_cm or rdma_cm_exchange
        p.work_rdma_cm = rdma_cm
        p.duplex = duplex
        if tool.verb == Verb.ATOMIC:
            if size is not None and size != SIZE_ATOMIC:
                raise ParamError(" Message size cannot be changed for Atomic tests")
            if run_all:
                raise ParamError(" Running all sizes is not supported for Atomic tests")
            p.size = SIZE_ATOMIC
        elif size is not None:
            if not 1 <= size <= MAX_MSG_SIZE:
                raise ParamError(f" Message Size should be between 1 and {MAX_MSG_SIZE}")
            p.size = size
        else:
            p.size = 65536 if bw else 2
        if size is not None and run_all:
            raise ParamError(" Can't use -a and -s together")
        p.run_all = run_all
        if duration is not None:
            if duration <= 0:
                raise ParamError(" Duration should be a positive number of seconds")
            if run_all:
                raise ParamError(
                    "Duration mode currently doesn't support running on all sizes.",
                    stdout=RESULT_LINE,
                )
            p.duration = duration  # -n is accepted and ignored, as perftest does
        if iters is not None:
            p.iters = _check(iters, MIN_ITER, MAX_ITER, "Iteration num")
        else:
            p.iters = 5000 if tool.name == "write_bw" else 1000
        p.num_qps = _check(num_qps, MIN_QP_NUM, MAX_QP_NUM, "num of Qps")
        if gid_index != -1:
            _check(gid_index, MIN_GID_IX, MAX_GID_IX, "Gid index")
        p.gid_index = gid_index
        if mtu and mtu not in MTU_SIZES:
            raise ParamError(f" Invalid MTU - {mtu} ")
        p.mtu = mtu
        p.sl = _check(sl, MIN_SL, MAX_SL, "SL")
        p.post_list = _check(post_list, 1, MAX_TX, "Post List size")
        if tx_depth is not None:
            p.tx_depth = _check(tx_depth, MIN_TX, MAX_TX, "Tx depth")
        else:
            p.tx_depth = 128 if bw else 1
        if not p.duration:
            p.tx_depth = min(p.tx_depth, p.iters)
        if p.post_list > 1:
            # force_dependecies: the TX depth holds whole lists
            p.tx_depth = max(p.tx_depth, p.post_list)
            p.tx_depth -= p.tx_depth % p.post_list
        if rx_depth is not None:
            p.rx_depth = _check(rx_depth, MIN_RX, MAX_RX, "Rx depth")
        else:
            p.rx_depth = DEF_RX_SEND if tool.verb == Verb.SEND else DEF_RX_RDMA
        if tool.verb == Verb.SEND and not p.duration:
            p.rx_depth = min(p.rx_depth, p.iters)
        if cq_mod is not None:
            p.cq_mod = _check(cq_mod, MIN_CQ_MOD, MAX_CQ_MOD, "CQ moderation")
        else:
            p.cq_mod = 1 if (p.max_size > 8192 and not run_all) or not bw else DEF_CQ_MOD
        p.cq_mod = min(p.cq_mod, p.tx_depth)
        if p.post_list > 1:
            p.cq_mod = p.post_list  # one signalled WR a list
        reads = tool.verb in (Verb.READ, Verb.ATOMIC)
        if out_reads is not None:
            if not reads:
                raise ParamError(" Outstanding reads is only relevant for READ or ATOMIC tests")
            p.out_reads = _check(out_reads, 1, max_qp_rd_atom, "Outstanding reads")
        else:
            p.out_reads = max_qp_rd_atom if reads else 1
        return p
