"""softrdma.fabric.udp: devices on real UDP sockets over loopback, on the
real-time progress thread."""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from softrdma.drivers.roce import RoceDevice
from softrdma.fabric.pcap import read_pcap
from softrdma.fabric.udp import LinkError, UdpLink, UdpNetwork, have_cap_net_raw
from softrdma.transport.headers import Reth
from softrdma.transport.packet import Packet
from softrdma.transport.roce import decode_roce_v2, encode_roce_v2
from softrdma.transport.roce_udp import encode_roce_udp
from softrdma.verbs.enums import IbAccess, IbPdFlags, IbWcStatus, IbWrOpcode
from softrdma.verbs.wr import AtomicWR, RdmaWR, RecvWR, SendWR
from tests.fabric.netaddr import loopback_addresses
from tests.rdma.nodes import Buffer, FrBuffer, connect, make_device, make_node

REMOTE = (
    IbAccess.LOCAL_WRITE | IbAccess.REMOTE_WRITE | IbAccess.REMOTE_READ | IbAccess.REMOTE_ATOMIC
)

needs_root = pytest.mark.skipif(not have_cap_net_raw(), reason="needs CAP_NET_RAW (run as root)")


@pytest.fixture(params=[False, True], ids=["solve", "raw"])
def raw(request: pytest.FixtureRequest) -> bool:
    if request.param and not have_cap_net_raw():
        pytest.skip("raw ICRC mode needs CAP_NET_RAW (run as root)")
    return bool(request.param)


class UdpPair:
    """Two devices, each on its own UdpNetwork (its own progress thread), on
    two loopback addresses, with connected RC QPs."""

    def __init__(self, kind_a: str, kind_b: str, *, raw: bool = False) -> None:
        self.ips = loopback_addresses(2)
        self.nets = [UdpNetwork(raw=raw), UdpNetwork(raw=raw)]
        flags = IbPdFlags.UNSAFE_GLOBAL_RKEY
        self.a = make_node(
            make_device(kind_a, self.nets[0], self.ips[0], netdev_mtu=None), pd_flags=flags
        )
        self.b = make_node(
            make_device(kind_b, self.nets[1], self.ips[1], netdev_mtu=None), pd_flags=flags
        )
        connect(self.a, self.b)

    def close(self) -> None:
        for node in (self.a, self.b):
            node.dev.unregister()
        for net in self.nets:
            net.close()
        for net in self.nets:
            assert net.scheduler.errors == 0, "a callback failed on the progress thread"


@pytest.fixture
def udp_pair(raw: bool) -> Iterator[UdpPair]:
    p = UdpPair("cpu", "hw-iommu", raw=raw)
    yield p
    p.close()


def test_every_operation_over_loopback_udp(udp_pair: UdpPair) -> None:
    a, b = udp_pair.a, udp_pair.b
    assert a.dev.scheduler is not b.dev.scheduler and not a.dev.scheduler.simulated
    size = 200_000  # 196 packets at the loopback MTU of 4096
    src, dst = Buffer(a.dev, size), Buffer(b.dev, size)
    data = os.urandom(size)
    src.fill(data)
    # SEND
    b.qp.post_recv(RecvWR(1, (dst.sge(b.pd.local_dma_lkey),)))
    a.qp.post_send(SendWR(2, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey),)))
    assert b.wait_ok(1)[0].byte_len == size
    a.wait_ok(1)
    assert dst.read() == data
    # WRITE, then READ back
    dst.fill(bytes(size))
    a.qp.post_send(
        RdmaWR(3, IbWrOpcode.RDMA_WRITE, (src.sge(a.pd.local_dma_lkey),),
               remote_addr=dst.dma, rkey=b.pd.unsafe_global_rkey)
    )  # fmt: skip
    a.wait_ok(1)
    assert dst.read() == data
    back = Buffer(a.dev, size)
    a.qp.post_send(
        RdmaWR(4, IbWrOpcode.RDMA_READ, (back.sge(a.pd.local_dma_lkey),),
               remote_addr=dst.dma, rkey=b.pd.unsafe_global_rkey)
    )  # fmt: skip
    a.wait_ok(1)
    assert back.read() == data
    # atomic, on a fast-registered MR (the global rkey allows no atomics)
    cell, orig = FrBuffer(b, 4096, REMOTE), Buffer(a.dev, 8)
    cell.cpu_write(struct.pack("<Q", 40))
    a.qp.post_send(
        AtomicWR(5, IbWrOpcode.ATOMIC_FETCH_AND_ADD, (orig.sge(a.pd.local_dma_lkey),),
                 remote_addr=cell.iova, rkey=cell.rkey, compare_add=2)
    )  # fmt: skip
    a.wait_ok(1)
    assert struct.unpack("<Q", orig.read())[0] == 40
    assert struct.unpack("<Q", cell.cpu_read(8))[0] == 42
    assert a.dev.stats["rcvd_pkts"] > 0 and b.dev.stats["sent_pkts"] > 0


