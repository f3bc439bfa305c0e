"""The ``softrdma`` command (``python -m softrdma``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softrdma",
        description="A software RDMA stack: the kernel's memory, DMA and RDMA model in Python.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run a demonstration of the stack end to end")
    demo_sub = demo.add_subparsers(dest="demo", required=True)
    dma = demo_sub.add_parser("dma", help="one buffer through every DMA backend")
    dma.add_argument("--size", type=int, default=6000, help="buffer size in bytes (default 6000)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo" and args.demo == "dma":
        from softrdma.cli.demo_dma import run

        return run(args.size, out=sys.stdout)
    return 2
