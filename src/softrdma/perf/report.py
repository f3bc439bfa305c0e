"""What perftest prints and how it computes it (``perftest_parameters.c``:
``ctx_print_test_info``, ``ctx_print_pingpong_data``, ``print_report_bw``,
``print_full_bw_report``, ``print_report_lat``), plus CSV / JSON results,
an ``-a`` plot and a progress bar.

MB means 2**20 bytes (perftest's ``MEGA_BYTE_PS``); ``--report_gbits``
reports 10**9 bits per second. The peak bandwidth is the best rate over any
run of consecutive completions (perftest searches every (posted,
completed) pair; here at most :data:`PEAK_POINTS` evenly spread start and
end points are searched, which finds the same peak on moderated CQs and a
close lower bound otherwise). send_bw's receiver has no post times and
reports a peak of 0, as perftest's server does.
"""

from __future__ import annotations

import csv
import importlib
import itertools
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from softrdma.perf.engine_bw import BwSamples
from softrdma.perf.oob import BwReport, PingpongDest, gid_text
from softrdma.perf.params import RESULT_LINE, PerfParams, TestKind, Verb

__all__ = [
    "RESULT_LINE",
    "LatResult",
    "ResultRow",
    "bw_header",
    "bw_line",
    "bw_report",
    "c_hex",
    "duplex_report",
    "info_block",
    "lat_duration_header",
    "lat_duration_line",
    "lat_header",
    "lat_line",
    "lat_result",
    "make_progress",
    "pingpong_data",
    "write_csv",
    "write_json",
    "write_plot",
]

PEAK_POINTS = 256
_MB = 0x100000
_GBITS = 125_000_000


def c_hex(value: int, width: int) -> str:
    """C's ``%#0<width>x``: ``0x``-prefixed and zero-padded to ``width``
    characters, except that zero gets no prefix (``%#04x`` of 0 is ``0000``)."""
    if value == 0:
        return "0" * width
    return f"{value:#0{width}x}"


def info_block(params: PerfParams, device: str, mtu_bytes: int, gid_index: int) -> list[str]:
    """``ctx_print_test_info`` for RC over RoCE (TCP exchange)."""
    p, t = params, params.tool
    lines = [
        RESULT_LINE,
        f"                    {_title(p)}",
        f" Dual-port       : OFF\t\tDevice         : {device}",
        f" Number of qps   : {p.num_qps}\t\tTransport type : IB",
        f" Connection type : {p.connection}\t\tUsing SRQ      : OFF",
        # relaxed ordering everywhere but write_lat, which polls memory the
        # peer writes; no ibv_wr_* API
        f" PCIe relax order: {'OFF' if t.name == 'write_lat' else 'ON'}",
        " ibv_wr* API     : OFF",
    ]
    client = p.servername is not None
    if client or p.duplex:  # whoever sends
        lines.append(f" TX depth        : {p.tx_depth}")
    if t.verb == Verb.SEND and (not client or t.kind == TestKind.LAT or p.duplex):
        lines.append(f" RX depth        : {p.rx_depth}")
    if t.kind == TestKind.BW:
        lines.append(f" CQ Moderation   : {p.cq_mod}")
    lines += [
        f" Mtu             : {mtu_bytes}[B]",
        " Link type       : Ethernet",
        f" GID index       : {gid_index}",
    ]
    if t.verb in (Verb.READ, Verb.ATOMIC):
        lines.append(f" Outstand reads  : {p.out_reads}")
    else:
        lines.append(" Max inline data : 0[B]")
    lines += [
        f" rdma_cm QPs\t : {'ON' if p.work_rdma_cm else 'OFF'}",
        f" Data ex. method : {'rdma_cm' if p.use_rdma_cm else 'Ethernet'}",
        RESULT_LINE,
    ]
    return lines


def _title(p: PerfParams) -> str:
    title = p.tool.title
    if p.cmp_swap:
        title = title.replace("FETCH_AND_ADD", "CMP_AND_SWAP")
    if p.duplex:
        title = title.replace(" BW Test", " Bidirectional BW Test")
    return title


def pingpong_data(side: str, dest: PingpongDest, verb: Verb) -> list[str]:
    """``ctx_print_pingpong_data``: the address line and the GID line."""
    line = (
        f" {side} address: LID {c_hex(dest.lid, 4)} QPN {c_hex(dest.qpn, 6)}"
        f" PSN {c_hex(dest.psn, 6)}"
    )
    # READ_FMT and RDMA_FMT: READ shows both, WRITE the key and address,
    # SEND and atomics neither
    if verb == Verb.READ:
        line += f" OUT {c_hex(dest.out_reads, 4)}"
    if verb in (Verb.READ, Verb.WRITE):
        line += f" RKey {c_hex(dest.rkey, 8)} VAddr {c_hex(dest.vaddr, 16)}"
    return [line, f" GID: {gid_text(dest.gid)}"]