def test_the_target_answers_while_its_application_sleeps(udp_pair: UdpPair) -> None:
    """A READ is served by the target's progress thread although nobody on
    the target polls or posts (the hardware runs on its own)."""
    a, b = udp_pair.a, udp_pair.b
    size = 64 * 1024
    remote = Buffer(b.dev, size)
    remote.fill(b"\xab" * size)
    local = Buffer(a.dev, size)
    a.qp.post_send(
        RdmaWR(1, IbWrOpcode.RDMA_READ, (local.sge(a.pd.local_dma_lkey),),
               remote_addr=remote.dma, rkey=b.pd.unsafe_global_rkey)
    )  # fmt: skip
    assert a.cq.wait(10.0)
    (wc,) = a.cq.poll(1)
    assert wc.status == IbWcStatus.SUCCESS
    assert local.read() == b"\xab" * size


def test_poll_does_not_block_and_wait_times_out(udp_pair: UdpPair) -> None:
    a = udp_pair.a
    start = time.monotonic()
    assert a.cq.poll(4) == []
    assert not a.cq.wait(0.2)
    assert 0.15 < time.monotonic() - start < 5.0


def test_posting_from_many_threads(udp_pair: UdpPair) -> None:
    """Application threads post concurrently with the progress thread."""
    a, b = udp_pair.a, udp_pair.b
    dst = Buffer(b.dev, 4096)
    srcs = [Buffer(a.dev, 64) for _ in range(4)]
    for i, s in enumerate(srcs):
        s.fill(bytes([i]) * 64)

    def writer(i: int) -> None:
        for k in range(10):
            a.qp.post_send(
                RdmaWR(i * 100 + k, IbWrOpcode.RDMA_WRITE, (srcs[i].sge(a.pd.local_dma_lkey),),
                       remote_addr=dst.dma + 64 * i, rkey=b.pd.unsafe_global_rkey)
            )  # fmt: skip
            time.sleep(0.001)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    wcs = a.wait_ok(40)
    assert sorted(wc.wr_id for wc in wcs) == sorted(
        i * 100 + k for i in range(4) for k in range(10)
    )
    assert dst.read(256) == b"".join(bytes([i]) * 64 for i in range(4))


