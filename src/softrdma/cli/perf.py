"""``softrdma perf``: perftest's ``ib_write_bw``, ``ib_read_bw``,
``ib_send_bw``, ``ib_atomic_bw``, ``ib_write_lat``, ``ib_read_lat`` and
``ib_send_lat`` on a softrdma device over real UDP — perftest's flags,
defaults, out-of-band exchange (TCP port 18515, as perftest 6.06) and
output, so either end can be the real tool on a Linux host with rxe.

``softrdma perf write_bw`` is a server; ``softrdma perf write_bw HOST`` a
client. ``-d`` names the device (``rxe0``, ``hca0``) or, as an IPv4 address,
the ``rxe0`` device on that address. Additions to perftest's flags: ``--ip`` (the local RoCE address;
a server without it takes the address the client reached), ``--udp-port``,
``--csv`` / ``--json`` (the results as data), ``--plot`` (bandwidth or
latency against size, with matplotlib), ``--timeout``. ``-z`` / ``-R``
run the exchange over the RDMA CM instead of TCP (an ``-R`` / ``-z`` server
needs ``--ip``). A progress bar
(tqdm) shows on a terminal. ``-F`` (ignore the CPU frequency warning) is
accepted: softrdma times with the monotonic clock, not cycles.
"""

from __future__ import annotations

import argparse
import sys
from ipaddress import IPv4Address
from typing import TextIO

from softrdma.cli.netdev import add_device_options, local_address, open_device, parse_int
from softrdma.errors import SoftRdmaError
from softrdma.perf.cm_comm import CmComm
from softrdma.perf.context import PerfError
from softrdma.perf.oob import OobError
from softrdma.perf.params import DEF_PORT, TOOLS, ParamError, PerfParams, Verb
from softrdma.perf.report import RESULT_LINE, ResultRow, write_csv, write_json, write_plot
from softrdma.perf.session import EXCHANGE_TIMEOUT, PerfSession, accept_client, connect_server

__all__ = ["build_parser", "run"]


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """perftest's main flags, plus ``--ip``, ``--udp-port``, ``--csv``,
    ``--json``, ``--plot`` and ``--timeout``."""
    p = parser or argparse.ArgumentParser(prog="softrdma perf")
    p.description = (
        "perftest's bandwidth and latency tests (ib_write_bw ...), "
        "interoperable with perftest 6.06 on Linux rxe."
    )
    sub = p.add_subparsers(dest="test", required=True, metavar="TEST")
    for name, tool in sorted(TOOLS.items()):
        text = f"{tool.title}, like perftest's {tool.program}"
        _add_flags(sub.add_parser(name, help=text, description=text))
    return p