def bw_header(gbits: bool) -> str:
    """``RESULT_FMT`` / ``RESULT_FMT_G``."""
    unit = "Gb/sec" if gbits else "MB/sec"
    return f" #bytes     #iterations    BW peak[{unit}]    BW average[{unit}]   MsgRate[Mpps]"


def bw_line(report: BwReport, gbits: bool) -> str:
    """``REPORT_FMT`` (``REPORT_FMT_EXT`` below 0.1 Gb/s with --report_gbits)."""
    r = report
    if gbits and r.bw_avg < 0.1:
        return (
            f" {r.size:<7d}    {r.iters}           {r.bw_peak:<7.6f}            "
            f"{r.bw_avg:<7.6f}            {r.msg_rate:<7.6f}"
        )
    return (
        f" {r.size:<7d}    {r.iters:<10d}       {r.bw_peak:<7.2f}            "
        f"{r.bw_avg:<7.2f}\t\t   {r.msg_rate:<7.6f}"
    )


def duplex_report(mine: BwReport, theirs: BwReport) -> BwReport:
    """``print_full_bw_report`` with the peer's report: this side's size
    and iterations, both sides' rates summed."""
    return BwReport(mine.size, mine.iters, mine.bw_peak + theirs.bw_peak,
                    mine.bw_avg + theirs.bw_avg, mine.msg_rate + theirs.msg_rate)  # fmt: skip


def bw_report(samples: BwSamples, gbits: bool) -> BwReport:
    """``print_report_bw``: average over the whole run (first post to last
    completion), peak over the best run of completions, message rate in
    millions per second."""
    s = samples
    n = s.completed
    iters = s.iters * s.num_qps  # perftest 6.06 reports the work of every QP
    if n == 0 or not s.tposted:
        return BwReport(s.size, iters, 0.0, 0.0, 0.0)
    factor = _GBITS if gbits else _MB
    span = max(s.tcompleted[-1] - s.tposted[0], 1e-9)
    avg = s.size * n / span / factor
    rate = n / span / 1e6
    # peak: the least time per message over (posted i .. completed j) runs
    posted = s.tposted
    starts = _spread(range(min(len(posted), n)))
    ends = _spread(range(n))
    best = math.inf
    tc = s.tcompleted
    for i in starts:
        for j in ends:
            if j >= i:
                t = (tc[j] - posted[i]) / (j - i + 1)
                if 0 < t < best:
                    best = t
    peak = s.size / best / factor if math.isfinite(best) else avg
    if len(posted) == 1:
        peak = 0.0  # a receiver has no post times: perftest's server prints 0.00
    return BwReport(s.size, iters, max(peak, avg) if peak else 0.0, avg, rate)


