"""Errors of the transport's wire codecs, and why a received packet is dropped.

Kernel counterpart: the drop paths of ``drivers/infiniband/sw/rxe/rxe_recv.c``
(``rxe_rcv``, ``hdr_check``), ``rxe_icrc.c`` (``rxe_icrc_check``) and
``rxe_net.c`` (``rxe_udp_encap_recv``), which free the skb and count it;
here the codecs raise and the caller counts.

Two kinds of received input are refused, and a caller can tell them apart by
type alone:

* :class:`NotRoceV2` — the frame is not RoCEv2 at all (ARP, TCP, UDP to a
  port other than 4791, a non-first IPv4 fragment). A host would hand it to
  another protocol handler; it says nothing about the RDMA peer.
* :class:`MalformedPacket` (and its subclasses ``IcrcError``,
  ``UnknownOpcode``) — it is RoCEv2, but broken. rxe drops these.

Both derive from :class:`RejectedPacket` (and so from
:class:`~softrdma.errors.SoftRdmaError` and :class:`ValueError`), which
carries :attr:`~RejectedPacket.reason`: one of :data:`DROP_REASONS`, a short
fixed string for per-reason drop counters (``stats[e.reason] += 1``), like
the named counters of rxe's ``hw_counters``. ``except MalformedPacket`` does
not catch :class:`NotRoceV2`.

:class:`HeaderFieldError` is the encode-side error: a field given for
encoding is out of range (a caller bug, never bad wire input).
"""

from __future__ import annotations

from typing import Any, Literal, TypeAlias, get_args

from softrdma.errors import SoftRdmaError

__all__ = [
    "DROP_REASONS",
    "MALFORMED_REASONS",
    "DropReason",
    "HeaderFieldError",
    "LocalProtocolError",
    "MalformedPacket",
    "NotRoceV2",
    "RejectedPacket",
]

DropReason: TypeAlias = Literal[
    "not_roce",
    "truncated",
    "bad_length",
    "bad_version",
    "bad_header",
    "bad_checksum",
    "bad_opcode",
    "bad_pad",
    "bad_icrc",
]
"""The value of :attr:`RejectedPacket.reason`; mypy checks every raise site."""

DROP_REASONS: tuple[DropReason, ...] = get_args(DropReason)
"""Every :attr:`RejectedPacket.reason`, in a fixed order (for counter tables):

``not_roce``
    :class:`NotRoceV2`: ethertype neither IPv4 nor IPv6, IP protocol / IPv6
    next header not UDP, UDP destination port not 4791, a non-first IPv4
    fragment (no UDP header to tell).
``truncated``
    The bytes end before a header that must be there (Ethernet, 802.1Q, IP,
    UDP, BTH, the opcode's extension headers, the ICRC) or before the length
    the IP header claims.
``bad_length``
    Length fields that contradict each other or the format: IPv4 total
    length below 28, UDP length not the IP payload length, a transport
    packet whose length is not a multiple of 4, bytes after the headers of
    an opcode that carries no payload, a datagram too long for IP.
``bad_version``
    IP version not the one the ethertype (or the address family) says; BTH
    TVer not 0 (rxe_recv.c ``hdr_check``).
``bad_header``
    A header field the format forbids or softrdma does not take: IPv4
    options, fragmentation (MF) or the reserved flag; a reserved AETH
    syndrome or NAK code.
``bad_checksum``
    IPv4 header checksum or (non-zero) UDP checksum wrong.
``bad_opcode``
    BTH opcode unknown (reserved, RD): ``UnknownOpcode``.
``bad_pad``
    BTH PadCnt larger than the payload.
``bad_icrc``
    ICRC mismatch (``IcrcError``; rxe_icrc.c ``rxe_icrc_check``).
"""

MALFORMED_REASONS: tuple[DropReason, ...] = DROP_REASONS[1:]
"""The reasons a :class:`MalformedPacket` can carry (all but ``not_roce``)."""


def _rebuild(cls: type[RejectedPacket], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """Unpickle without calling ``__init__`` (whose signature differs per class)."""
    e = cls.__new__(cls, *args)
    e.args = args
    e.__dict__.update(state)
    return e


class RejectedPacket(SoftRdmaError, ValueError):
    """A received frame or packet the transport refuses; :attr:`reason` (one of
    :data:`DROP_REASONS`) says why. Catch this to count every drop by reason;
    catch a subclass to tell "not for RoCE" from "RoCE, but broken"."""

    reason: DropReason

    def __init__(self, message: str, *, reason: DropReason) -> None:
        super().__init__(message)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # BaseException pickles as cls(*args), which the keyword-only reason
        # (and IcrcError's own signature) would not survive.
        return (_rebuild, (type(self), self.args, self.__dict__))


class MalformedPacket(RejectedPacket):
    """A received RoCEv2 frame or IB transport packet that cannot be parsed or
    violates the wire format. rxe drops such packets (``rxe_recv.c``
    ``hdr_check`` and friends); softrdma raises this so the caller decides
    (drop, count, NAK). :attr:`reason` is one of :data:`MALFORMED_REASONS`.
    """


class NotRoceV2(RejectedPacket):
    """The frame is not RoCEv2 (rxe_net.c: the UDP tunnel socket on port 4791
    never sees it): not IPv4/IPv6, not UDP, or UDP to another port. Not a
    :class:`MalformedPacket`; :attr:`reason` is always ``"not_roce"``."""

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="not_roce")


class HeaderFieldError(SoftRdmaError, ValueError):
    """A header field given for encoding is out of its wire range (for example a
    PSN that does not fit 24 bits). This is a caller bug, not bad wire input.
    """


class LocalProtocolError(SoftRdmaError, RuntimeError):
    """The caller misused a transport engine (h11's name): posted to a QP in
    RESET, asked for a state change the QP state machine has no row for, or
    handed a UD receive a network header of the wrong size. A peer's
    protocol violations never raise: the engines answer them with the NAK or
    completion error IBTA specifies."""