def _add_flags(p: argparse.ArgumentParser) -> None:
    """One test's flags: perftest's, plus softrdma's additions."""
    p.add_argument("servername", nargs="?", help="run as the client of this server")
    p.add_argument("-p", "--port", type=parse_int, default=DEF_PORT, help="TCP port (18515)")
    p.add_argument("-s", "--size", type=parse_int, help="message size (BW 65536, LAT 2)")
    p.add_argument("-n", "--iters", type=parse_int, help="iterations (write_bw 5000, else 1000)")
    p.add_argument("-a", "--all", action="store_true", help="run sizes from 2 till 2^23")
    p.add_argument("-D", "--duration", type=parse_int, help="run for this many seconds")
    p.add_argument("-q", "--qp", type=parse_int, default=1, help="number of QPs (1)")
    p.add_argument("-x", "--gid-index", type=parse_int, default=-1, help="GID index (first RoCEv2)")
    p.add_argument("-m", "--mtu", type=parse_int, default=0, help="path MTU (port's active)")
    p.add_argument("-t", "--tx-depth", type=parse_int, help="send queue depth (BW 128, LAT 1)")
    p.add_argument("-r", "--rx-depth", type=parse_int, help="receive queue depth (send: 512)")
    p.add_argument("-Q", "--cq-mod", type=parse_int, help="one signalled send in this many (100)")
    p.add_argument("-l", "--post_list", type=parse_int, default=1, help="post lists of this many")
    p.add_argument("-S", "--sl", type=parse_int, default=0, help="service level")
    p.add_argument("-o", "--outs", type=parse_int, help="outstanding reads/atomics (device max)")
    p.add_argument("-A", "--atomic_type", choices=("FETCH_AND_ADD", "CMP_AND_SWAP"),
                   default="FETCH_AND_ADD", help="atomic_bw's operation")  # fmt: skip
    p.add_argument("-c", "--connection", type=str.upper, choices=("RC", "UD"), default="RC",
                   help="connection type: RC, or UD for send_bw / send_lat")  # fmt: skip
    p.add_argument("-b", "--bidirectional", action="store_true",
                   help="both sides send (BW tests)")  # fmt: skip
    p.add_argument("-R", "--rdma_cm", action="store_true",
                   help="connect the QP with the RDMA CM (and exchange over it)")  # fmt: skip
    p.add_argument("-z", "--comm_rdma_cm", action="store_true",
                   help="exchange the test's data over an RDMA CM connection")  # fmt: skip
    p.add_argument("-F", "--CPU-freq", action="store_true", help="accepted (no cycle counter)")
    p.add_argument("--report_gbits", action="store_true", help="report Gb/sec, not MB/sec")
    add_device_options(p)
    p.add_argument("--csv", metavar="FILE", help="write the results as CSV ('-': stdout)")
    p.add_argument("--json", metavar="FILE", help="write the results as JSON ('-': stdout)")
    p.add_argument("--plot", metavar="FILE", help="plot the results (needs matplotlib)")
    p.add_argument(
        "--timeout",
        type=float,
        default=EXCHANGE_TIMEOUT,
        help=f"seconds to wait for each exchange message ({EXCHANGE_TIMEOUT:.0f})",
    )


