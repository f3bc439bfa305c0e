"""The ``softrdma`` command (``python -m softrdma``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from types import ModuleType


def _tools() -> dict[str, tuple[ModuleType, str]]:
    """The tool subcommands: each module has ``build_parser(p)`` and ``run(args, parser)``."""
    from softrdma.cli import devinfo, iser, perf, pyverbs, rc_pingpong, rping, srp

    return {
        "rc-pingpong": (rc_pingpong, "RC ping-pong over UDP, like ibv_rc_pingpong"),
        "rping": (rping, "RDMA CM connection and RDMA ping-pong, like rping"),
        "devinfo": (devinfo, "device attributes, like ibv_devinfo"),
        "srp": (srp, "SRP (SCSI RDMA Protocol): a target like ib_srpt, an initiator like ib_srp"),
        "iser": (iser, "iSER (iSCSI Extensions for RDMA): a target like LIO's ib_isert"),
        "perf": (perf, "perftest's bandwidth and latency tests, like ib_write_bw"),
        "pyverbs-path": (pyverbs, "print the directory to put on PYTHONPATH for pyverbs"),
        "pyverbs-tests": (pyverbs, "run rdma-core's pyverbs test suite on softrdma devices"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softrdma",
        description="A software RDMA stack: the kernel's memory, DMA and RDMA model in Python.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demonstration of the stack end to end")
    demo_sub = demo.add_subparsers(dest="demo")
    dma = demo_sub.add_parser("dma", help="one buffer through every DMA backend")
    dma.add_argument("--size", type=int, default=6000, help="buffer size in bytes (default 6000)")
    rdma = demo_sub.add_parser("rdma", help="a DMA address in a message, used by a remote peer")
    rdma.add_argument(
        "--pcap", default="softrdma-demo.pcap", help="where to write the frames ('' for none)"
    )
    rdma.add_argument(
        "--drop", type=float, default=0.1, help="fabric drop and reorder rate (default 0.1)"
    )
    srp_demo = demo_sub.add_parser("srp", help="SRP on every device pairing, data verified")
    from softrdma.cli.srp_demo import build_demo_parser

    build_demo_parser(srp_demo)
    for name, (module, text) in _tools().items():
        module.build_parser(sub.add_parser(name, help=text, description=text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``softrdma`` command. ``softrdma demo`` runs every demo."""
    parser = build_parser()
    args = parser.parse_args(argv)
    tools = _tools()
    if args.command in tools:
        status: int = tools[args.command][0].run(args, parser)
        return status
    from softrdma.cli import demo_dma, demo_rdma, srp_demo

    if args.command != "demo":
        return 2
    status = 0
    if args.demo in (None, "dma"):
        status |= demo_dma.run(getattr(args, "size", 6000), out=sys.stdout)
    if args.demo is None:
        sys.stdout.write("\n")
    if args.demo in (None, "rdma"):
        status |= demo_rdma.run(
            sys.stdout,
            pcap=getattr(args, "pcap", "softrdma-demo.pcap") or None,
            drop=getattr(args, "drop", 0.1),
        )
    if args.demo is None:
        sys.stdout.write("\n")
    if args.demo in (None, "srp"):
        status |= srp_demo.run_demo(args, sys.stdout, sys.stderr)
    return status
