"""``pyverbs.cmid``: RDMA CM connections through pyverbs' CMID — between
two processes on the real network (RoCEv2 over UDP on loopback), and with
the asynchronous event-channel API between two devices in one process."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fabric.netaddr import loopback_addresses
from tests.pyverbs.conftest import pyverbs_env

TIMEOUT = 60.0


def _peer(
    role: str, own: str, server: str, port: int, out: Path, device: str
) -> subprocess.Popen[bytes]:
    env = pyverbs_env() | {
        "SOFTRDMA_PYVERBS_NETWORK": f"udp:{own}",
        "SOFTRDMA_PYVERBS_DEVICES": device,
    }
    root = str(Path(__file__).resolve().parents[2])
    with out.open("wb") as f:
        return subprocess.Popen(
            [sys.executable, "-m", "tests.pyverbs.cm_peer", role, server, str(port)],
            stdout=f,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=root,
        )


@pytest.mark.parametrize(
    ("srv_dev", "cli_dev"), [("rxe0:cpu", "rxe0:cpu"), ("hca0:iommu", "hca1:swiotlb")]
)
def test_rc_between_two_processes_through_cmid(tmp_path: Path, srv_dev: str, cli_dev: str) -> None:
    ip_s, ip_c = loopback_addresses(2)
    srv_out, cli_out = tmp_path / "server.out", tmp_path / "client.out"
    server = _peer("server", ip_s, ip_s, 7471, srv_out, srv_dev)
    client: subprocess.Popen[bytes] | None = None
    try:
        end = time.monotonic() + TIMEOUT
        while "listening" not in srv_out.read_text():
            assert server.poll() is None and time.monotonic() < end, srv_out.read_text()
            time.sleep(0.05)
        client = _peer("client", ip_c, ip_s, 7471, cli_out, cli_dev)
        assert client.wait(TIMEOUT) == 0, cli_out.read_text()
        assert server.wait(TIMEOUT) == 0, srv_out.read_text()
    finally:
        for p in (server, client):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait(10)
    assert cli_out.read_text() == "client got 0 12\n"
    assert srv_out.read_text() == "listening\nserver got 0 b'done' b'written'\n"


@pytest.mark.parametrize("machine", ["rxe0:cpu,rxe1:cpu"], indirect=True)
def test_async_connect_accept_traffic_and_reject_in_process(machine: str) -> None:
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e
    from pyverbs.cmid import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam
    from pyverbs.qp import QPCap, QPInitAttr

    init = QPInitAttr(qp_type=e.IBV_QPT_RC, cap=QPCap(max_send_wr=4, max_recv_wr=4))

    def event(ch: CMEventChannel, want: int) -> CMEvent:
        ev = CMEvent(ch)
        assert ev.event_type == want, ev.event_str()
        ev.ack_cm_event()
        return ev

    s_ch, c_ch = CMEventChannel(), CMEventChannel()
    listener = CMID(creator=s_ch)
    listener.bind_addr(AddrInfo(src="127.0.0.1", src_service=7000, flags=ce.RAI_PASSIVE))
    listener.listen()
    for accept in (False, True):
        client = CMID(creator=c_ch)
        client.resolve_addr(AddrInfo(src="127.0.0.2", dst="127.0.0.1", dst_service=7000))
        event(c_ch, ce.RDMA_CM_EVENT_ADDR_RESOLVED)
        client.resolve_route()
        event(c_ch, ce.RDMA_CM_EVENT_ROUTE_RESOLVED)
        client.create_qp(init)
        assert client.dev_name == "rxe1"
        # rdma-core's async traffic test: the QP's ACK timeout from the ID
        client.set_option(ce.RDMA_OPTION_ID, ce.RDMA_OPTION_ID_ACK_TIMEOUT, 21, 1)
        param = ConnParam()
        param.set_private_data(b"hello")
        client.connect(param)
        req = CMEvent(s_ch)
        assert req.event_type == ce.RDMA_CM_EVENT_CONNECT_REQUEST
        assert req.private_data[:5] == b"hello"
        child = CMID(creator=req, listen_id=listener)
        req.ack_cm_event()
        if not accept:
            child.reject(b"go away")
            ev = event(c_ch, ce.RDMA_CM_EVENT_REJECTED)
            assert ev.private_data[:7] == b"go away"
            client.close()
            child.close()
            continue
        child.create_qp(init)
        assert child.dev_name == "rxe0"
        rmsg = child.reg_msgs(32)
        child.post_recv(rmsg)
        child.accept(ConnParam())
        event(c_ch, ce.RDMA_CM_EVENT_ESTABLISHED)
        event(s_ch, ce.RDMA_CM_EVENT_ESTABLISHED)
        attr, qp_init = client.query_qp(e.IBV_QP_TIMEOUT)
        assert (attr.timeout, attr.qp_state, qp_init.cap.max_send_wr) == (21, e.IBV_QPS_RTS, 4)
        assert child.query_qp(e.IBV_QP_TIMEOUT)[0].timeout == 19  # the CM's, from the REQ
        smsg = client.reg_msgs(32)
        smsg.write(b"over the CM", 11)
        client.post_send(smsg, length=11)
        assert client.get_send_comp().status == e.IBV_WC_SUCCESS
        wc = child.get_recv_comp()
        assert (wc.status, wc.byte_len, rmsg.read(11, 0)) == (0, 11, b"over the CM")
        assert child.qpn == wc.qp_num
        # the peer's DREQ is an event; our DREP answers it (rdma_disconnect)
        client.disconnect()
        event(s_ch, ce.RDMA_CM_EVENT_DISCONNECTED)
        child.disconnect()
        event(c_ch, ce.RDMA_CM_EVENT_DISCONNECTED)
        # the QP is in ERR: a send flushes
        client.post_send(smsg)
        assert client.get_send_comp().status == e.IBV_WC_WR_FLUSH_ERR
        client.close()
        child.close()
        client.close()  # closing twice is harmless
    listener.close()


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_cmid_errors(machine: str) -> None:
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e
    from pyverbs.cmid import CMID, AddrInfo, CMEventChannel, ConnParam, UDParam
    from pyverbs.pyverbs_error import PyverbsRDMAError, PyverbsUserError
    from pyverbs.qp import QPInitAttr

    with pytest.raises(PyverbsRDMAError) as ex:
        AddrInfo(src="127.0.0.1", port_space=ce.RDMA_PS_UDP)
    assert ex.value.error_code == errno.EOPNOTSUPP
    with pytest.raises(PyverbsRDMAError) as ex:
        UDParam()
    assert ex.value.error_code == errno.EOPNOTSUPP
    ch = CMEventChannel()
    cid = CMID(creator=ch)
    with pytest.raises(PyverbsRDMAError) as ex:
        cid.resolve_addr(AddrInfo(src="127.0.0.1", flags=ce.RAI_PASSIVE))  # no destination
    assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        cid.connect(ConnParam())  # nothing resolved
    assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        cid.post_recv(None)  # type: ignore[arg-type]
    assert ex.value.error_code == errno.EINVAL  # no QP
    with pytest.raises(PyverbsRDMAError) as ex:
        cid.query_qp(e.IBV_QP_STATE)
    assert ex.value.error_code == errno.EINVAL  # no QP
    # rdma_set_option: pyverbs passes the ACK timeout only, as a uint8_t
    ack = ce.RDMA_OPTION_ID_ACK_TIMEOUT
    with pytest.raises(PyverbsUserError):
        cid.set_option(ce.RDMA_OPTION_ID, 0, 0, 1)  # RDMA_OPTION_ID_TOS
    with pytest.raises(OverflowError):
        cid.set_option(ce.RDMA_OPTION_ID, ack, 256, 1)
    for level, optval, optlen, err in ((1, 14, 1, errno.ENOSYS), (0, 14, 4, errno.EINVAL),
                                       (0, 32, 1, errno.EINVAL)):  # fmt: skip
        with pytest.raises(PyverbsRDMAError) as ex:
            cid.set_option(level, ack, optval, optlen)
        assert ex.value.error_code == err, (level, optval, optlen)
    cid.set_option(ce.RDMA_OPTION_ID, ack, 14, 1)
    # a synchronous endpoint to a port nobody listens on is refused
    with pytest.raises(PyverbsRDMAError) as ex:
        CMID(
            creator=AddrInfo(dst="127.0.0.1", dst_service=9),
            qp_init_attr=QPInitAttr(qp_type=e.IBV_QPT_RC),
        ).connect(ConnParam())
    assert ex.value.error_code == errno.ECONNREFUSED
    cid.close()


def test_udp_network_setting_and_fork(pyverbs_on_path: None) -> None:
    from pyverbs.pyverbs_error import PyverbsUserError

    from pyverbs import _softrdma as sim

    assert sim.parse_network("") is None and sim.parse_network("inproc") is None
    assert str(sim.parse_network("udp")) == "127.0.0.1"
    assert str(sim.parse_network("udp:127.0.5.9")) == "127.0.5.9"
    for bad in ("tcp", "udp:nowhere", "udp:::1"):
        with pytest.raises(PyverbsUserError):
            sim.parse_network(bad)
    # a forked child of a process on the real network builds its own machine
    (ip,) = loopback_addresses(1)
    script = (
        "import os\n"
        "from pyverbs import _softrdma as sim\n"
        "import pyverbs.device as d\n"
        "ctx = d.Context(name='rxe0')\n"
        "assert sim.process().udp_addr is not None\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    os._exit(0 if sim._PROCESS is None else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "print(os.waitstatus_to_exitcode(status), sim._PROCESS is not None)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=pyverbs_env() | {"SOFTRDMA_PYVERBS_NETWORK": f"udp:{ip}"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.stdout == "0 True\n", out.stderr


@pytest.mark.parametrize("machine", ["rxe0:cpu,rxe1:iommu"], indirect=True)
def test_an_external_qp_is_connected_by_the_application(machine: str) -> None:
    """rdma-core's external-QP flow: IDs without QPs connect QPs the
    application made (``ConnParam(qp_num=...)``) and moved with
    ``init_qp_attr``; the active side gets CONNECT_RESPONSE, not
    ESTABLISHED, and ``establish`` sends the RTU the passive side waits for."""
    import pyverbs.cm_enums as ce
    import pyverbs.enums as e
    from pyverbs.cmid import CMID, AddrInfo, CMEvent, CMEventChannel, ConnParam
    from pyverbs.cq import CQ
    from pyverbs.pyverbs_error import PyverbsRDMAError
    from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
    from pyverbs.wr import SGE, RecvWR, SendWR

    def event(ch: CMEventChannel, want: int) -> None:
        ev = CMEvent(ch)
        assert ev.event_type == want, ev.event_str()
        ev.ack_cm_event()

    def external_qp(cmid: CMID) -> tuple[QP, CQ]:
        cq = CQ(cmid.context, 8, None, None, 0)
        init = QPInitAttr(qp_type=e.IBV_QPT_RC, rcq=cq, scq=cq, cap=QPCap(max_recv_wr=1))
        return QP(cmid.pd, init, QPAttr()), cq  # in INIT, as pyverbs leaves an RC QP

    def ready(cmid: CMID, qp: QP) -> None:
        for state in (e.IBV_QPS_INIT, e.IBV_QPS_RTR, e.IBV_QPS_RTS):
            qp.modify(*cmid.init_qp_attr(state))

    s_ch, c_ch = CMEventChannel(), CMEventChannel()
    listener = CMID(creator=s_ch)
    listener.bind_addr(AddrInfo(src="127.0.0.1", src_service=7001, flags=ce.RAI_PASSIVE))
    listener.listen()
    client = CMID(creator=c_ch)
    client.resolve_addr(AddrInfo(src="127.0.0.2", dst="127.0.0.1", dst_service=7001))
    event(c_ch, ce.RDMA_CM_EVENT_ADDR_RESOLVED)
    client.resolve_route()
    event(c_ch, ce.RDMA_CM_EVENT_ROUTE_RESOLVED)
    with pytest.raises(PyverbsRDMAError) as ex:
        client.init_qp_attr(e.IBV_QPS_RTR)  # nothing from the peer yet
    assert ex.value.error_code == errno.EINVAL
    c_qp, c_cq = external_qp(client)
    client.connect(ConnParam(qp_num=c_qp.qp_num))
    req = CMEvent(s_ch)
    assert req.event_type == ce.RDMA_CM_EVENT_CONNECT_REQUEST
    child = CMID(creator=req, listen_id=listener)
    req.ack_cm_event()
    s_qp, s_cq = external_qp(child)
    ready(child, s_qp)  # before accept, from the REQ
    buf = child.reg_msgs(16)
    s_qp.post_recv(RecvWR(1, 1, [SGE(buf.buf, 16, buf.lkey)]))
    child.accept(ConnParam(qp_num=s_qp.qp_num))
    event(c_ch, ce.RDMA_CM_EVENT_CONNECT_RESPONSE)
    ready(client, c_qp)
    attr, _ = c_qp.query(e.IBV_QP_DEST_QPN | e.IBV_QP_SQ_PSN | e.IBV_QP_RQ_PSN)
    s_attr, _ = s_qp.query(e.IBV_QP_DEST_QPN | e.IBV_QP_SQ_PSN | e.IBV_QP_RQ_PSN)
    assert (attr.dest_qp_num, s_attr.dest_qp_num) == (s_qp.qp_num, c_qp.qp_num)
    assert (attr.sq_psn, attr.rq_psn) == (s_attr.rq_psn, s_attr.sq_psn)
    client.establish()
    event(s_ch, ce.RDMA_CM_EVENT_ESTABLISHED)
    with pytest.raises(PyverbsRDMAError) as ex:
        client.establish()  # once only
    assert ex.value.error_code == errno.EINVAL
    with pytest.raises(PyverbsRDMAError) as ex:
        client.init_qp_attr(e.IBV_QPS_SQD)
    assert ex.value.error_code == errno.EINVAL
    msg = client.reg_msgs(16)
    msg.write(b"external", 8)
    c_qp.post_send(SendWR(2, opcode=e.IBV_WR_SEND, num_sge=1, sg=[SGE(msg.buf, 8, msg.lkey)]))
    for cq in (c_cq, s_cq):
        for _ in range(1000):
            n, wcs = cq.poll()
            if n:
                assert wcs[0].status == e.IBV_WC_SUCCESS
                break
        else:
            raise AssertionError("no completion")
    assert buf.read(8, 0) == b"external"
    for obj in (client, child, listener):
        obj.close()