def params_from_args(args: argparse.Namespace, max_qp_rd_atom: int = 128) -> PerfParams:
    """The :class:`PerfParams` the flags ask for (perftest's checks)."""
    return PerfParams.build(
        TOOLS[args.test],
        servername=args.servername,
        port=args.port,
        size=args.size,
        iters=args.iters,
        run_all=args.all,
        duration=args.duration,
        num_qps=args.qp,
        gid_index=args.gid_index,
        mtu=args.mtu,
        tx_depth=args.tx_depth,
        rx_depth=args.rx_depth,
        cq_mod=args.cq_mod,
        post_list=args.post_list,
        sl=args.sl,
        out_reads=args.outs,
        report_gbits=args.report_gbits,
        cmp_swap=args.atomic_type == "CMP_AND_SWAP",
        max_qp_rd_atom=max_qp_rd_atom,
        connection=args.connection,
        duplex=args.bidirectional,
        rdma_cm=args.rdma_cm,
        rdma_cm_exchange=args.comm_rdma_cm,
    )


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run with parsed arguments; failures print perftest's message (or
    one clear line) on ``err`` and return 1."""
    del parser
    try:
        # -d may name the device by its address, as it names it by name
        ip = IPv4Address(args.ib_dev)
    except ValueError:
        pass
    else:
        if args.ip and IPv4Address(args.ip) != ip:
            print(f" -d {ip} and --ip {args.ip} name different addresses", file=err)
            return 1
        args.ip, args.ib_dev = str(ip), "rxe0"
    try:
        params = params_from_args(args)
    except ParamError as e:
        if e.stdout:
            print(e.stdout, file=out, flush=True)
        print(e, file=err)
        return 1
    try:
        return _run(args, params, out, err)
    except (OobError, PerfError, ParamError) as e:
        print(str(e).rstrip("\n"), file=err)
        return 1
    except KeyError as e:
        print(f" IB device {e.args[0]} not found\n Unable to find the Infiniband/RoCE device",
              file=err)  # fmt: skip
        return 1
    except (SoftRdmaError, OSError) as e:
        print(f"softrdma perf {args.test}: {e}", file=err)
        return 1


def _run(args: argparse.Namespace, params: PerfParams, out: TextIO, err: TextIO) -> int:
    client = params.servername is not None
    sock = None
    if params.tool.verb in (Verb.READ, Verb.ATOMIC):
        # perftest's check_link -> ctx_set_max_inline: on a device it does
        # not know (rxe), a test whose inline size it set to 0 (READ and
        # atomics cannot inline) prints a separator before anything else
        print(RESULT_LINE, file=out, flush=True)
    if params.use_rdma_cm:
        return _run_rdma_cm(args, params, out, err)
    try:
        if client:
            ip = local_address(args, params.servername)
        elif args.ip:
            ip = IPv4Address(args.ip)
        else:
            print("\n************************************", file=out)
            print("* Waiting for client to connect... *", file=out)
            print("************************************", file=out, flush=True)
            sock = accept_client(params.port)
            ip = IPv4Address(_v4(sock.getsockname()[0]))
        opened = open_device(args, ip)
        try:
            session = PerfSession(
                params, opened.device, out, device_name=args.ib_dev, timeout=args.timeout,
                progress_stream=err,
            )  # fmt: skip
            if sock is None:
                if client:
                    assert params.servername is not None
                    sock = connect_server(params.servername, params.port)
                else:
                    print("\n************************************", file=out)
                    print("* Waiting for client to connect... *", file=out)
                    print("************************************", file=out, flush=True)
                    sock = accept_client(params.port, args.ip or "")
            session.run(sock)
        finally:
            opened.close()
    finally:
        if sock is not None:
            sock.close()
    _write_results(args, session.rows, params, out)
    return 0


def _run_rdma_cm(args: argparse.Namespace, params: PerfParams, out: TextIO, err: TextIO) -> int:
    """``-z`` / ``-R``: the exchange over an RDMA CM connection on the
    test's port, no TCP; the server listens on ``--ip`` (or ``-d ADDR``)."""
    client = params.servername is not None
    if client:
        assert params.servername is not None
        ip = local_address(args, params.servername)
    elif args.ip:
        ip = IPv4Address(args.ip)
    else:
        raise PerfError(" -R / -z: give the address to listen on (--ip or -d ADDR)")
    opened = open_device(args, ip)
    try:
        session = PerfSession(
            params, opened.device, out, device_name=args.ib_dev, timeout=args.timeout,
            progress_stream=err, local_ip=str(ip),
        )  # fmt: skip
        comm = CmComm(opened.device)
        try:
            if client:
                assert params.servername is not None
                comm.client(params.servername, params.port, str(ip))
            else:
                print("\n************************************", file=out)
                print("* Waiting for client to connect... *", file=out)
                print("************************************", file=out, flush=True)
                comm.server(params.port, str(ip), args.timeout)
            session.run(comm)
        finally:
            comm.close()
    finally:
        opened.close()
    _write_results(args, session.rows, params, out)
    return 0


def _write_results(
    args: argparse.Namespace, rows: list[ResultRow], params: PerfParams, out: TextIO
) -> None:
    meta = {
        "test": params.tool.name,
        "machine": params.machine,
        "device": args.ib_dev,
        "iters": params.iters,
        "num_qps": params.num_qps,
        "report_gbits": params.report_gbits,
    }
    for path, writer in ((args.csv, "csv"), (args.json, "json")):
        if not path:
            continue
        if path == "-":
            _emit(writer, rows, meta, out)
        else:
            with open(path, "w", encoding="utf-8", newline="") as f:
                _emit(writer, rows, meta, f)
    if args.plot:
        if not rows:
            raise PerfError(f" Nothing to plot: the {params.machine} measured nothing")
        try:
            write_plot(rows, args.plot, f"softrdma perf {params.tool.name}")
        except ImportError:
            raise PerfError(" --plot needs matplotlib (pip install 'softrdma[perf]')") from None


def _emit(kind: str, rows: list[ResultRow], meta: dict[str, object], f: TextIO) -> None:
    if kind == "csv":
        write_csv(rows, f)
    else:
        write_json(rows, f, meta)


def _v4(addr: str) -> str:
    return addr[7:] if addr.startswith("::ffff:") else addr
