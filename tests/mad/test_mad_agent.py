"""The MAD layer on the GSI QP between two simulated hosts: agents, request
/ response matching, timeouts and retries, unmatched and malformed MADs,
and the buffer rules (kmalloc + ib_dma_map_single, unmapped at completion,
nothing leaked) on every device kind."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.inproc import Fabric
from softrdma.mad.agent import MadAgent, MadPortError, MadRecvWc, MadSendBuf, MadSendWc, ib_mad_port
from softrdma.mad.header import MAD_SIZE, MadHdr, MadMethod, MadStatus, MgmtClass, make_mad
from softrdma.verbs.ah import AhAttr
from softrdma.verbs.enums import (
    IbWcStatus,
)
from tests.mad.gsi import raw_gsi_sender
from tests.rdma.nodes import make_device

KINDS = ["cpu", "hw-iommu", "hw-swiotlb", "hw-direct"]
TEST_CLASS = MgmtClass.DEVICE_MGMT


@dataclass
class Client:
    """An agent with everything its handlers saw."""

    received: list[tuple[MadSendBuf | None, MadRecvWc]] = field(default_factory=list)
    sent: list[MadSendWc] = field(default_factory=list)
    answer: bool = False

    def recv(self, agent: MadAgent, buf: MadSendBuf | None, recv: MadRecvWc) -> None:
        self.received.append((buf, recv))
        if self.answer and buf is None:
            agent.respond(recv, make_mad(recv.hdr.response(), b"pong"))

    def send(self, agent: MadAgent, wc: MadSendWc) -> None:
        self.sent.append(wc)
        if not wc.send_buf.free_when_done:
            wc.send_buf.free()


def pair(
    kinds: tuple[str, str] = ("cpu", "hw-iommu"), drop: float = 0.0
) -> tuple[Fabric, RoceDevice, RoceDevice]:
    fabric = Fabric(seed=3)
    fabric.set_faults(drop=drop)
    a = make_device(kinds[0], fabric, "10.0.0.1")
    b = make_device(kinds[1], fabric, "10.0.0.2")
    return fabric, a, b


def request(agent: MadAgent, method: int = MadMethod.GET, attr: int = 0x10) -> bytes:
    hdr = MadHdr(mgmt_class=agent.mgmt_class, class_version=1, method=method,
                 tid=agent.next_tid(), attr_id=attr)  # fmt: skip
    return make_mad(hdr, b"ping")


@pytest.mark.parametrize("kinds", [("cpu", "hw-iommu"), ("hw-swiotlb", "hw-direct")], ids="-".join)
def test_request_response_and_no_leaks(kinds: tuple[str, str]) -> None:
    fabric, a, b = pair(kinds)
    ca, cb = Client(), Client(answer=True)
    pa, pb = ib_mad_port(a), ib_mad_port(b)
    assert ib_mad_port(a) is pa  # one MAD port per device port
    qa = pa.register_agent(TEST_CLASS, 1, ca.recv, ca.send)
    pb.register_agent(TEST_CLASS, 1, cb.recv, cb.send, methods=[MadMethod.GET])
    for _ in range(5):
        buf = qa.create_send_mad(AhAttr(b.query_gid()), request(qa), timeout_ms=100, retries=2)
        qa.post_send_mad(buf)
    fabric.loop.run()
    assert [wc.status for wc in ca.sent] == [IbWcStatus.SUCCESS] * 5
    assert len(cb.received) == 5 and all(buf is None for buf, _ in cb.received)
    # Each response reached the request it answers.
    assert len(ca.received) == 5
    for sent, recv in ca.received:
        assert sent is not None and recv.hdr.tid == sent._tid
        assert recv.hdr.method == MadMethod.GET_RESP and recv.mad[24:28] == b"pong"
        assert recv.ah_attr.dgid == b.query_gid() and recv.src_qp == 1
    assert pa.stats["retries"] == 0 and pb.stats["rx_mads"] == 5
    for dev, port in ((a, pa), (b, pb)):
        port.close()
        dev.dma_device.release()  # the debug checker reports leaked mappings here
        debug = dev.dma_device.platform.dma_debug
        assert debug is not None and not debug.reports


def test_lost_request_is_retried_then_times_out() -> None:
    fabric, a, b = pair()
    ca = Client()
    pa = ib_mad_port(a)
    qa = pa.register_agent(TEST_CLASS, 1, ca.recv, ca.send)
    ib_mad_port(b)  # up, but nobody serves the class: SEND is dropped
    buf = qa.create_send_mad(
        AhAttr(b.query_gid()), request(qa, MadMethod.SEND), timeout_ms=50, retries=3
    )
    qa.post_send_mad(buf)
    start = fabric.loop.time()
    fabric.loop.run()
    assert [wc.status for wc in ca.sent] == [IbWcStatus.RESP_TIMEOUT_ERR]
    assert pa.stats["tx_mads"] == 4 and pa.stats["retries"] == 3 and pa.stats["timeouts"] == 1
    assert fabric.loop.time() - start == pytest.approx(0.2, abs=0.01)  # 4 × 50 ms
    assert ib_mad_port(b).stats["rx_no_agent"] == 4


def test_responses_survive_loss_through_retries() -> None:
    fabric, a, b = pair(drop=0.3)
    ca, cb = Client(), Client(answer=True)
    qa = ib_mad_port(a).register_agent(TEST_CLASS, 1, ca.recv, ca.send)
    ib_mad_port(b).register_agent(TEST_CLASS, 1, cb.recv, cb.send, methods=[MadMethod.GET])
    for _ in range(20):
        qa.post_send_mad(
            qa.create_send_mad(AhAttr(b.query_gid()), request(qa), timeout_ms=20, retries=10)
        )
    fabric.loop.run()
    assert [wc.status for wc in ca.sent] == [IbWcStatus.SUCCESS] * 20
    assert len(ca.received) == 20  # one response per request, duplicates dropped
    assert ib_mad_port(a).stats["retries"] > 0


def test_unserved_get_is_answered_unsupported_and_send_is_dropped() -> None:
    fabric, a, b = pair()
    ca = Client()
    qa = ib_mad_port(a).register_agent(TEST_CLASS, 1, ca.recv, ca.send)
    ib_mad_port(b)
    qa.post_send_mad(
        qa.create_send_mad(AhAttr(b.query_gid()), request(qa), timeout_ms=100, retries=0)
    )
    fabric.loop.run()
    [(_, recv)] = ca.received
    assert recv.hdr.method == MadMethod.GET_RESP
    assert recv.hdr.status == MadStatus.UNSUPPORTED_METHOD_ATTRIB
    assert recv.mad[24:28] == b"ping"
    assert [wc.status for wc in ca.sent] == [IbWcStatus.SUCCESS]


def test_agent_registration_rules() -> None:
    _, a, _ = pair()
    port = ib_mad_port(a)
    c = Client()
    port.register_agent(TEST_CLASS, 1, c.recv, c.send, methods=[MadMethod.GET])
    with pytest.raises(MadPortError, match="served by"):
        port.register_agent(TEST_CLASS, 1, c.recv, c.send, methods=[MadMethod.GET, 5])
    port.register_agent(TEST_CLASS, 2, c.recv, c.send, methods=[MadMethod.GET])
    with pytest.raises(MadPortError, match="responses"):
        port.register_agent(TEST_CLASS, 1, c.recv, c.send, methods=[MadMethod.GET_RESP])


def test_cancel_and_unregister_flush_outstanding_sends() -> None:
    fabric, a, b = pair()
    ca = Client()
    qa = ib_mad_port(a).register_agent(TEST_CLASS, 1, ca.recv, ca.send)
    ib_mad_port(b)
    bufs = [
        qa.create_send_mad(AhAttr(b.query_gid()), request(qa, 3), timeout_ms=1000, retries=5)
        for _ in range(3)
    ]
    for buf in bufs:
        qa.post_send_mad(buf)
    fabric.loop.run(until=fabric.loop.time() + 0.01)
    qa.cancel_mad(bufs[0])
    assert [wc.status for wc in ca.sent] == [IbWcStatus.WR_FLUSH_ERR]
    qa.unregister()
    assert [wc.status for wc in ca.sent] == [IbWcStatus.WR_FLUSH_ERR] * 3
    fabric.loop.run()
    assert len(ca.sent) == 3  # no handler after unregister, no timer left
    with pytest.raises(MadPortError):
        qa.post_send_mad(bufs[0])


def test_malformed_mads_are_counted_and_do_not_disturb_agents() -> None:
    fabric, a, b = pair()
    cb = Client(answer=True)
    pb = ib_mad_port(b)
    pb.register_agent(TEST_CLASS, 1, cb.recv, cb.send, methods=[MadMethod.GET])
    send = raw_gsi_sender(a, b.query_gid())
    good = make_mad(MadHdr(mgmt_class=TEST_CLASS, class_version=1, method=MadMethod.GET), b"x")
    send(b"")  # empty
    send(good[:10])  # shorter than the header
    send(bytes([2]) + good[1:])  # base version 2
    send(make_mad(MadHdr(mgmt_class=0x42, class_version=1, method=MadMethod.SEND)))
    send(make_mad(MadHdr(mgmt_class=TEST_CLASS, class_version=1, method=0x81, tid=7 << 32)))
    send(good[:100])  # short but with a header: taken, zero-padded
    fabric.loop.run()
    assert pb.stats["rx_truncated"] == 2
    assert pb.stats["rx_bad_base_version"] == 1
    assert pb.stats["rx_no_agent"] == 2  # unknown class; response for no agent
    assert len(cb.received) == 1 and len(cb.received[0][1].mad) == MAD_SIZE
    assert pb.stats["rx_mads"] == 6