def _spread(r: range) -> list[int]:
    n = len(r)
    if n <= PEAK_POINTS:
        return list(r)
    return sorted(
        {r[0], r[-1], *(r[(k * (n - 1)) // (PEAK_POINTS - 1)] for k in range(PEAK_POINTS))}
    )


@dataclass(frozen=True)
class LatResult:
    """One latency line: microseconds."""

    size: int
    iters: int
    t_min: float
    t_max: float
    t_typical: float
    t_avg: float
    t_stdev: float
    p99: float
    p99_9: float


def lat_header() -> str:
    """``RESULT_FMT_LAT``."""
    return (
        " #bytes #iterations    t_min[usec]    t_max[usec]  t_typical[usec]    t_avg[usec]"
        "    t_stdev[usec]   99% percentile[usec]   99.9% percentile[usec] "
    )


def lat_result(size: int, iters: int, tposted: Sequence[float], verb: Verb) -> LatResult:
    """``print_report_lat``: the differences between consecutive posts,
    halved for WRITE and SEND (a round trip is two one-way trips), in
    microseconds; typical is the median."""
    rtt = 1 if verb in (Verb.READ, Verb.ATOMIC) else 2
    delta = sorted((b - a) * 1e6 / rtt for a, b in itertools.pairwise(tposted))
    if not delta:
        return LatResult(size, iters, 0, 0, 0, 0, 0, 0, 0)
    n = len(delta)
    median = (delta[n // 2] + delta[n // 2 - 1]) / 2 if n % 2 == 0 else delta[n // 2]
    avg = sum(delta) / n
    stdev = math.sqrt(sum((d - avg) ** 2 for d in delta) / n)
    p99 = delta[max(0, math.ceil(n * 0.99) - 1)]
    p999 = delta[max(0, math.ceil(n * 0.999) - 1)]
    return LatResult(size, iters, delta[0], delta[-1], median, avg, stdev, p99, p999)


def lat_duration_header() -> str:
    """``RESULT_FMT_LAT_DUR``: a ``-D`` latency run's header."""
    return " #bytes        #iterations       t_avg[usec]    tps average"


def lat_duration_line(size: int, iters: int, seconds: float, verb: Verb) -> str:
    """``print_report_lat_duration`` (``REPORT_FMT_LAT_DUR``): the average
    one-way latency (a round trip halved for WRITE and SEND) and the
    ping-pongs per second."""
    rtt = 1 if verb in (Verb.READ, Verb.ATOMIC) else 2
    n = max(iters, 1)
    t_avg = seconds * 1e6 / rtt / n
    tps = iters / seconds if seconds > 0 else 0.0
    return f" {size:<7d}       {iters}            {t_avg:<7.2f}        {tps:<7.2f}"


def lat_line(r: LatResult) -> str:
    """``REPORT_FMT_LAT``."""
    return (
        f" {r.size:<7d} {r.iters}          {r.t_min:<7.2f}        {r.t_max:<7.2f}      "
        f"{r.t_typical:<7.2f}  \t       {r.t_avg:<7.2f}     \t{r.t_stdev:<7.2f}\t\t"
        f"{r.p99:<7.2f} \t\t{r.p99_9:<7.2f}"
    )


# --- results as data ----------------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    """One measured size, for CSV, JSON and plots (bandwidth in the unit
    printed; latency columns empty for BW tests and the other way round)."""

    test: str
    size: int
    iters: int
    bw_peak: float | None = None
    bw_avg: float | None = None
    msg_rate_mpps: float | None = None
    bw_unit: str | None = None
    t_min_us: float | None = None
    t_max_us: float | None = None
    t_typical_us: float | None = None
    t_avg_us: float | None = None
    t_stdev_us: float | None = None
    t_p99_us: float | None = None
    t_p99_9_us: float | None = None

    @classmethod
    def from_bw(cls, test: str, r: BwReport, gbits: bool) -> ResultRow:
        unit = "Gb/sec" if gbits else "MB/sec"
        return cls(test, r.size, r.iters, r.bw_peak, r.bw_avg, r.msg_rate, unit)

    @classmethod
    def from_lat(cls, test: str, r: LatResult) -> ResultRow:
        return cls(
            test, r.size, r.iters, t_min_us=r.t_min, t_max_us=r.t_max,
            t_typical_us=r.t_typical, t_avg_us=r.t_avg, t_stdev_us=r.t_stdev,
            t_p99_us=r.p99, t_p99_9_us=r.p99_9,
        )  # fmt: skip

    @classmethod
    def from_lat_duration(
        cls, test: str, size: int, iters: int, seconds: float, verb: Verb
    ) -> ResultRow:
        """A ``-D`` latency run: only the average is known."""
        rtt = 1 if verb in (Verb.READ, Verb.ATOMIC) else 2
        return cls(test, size, iters, t_avg_us=seconds * 1e6 / rtt / max(iters, 1))


def write_csv(rows: Sequence[ResultRow], out: TextIO) -> None:
    """The rows as CSV with a header."""
    fields = list(ResultRow.__dataclass_fields__)
    w = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if v is None else v) for k, v in asdict(r).items()})


def write_json(rows: Sequence[ResultRow], out: TextIO, meta: dict[str, Any]) -> None:
    """``{"meta": ..., "results": [...]}``."""
    json.dump({"meta": meta, "results": [asdict(r) for r in rows]}, out, indent=2)
    out.write("\n")


def write_plot(rows: Sequence[ResultRow], path: str, title: str) -> None:
    """Bandwidth (BW tests) or typical latency (latency tests) against the
    message size, log-scaled; matplotlib is imported only here (the
    ``perf`` extra). Raises ``ImportError`` without it."""
    # imported by name: an optional dependency, typed or not where it is installed
    matplotlib: Any = importlib.import_module("matplotlib")
    matplotlib.use("Agg")  # no display needed
    plt: Any = importlib.import_module("matplotlib.pyplot")

    sizes = [r.size for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    try:
        if rows and rows[0].bw_avg is not None:
            ax.plot(sizes, [r.bw_avg for r in rows], marker="o", label="BW average")
            ax.plot(sizes, [r.bw_peak for r in rows], marker=".", linestyle=":", label="BW peak")
            ax.set_ylabel(f"bandwidth [{rows[0].bw_unit}]")
        else:
            ax.plot(sizes, [r.t_typical_us for r in rows], marker="o", label="t_typical")
            ax.plot(sizes, [r.t_p99_us for r in rows], marker=".", linestyle=":", label="99%")
            ax.set_ylabel("latency [usec]")
            ax.set_yscale("log")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("message size [bytes]")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def make_progress(
    total: int, desc: str, stream: TextIO | None = None
) -> Callable[[int], None] | None:
    """A tqdm progress bar on a terminal, advanced by the callback's
    argument; None when the stream is not a terminal or tqdm is not
    installed (the ``perf`` extra)."""
    stream = stream or sys.stderr
    if not stream.isatty():
        return None
    try:
        tqdm: Any = importlib.import_module("tqdm").tqdm
    except ImportError:
        return None
    bar = tqdm(total=total, desc=desc, file=stream, leave=False, unit="msg", mininterval=0.2)

    def advance(n: int) -> None:
        bar.update(n)
        if bar.n >= total:
            bar.close()

    return advance
