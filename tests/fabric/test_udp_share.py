"""The owner's tables of a shared address: slots, claimed service IDs, and
members that are gone (softrdma.fabric.udp_share)."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address

import pytest

from softrdma.fabric.udp import LinkError, UdpNetwork
from softrdma.fabric.udp_share import ShareError, UdpShare
from tests.fabric.netaddr import loopback_addresses


class _Receiver:
    def receive_roce(self, frame: object) -> None:
        pass

    def receive_error(self, reason: str) -> None:
        pass


def _ignore(*args: object) -> None:
    pass


def test_slots_claims_and_members_that_are_gone() -> None:
    (ip,) = loopback_addresses(1)
    with UdpNetwork(share=True, raw=False) as net:
        link = net.open_link(ip, _Receiver())
        owner = link.device_share
        assert owner is not None and owner.slot == 0 and owner.members == 0
        a = UdpShare.join(IPv4Address(ip), net.port, _ignore)
        b = UdpShare.join(IPv4Address(ip), net.port, _ignore)
        assert (a.slot, b.slot, owner.members) == (1, 2, 2)
        assert owner.claim_service(0x106_0001)
        assert not a.claim_service(0x106_0001)  # the owner listens on it
        assert a.claim_service(0x106_0002) and a.claim_service(0x106_0002)  # again: its own
        assert not b.claim_service(0x106_0002) and not owner.claim_service(0x106_0002)
        a.release_service(0x106_0002)
        assert b.claim_service(0x106_0002)
        # b's process dies without leaving: its claim and slot are freed
        b.sock.close()
        assert owner.claim_service(0x106_0002)
        assert owner.members == 1 and owner.counters["member_gone"] == 1
        c = UdpShare.join(IPv4Address(ip), net.port, _ignore)
        assert c.slot == 2
        a.close()  # leaves: slot 1 is free at once
        c.close()
        d = UdpShare.join(IPv4Address(ip), net.port, _ignore)
        assert d.slot == 1
        d.close()


def test_without_sharing_the_address_is_refused() -> None:
    (ip,) = loopback_addresses(1)
    with UdpNetwork(share=True, raw=False) as owner_net, UdpNetwork(raw=False) as other:
        owner_net.open_link(ip, _Receiver())
        with pytest.raises(LinkError) as ex:
            other.open_link(ip, _Receiver())
        assert ex.value.errno == errno.EADDRINUSE
    # nobody shares it any more: joining is refused with a clear error
    with pytest.raises(ShareError) as sx:
        UdpShare.join(IPv4Address(ip), 4791, _ignore)
    assert sx.value.errno == errno.ECONNREFUSED


def test_a_member_link_sends_from_the_address_and_reads_nothing() -> None:
    (ip,) = loopback_addresses(1)
    with UdpNetwork(share=True, raw=False) as a, UdpNetwork(share=True, raw=False) as b:
        a.open_link(ip, _Receiver())
        member = b.open_link(ip, _Receiver())
        share = member.device_share
        assert share is not None and share.slot == 1
        assert "shared with the process that bound the port (slot 1)" in member.description