def _send_raw(make: Callable[[int], bytes], src: str, dst: str, port: int = 4791) -> None:
    """Send ``make(sport)`` from ``src`` (the ICRC covers the source port),
    with DF and IPv4 ID 0 as the encoder assumes (``IP_PMTUDISC_DO``; with
    Linux's default ``IP_PMTUDISC_WANT`` the ID is random)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.IPPROTO_IP, 10, 2)  # IP_MTU_DISCOVER, IP_PMTUDISC_DO
        s.bind((src, 0))
        s.sendto(make(s.getsockname()[1]), (dst, port))


def _wait_for(cond: Callable[[], object], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_bad_datagrams_are_counted_by_reason_and_dropped(udp_pair: UdpPair) -> None:
    """Truncated, wrong version, bad ICRC, unknown QP, not from the RC peer:
    each counted under its reason; the progress thread never raises and the
    connection keeps working."""
    a, b = udp_pair.a, udp_pair.b
    ip_a, ip_b = udp_pair.ips
    stray = loopback_addresses(1)[0]

    def pkt(dest_qp: int, psn: int = 0) -> Packet:
        return Packet.build(
            0x0A, dest_qp=dest_qp, psn=psn, ack_req=True, reth=Reth(0, 0, 4), payload=b"abcd"
        )

    def enc(p: Packet, src: str, flip: tuple[int, int] | None = None) -> Callable[[int], bytes]:
        def make(sport: int) -> bytes:
            data = bytearray(
                encode_roce_udp(p, socket.inet_aton(src), socket.inet_aton(ip_b), sport, 4791)
            )
            if flip is not None:
                data[flip[0]] ^= flip[1]
            return bytes(data)

        return make

    stats = b.dev.stats
    _send_raw(lambda sport: b"\x01\x02\x03", ip_a, ip_b)  # shorter than a BTH
    _send_raw(enc(pkt(b.qp.qp_num), ip_a, (20, 0x40)), ip_a, ip_b)  # payload bit: bad ICRC
    _send_raw(enc(pkt(b.qp.qp_num), ip_a, (1, 0x03)), ip_a, ip_b)  # TVer 3
    _send_raw(enc(pkt(0x777), ip_a), ip_a, ip_b)  # no such QP
    _send_raw(enc(pkt(b.qp.qp_num), stray), stray, ip_b)  # not the RC peer
    assert _wait_for(
        lambda: (
            stats["rx_truncated"] == 1
            and stats["rx_bad_icrc"] + stats["rx_bad_version"] == 2
            and stats["rx_no_qp"] == 1
            and stats["rx_wrong_peer"] == 1
        )
    ), dict(stats)
    # The connection is unharmed.
    src, dst = Buffer(a.dev, 100), Buffer(b.dev, 100)
    src.fill(b"z" * 100)
    a.qp.post_send(
        RdmaWR(9, IbWrOpcode.RDMA_WRITE, (src.sge(a.pd.local_dma_lkey),),
               remote_addr=dst.dma, rkey=b.pd.unsafe_global_rkey)
    )  # fmt: skip
    a.wait_ok(1)
    assert dst.read() == b"z" * 100


def test_address_not_on_this_host() -> None:
    with UdpNetwork() as net, pytest.raises(LinkError, match="not an address of this host") as e:
        make_device("cpu", net, "192.0.2.123" if not _is_local("192.0.2.123") else "198.51.100.7")
    assert e.value.errno == errno.EADDRNOTAVAIL


def _is_local(ip: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((ip, 0))
        return True
    except OSError:
        return False


def test_port_already_taken_names_the_owner() -> None:
    (ip,) = loopback_addresses(1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as squatter:
        squatter.bind((ip, 4791))
        with UdpNetwork() as net, pytest.raises(LinkError, match="already in use") as e:
            make_device("cpu", net, ip)
    assert e.value.errno == errno.EADDRINUSE


def test_gid_and_mtu_follow_the_interface(udp_pair: UdpPair) -> None:
    dev: RoceDevice = udp_pair.a.dev
    assert dev.query_gid(1, 1) == bytes(10) + b"\xff\xff" + socket.inet_aton(udp_pair.ips[0])
    assert dev.link.mtu == 65536  # lo
    assert dev.query_port().active_mtu.size == 4096
    assert ("raw socket" in dev.link.description) == udp_pair.nets[0].raw


def test_pcap_has_both_directions_with_valid_icrc(udp_pair: UdpPair, tmp_path: object) -> None:
    import pathlib

    path = pathlib.Path(str(tmp_path)) / "udp.pcap"
    a, b = udp_pair.a, udp_pair.b
    link = a.dev.link
    assert isinstance(link, UdpLink)
    link.capture(path)
    src, dst = Buffer(a.dev, 10_000), Buffer(b.dev, 10_000)
    src.fill(os.urandom(10_000))
    a.qp.post_send(
        RdmaWR(1, IbWrOpcode.RDMA_WRITE, (src.sge(a.pd.local_dma_lkey),),
               remote_addr=dst.dma, rkey=b.pd.unsafe_global_rkey)
    )  # fmt: skip
    a.wait_ok(1)
    a.dev.unregister()  # closes the capture
    frames = [decode_roce_v2(r.data) for r in read_pcap(path)]
    assert {f.src_ip.exploded for f in frames} == set(udp_pair.ips)
    writes = [f for f in frames if f.packet.bth.opcode in (0x06, 0x07, 0x08)]
    acks = [f for f in frames if f.packet.bth.opcode == 0x11]
    assert len(writes) == 3 and acks  # 10 000 bytes at MTU 4096
    assert all(f.ip_id == 0 and f.df for f in writes), "sent: DF, IPv4 ID 0"


@needs_root
def test_the_kernel_sends_df_with_ip_id_zero() -> None:
    """What the ICRC on send assumes: an unconnected socket with
    IP_PMTUDISC_DO gets DF and IPv4 identification 0 from Linux."""
    ip_a, ip_b = loopback_addresses(2)
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP) as raw:
        raw.bind((ip_b, 0))
        raw.settimeout(5.0)
        with UdpNetwork(raw=False) as net:
            dev = make_device("cpu", net, ip_a)
            node = make_node(dev)
            other = make_node(make_device("cpu", net, ip_b))
            connect(node, other)
            buf = Buffer(dev, 64)
            node.qp.post_send(SendWR(1, IbWrOpcode.SEND, (buf.sge(node.pd.local_dma_lkey),)))
            for _ in range(50):
                data = raw.recv(65536)
                if (
                    data[12:16] == socket.inet_aton(ip_a)
                    and struct.unpack(">H", data[22:24])[0] == 4791
                ):
                    break
            else:
                pytest.fail("no datagram seen")
            frame = b"\0" * 12 + b"\x08\x00" + data
            rf = decode_roce_v2(frame)  # the ICRC holds over the real header
            assert rf.ip_id == 0 and rf.df
            assert encode_roce_v2(rf) == frame
            dev.unregister()
            other.dev.unregister()


def test_icrc_modes_interoperate(raw: bool) -> None:
    """A raw-mode device and a solve-mode device talk to each other."""
    if not have_cap_net_raw():
        pytest.skip("needs CAP_NET_RAW")
    ips = loopback_addresses(2)
    with UdpNetwork(raw=True) as n1, UdpNetwork(raw=False) as n2:
        a = make_node(make_device("cpu", n1, ips[0]))
        b = make_node(make_device("cpu", n2, ips[1]))
        connect(a, b)
        src, dst = Buffer(a.dev, 5000), Buffer(b.dev, 5000)
        src.fill(b"q" * 5000)
        b.qp.post_recv(RecvWR(1, (dst.sge(b.pd.local_dma_lkey),)))
        a.qp.post_send(SendWR(2, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey),)))
        b.wait_ok(1)
        a.wait_ok(1)
        assert dst.read() == b"q" * 5000
        assert isinstance(a.dev.link, UdpLink) and isinstance(b.dev.link, UdpLink)
        assert a.dev.link.icrc_mode == "raw" and b.dev.link.icrc_mode == "solve"
        a.dev.unregister()
        b.dev.unregister()


def test_completion_channel_sleeps_until_an_event(udp_pair: UdpPair) -> None:
    """``ibv_get_cq_event`` on a CompChannel: a thread sleeps until the armed
    CQ gets a completion from the progress thread, and times out otherwise."""
    from softrdma.verbs.cq import CompChannel
    from softrdma.verbs.errors import VerbsError

    a, b = udp_pair.a, udp_pair.b
    channel = CompChannel()
    b.cq.comp_handler = channel
    b.cq.req_notify()
    with pytest.raises(VerbsError, match="no completion event"):
        channel.get_cq_event(b.dev, timeout=0.1)
    src, dst = Buffer(a.dev, 64), Buffer(b.dev, 64)
    b.qp.post_recv(RecvWR(7, (dst.sge(b.pd.local_dma_lkey),)))
    a.qp.post_send(SendWR(8, IbWrOpcode.SEND, (src.sge(a.pd.local_dma_lkey),)))
    assert channel.get_cq_event(b.dev, timeout=10.0) is b.cq
    channel.ack_cq_events(1)
    assert channel.unacked == 0
    (wc,) = b.cq.poll(1)
    assert wc.wr_id == 7 and wc.status == IbWcStatus.SUCCESS


class _Sink:
    def receive_roce(self, frame: object) -> None:
        pass

    def receive_error(self, reason: str) -> None:
        pass


def test_a_taken_source_port_falls_back_with_a_valid_icrc() -> None:
    """When the QP's UDP source port is taken (by another program, or a
    process sharing the address), the datagram leaves from the receive
    socket's port, and its ICRC covers that port, not the one asked for."""
    from softrdma.transport.roce_udp import decode_roce_udp

    ip, peer_ip = loopback_addresses(2)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken,
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as peer,
        UdpNetwork(raw=False) as net,
    ):
        taken.bind((ip, 0))
        sport = taken.getsockname()[1]
        peer.bind((peer_ip, 4791))
        peer.settimeout(5)
        link = net.open_link(ip, _Sink())
        pkt = Packet.build(0x04, dest_qp=0x12, psn=7, payload=b"fallback")  # RC SEND ONLY
        link.transmit(pkt, socket.inet_aton(peer_ip), sport)
        data, (_, real_sport) = peer.recvfrom(4096)
        assert real_sport != sport and link.counters["tx_sport_fallback"] == 1
        frame = decode_roce_udp(
            data,
            socket.inet_aton(ip),
            socket.inet_aton(peer_ip),
            real_sport,
            4791,
            ip_id=0,
            df=True,
        )
        assert bytes(frame.packet.payload) == b"fallback"
