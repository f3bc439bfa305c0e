"""One side of an RC connection made with ``pyverbs.cmid``'s synchronous
endpoints, run as a process of its own: ``python -m tests.pyverbs.cm_peer
server|client SERVER_ADDR PORT``. The server sends the client an MR to
write into; the client writes, then both exchange messages. Prints what
each side saw; exits non-zero on any failure."""

from __future__ import annotations

import struct
import sys

import pyverbs.cm_enums as ce
import pyverbs.enums as e
from pyverbs.cmid import CMID, AddrInfo, ConnParam
from pyverbs.qp import QPCap, QPInitAttr

_ADDR = struct.Struct("<QI")


def main(role: str, server: str, port: str) -> int:
    init = QPInitAttr(qp_type=e.IBV_QPT_RC, cap=QPCap(max_send_wr=4, max_recv_wr=4))
    if role == "server":
        ai = AddrInfo(src=server, src_service=port, flags=ce.RAI_PASSIVE)
        listen = CMID(creator=ai, qp_init_attr=init)
        listen.listen()
        print("listening", flush=True)
        conn = listen.get_request()  # with a QP of init's, as rdma_get_request makes
        msg = conn.reg_msgs(64)
        target = conn.reg_write(64)
        conn.post_recv(msg)
        conn.accept(ConnParam())
        msg.write(_ADDR.pack(target.buf, target.rkey), _ADDR.size)
        conn.post_send(msg, length=_ADDR.size)
        assert conn.get_send_comp().status == e.IBV_WC_SUCCESS
        conn.post_recv(msg)
        wc = conn.get_recv_comp()  # the client says it has written
        print("server got", wc.status, msg.read(wc.byte_len, 0), target.read(7, 0), flush=True)
        conn.disconnect()
        conn.close()
        listen.close()
    else:
        conn = CMID(creator=AddrInfo(dst=server, dst_service=port), qp_init_attr=init)
        msg = conn.reg_msgs(64)
        conn.post_recv(msg)
        conn.connect(ConnParam())
        wc = conn.get_recv_comp()
        addr, rkey = _ADDR.unpack(msg.read(_ADDR.size, 0))
        data = conn.reg_msgs(64)
        data.write(b"written", 7)
        conn.post_write(data, 7, addr, rkey)
        assert conn.get_send_comp().status == e.IBV_WC_SUCCESS
        msg.write(b"done", 4)
        conn.post_send(msg, length=4)
        assert conn.get_send_comp().status == e.IBV_WC_SUCCESS
        print("client got", wc.status, wc.byte_len, flush=True)
        conn.disconnect()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
