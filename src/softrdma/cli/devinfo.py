"""``softrdma devinfo``: rdma-core's ``ibv_devinfo`` for the device a
softrdma tool opens with the same options (``-d``, ``--ip``), in the same
layout, plus the link it is bound to and how its ICRC check works."""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from softrdma.cli.netdev import DEVICES, add_device_options, local_address, open_device, parse_int
from softrdma.drivers.roce import RoceDevice
from softrdma.errors import SoftRdmaError
from softrdma.verbs.device import IB_DEVICE_MEM_MGT_EXTENSIONS, IbDevice

__all__ = ["build_parser", "print_device", "run"]

#: ``device_cap_flags`` bits ``ibv_devinfo -v`` names (``enum ibv_device_cap_flags``).
_CAP_FLAGS = {IB_DEVICE_MEM_MGT_EXTENSIONS: "MEM_MGT_EXTENSIONS"}
_MTU_ENUM = {256: 1, 512: 2, 1024: 3, 2048: 4, 4096: 5}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """``ibv_devinfo``'s options plus the shared device options."""
    p = parser or argparse.ArgumentParser(prog="softrdma devinfo")
    p.description = "Print the attributes of a softrdma device, like ibv_devinfo."
    p.add_argument("-i", "--ib-port", type=parse_int, default=0, help="port to show (default all)")
    p.add_argument("-l", "--list", action="store_true", help="print only the device names")
    p.add_argument("-v", "--verbose", action="store_true", help="print all the attributes")
    add_device_options(p)
    return p


def _guid(dev: IbDevice) -> str:
    """The node GUID rxe derives from the MAC (``addrconf_addr_eui48``)."""
    m = dev.mac
    eui = bytes([m[0] ^ 2, m[1], m[2], 0xFF, 0xFE, m[3], m[4], m[5]])
    return ":".join(eui[i : i + 2].hex() for i in range(0, 8, 2))


def print_device(dev: RoceDevice, out: TextIO, *, verbose: bool = False, port: int = 0) -> None:
    """Print ``dev`` as ``ibv_devinfo`` does (``print_hca_cap``)."""
    a = dev.query_device()
    w = out.write
    w(f"hca_id:\t{dev.name}\n")
    w("\ttransport:\t\t\tInfiniBand (0)\n")
    w(f"\tnode_guid:\t\t\t{_guid(dev)}\n")
    w(f"\tsys_image_guid:\t\t\t{_guid(dev)}\n")
    w(f"\tvendor_id:\t\t\t0x{a.vendor_id:04x}\n")
    w("\tvendor_part_id:\t\t\t0\n")
    w("\thw_ver:\t\t\t\t0x0\n")
    w("\tphys_port_cnt:\t\t\t1\n")
    w(f"\tlink:\t\t\t\t{dev.link.description}\n")
    if verbose:
        w(f"\tmax_mr_size:\t\t\t0x{a.max_mr_size:x}\n")
        w(f"\tpage_size_cap:\t\t\t0x{a.page_size_cap:x}\n")
        w(f"\tmax_qp:\t\t\t\t{a.max_qp}\n")
        w(f"\tmax_qp_wr:\t\t\t{a.max_qp_wr}\n")
        w(f"\tdevice_cap_flags:\t\t0x{a.device_cap_flags:08x}\n")
        for bit, name in _CAP_FLAGS.items():
            if a.device_cap_flags & bit:
                w(f"\t\t\t\t\t{name}\n")
        w(f"\tmax_sge:\t\t\t{a.max_send_sge}\n")
        w(f"\tmax_sge_rd:\t\t\t{a.max_sge_rd}\n")
        w(f"\tmax_cq:\t\t\t\t{a.max_cq}\n")
        w(f"\tmax_cqe:\t\t\t{a.max_cqe}\n")
        w(f"\tmax_mr:\t\t\t\t{a.max_mr}\n")
        w(f"\tmax_pd:\t\t\t\t{a.max_pd}\n")
        w(f"\tmax_qp_rd_atom:\t\t\t{a.max_qp_rd_atom}\n")
        w(f"\tmax_qp_init_rd_atom:\t\t{a.max_qp_init_rd_atom}\n")
        w("\tatomic_cap:\t\t\tATOMIC_HCA (1)\n")
        w("\tmax_srq:\t\t\t0\n")
        w("\tmax_pkeys:\t\t\t1\n")
    if port not in (0, 1):
        return
    p = dev.query_port(1)
    w("\t\tport:\t1\n")
    w("\t\t\tstate:\t\t\tPORT_ACTIVE (4)\n")
    w(f"\t\t\tmax_mtu:\t\t{p.max_mtu.size} ({_MTU_ENUM[p.max_mtu.size]})\n")
    w(f"\t\t\tactive_mtu:\t\t{p.active_mtu.size} ({_MTU_ENUM[p.active_mtu.size]})\n")
    w("\t\t\tsm_lid:\t\t\t0\n")
    w("\t\t\tport_lid:\t\t0\n")
    w("\t\t\tport_lmc:\t\t0x00\n")
    w("\t\t\tlink_layer:\t\tEthernet\n")
    if verbose:
        w("\t\t\tmax_msg_sz:\t\t0x80000000\n")
        w(f"\t\t\tgid_tbl_len:\t\t{p.gid_tbl_len}\n")
        for index in range(p.gid_tbl_len):
            g = dev.query_gid(1, index)
            text = ":".join(g[i : i + 2].hex() for i in range(0, 16, 2))
            w(f"\t\t\tGID[{index:3d}]:\t\t{text}\n")
    w("\n")


def run(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Run with parsed arguments."""
    if args.list:
        out.write(f"{len(DEVICES)} HCAs found:\n")
        for name in DEVICES:
            out.write(f"\t{name}\n")
        out.write("\n")
        return 0
    if args.ib_dev not in DEVICES:
        err.write(f"IB device '{args.ib_dev}' wasn't found\n")
        return 255
    if args.ib_port not in (0, 1):
        err.write("Invalid port requested for device\n")
        return 4
    try:
        opened = open_device(args, local_address(args, None))
    except (SoftRdmaError, OSError) as e:
        err.write(f"softrdma devinfo: {e}\n")
        return 1
    try:
        print_device(opened.device, out, verbose=args.verbose, port=args.ib_port)
    finally:
        opened.close()
    return 0
