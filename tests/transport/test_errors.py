"""The transport's receive errors: NotRoceV2 versus MalformedPacket, and the
machine-readable ``reason`` every one of them carries."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.packet import Raw

import softrdma.transport as transport_pkg
from softrdma.errors import SoftRdmaError
from softrdma.transport import (
    DROP_REASONS,
    MALFORMED_REASONS,
    Aeth,
    HeaderFieldError,
    IcrcError,
    MalformedPacket,
    NotRoceV2,
    Packet,
    RejectedPacket,
    Reth,
    RoceFrame,
    UnknownOpcode,
    aeth_syndrome_parse,
    decode_roce_v2,
    icrc_check,
    icrc_hdr,
    icrc_ipv4,
    icrc_ipv6,
)
from softrdma.transport.opcodes import Opcode

TRANSPORT_SRC = Path(transport_pkg.__file__).parent


def test_reason_set() -> None:
    assert DROP_REASONS == (
        "not_roce",
        "truncated",
        "bad_length",
        "bad_version",
        "bad_header",
        "bad_checksum",
        "bad_opcode",
        "bad_pad",
        "bad_icrc",
    )
    assert (*MALFORMED_REASONS,) == tuple(r for r in DROP_REASONS if r != "not_roce")
    doc = (TRANSPORT_SRC / "errors.py").read_text()
    for r in DROP_REASONS:
        assert f"``{r}``\n" in doc, f"reason {r} is not documented"


def test_hierarchy() -> None:
    for exc in (RejectedPacket, MalformedPacket, NotRoceV2, IcrcError, UnknownOpcode):
        assert issubclass(exc, SoftRdmaError) and issubclass(exc, ValueError)
        assert issubclass(exc, RejectedPacket)
    assert not issubclass(NotRoceV2, MalformedPacket)
    assert not issubclass(MalformedPacket, NotRoceV2)
    assert not issubclass(HeaderFieldError, RejectedPacket)  # encode side: a caller bug
    # "except MalformedPacket" lets NotRoceV2 through.
    with pytest.raises(NotRoceV2):
        try:
            raise NotRoceV2("ARP")
        except MalformedPacket:  # pragma: no cover - must not happen
            pytest.fail("NotRoceV2 caught as MalformedPacket")
    assert NotRoceV2("x").reason == "not_roce"
    assert IcrcError(1, 2).reason == "bad_icrc"
    assert UnknownOpcode(0x1F).reason == "bad_opcode"
    with pytest.raises(TypeError):
        MalformedPacket("no reason")  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "exc",
    [
        MalformedPacket("short", reason="truncated"),
        NotRoceV2("ARP"),
        IcrcError(0x1234, 0x5678, " (note)"),
        UnknownOpcode(0x1F),
    ],
)
def test_errors_pickle(exc: RejectedPacket) -> None:
    """Errors cross process boundaries (multiprocessing, xdist) intact."""
    back = pickle.loads(pickle.dumps(exc))
    assert type(back) is type(exc) and str(back) == str(exc) and back.reason == exc.reason
    assert back.__dict__ == exc.__dict__


def _raise_sites() -> list[tuple[str, int, ast.Call]]:
    """Every call that builds a MalformedPacket or RejectedPacket in the
    transport package's source."""
    sites = []
    for path in sorted(TRANSPORT_SRC.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ("MalformedPacket", "RejectedPacket")
            ):
                sites.append((path.name, node.lineno, node))
    return sites


def test_every_raise_site_names_a_reason() -> None:
    """mypy checks this too (``reason`` is a keyword-only ``Literal``); this
    also runs without it."""
    sites = _raise_sites()
    assert len(sites) > 30
    files = {f for f, _, _ in sites}
    assert {"headers.py", "packet.py", "icrc.py", "roce.py"} <= files
    for f, line, call in sites:
        kw = {k.arg: k.value for k in call.keywords}
        assert "reason" in kw, f"{f}:{line} raises without a reason"
        value = kw["reason"]
        assert isinstance(value, ast.Constant) and value.value in MALFORMED_REASONS, f"{f}:{line}"


# --- NotRoceV2 versus MalformedPacket on whole frames ---------------------------------------

MAC = "02:00:00:00:00:01"


def _roce_frame(**kw: Any) -> bytes:
    pkt = Packet.build(
        Opcode.RC_RDMA_WRITE_ONLY, dest_qp=17, psn=1, reth=Reth(0x1000, 5, 4), payload=b"abcd"
    )
    return RoceFrame(pkt, b"\x0a\x4d\x00\x02", b"\x0a\x4d\x00\x01", 0xC121, **kw).encode()


NOT_ROCE = {
    "arp": Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC) / ARP(psrc="10.77.0.2", pdst="10.77.0.1"),
    "tcp": Ether(src=MAC) / IP(src="10.77.0.2", dst="10.77.0.1") / TCP(dport=18515) / Raw(b"x" * 40),
    "icmp": Ether(src=MAC) / IP(src="10.77.0.2", dst="10.77.0.1") / ICMP(),
    "udp_dns": Ether(src=MAC) / IP(src="10.77.0.2", dst="10.77.0.1") / UDP(dport=53) / Raw(b"q" * 30),
    "udp_4790": Ether(src=MAC) / IP(dst="10.77.0.1") / UDP(sport=4791, dport=4790) / Raw(bytes(40)),
    "tcp6": Ether(src=MAC) / IPv6(dst="fe80::1") / TCP(dport=4791) / Raw(b"x"),
    "udp6_other": Ether(src=MAC) / IPv6(dst="fe80::1") / UDP(dport=4792) / Raw(bytes(40)),
    "ip_fragment": Ether(src=MAC) / IP(dst="10.77.0.1", proto=17, frag=185) / Raw(bytes(40)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(NOT_ROCE))
def test_not_roce_frames(name: str) -> None:
    raw = bytes(NOT_ROCE[name])
    with pytest.raises(NotRoceV2) as ei:
        decode_roce_v2(raw)
    assert not isinstance(ei.value, MalformedPacket) and ei.value.reason == "not_roce"
    # A short runt of the same frame is still recognisably not RoCE once the
    # identifying headers are in (ARP: the ethertype alone).
    if name == "arp":
        with pytest.raises(NotRoceV2):
            decode_roce_v2(raw[:14])


def _with(raw: bytes, off: int, val: bytes) -> bytes:
    return raw[:off] + val + raw[off + len(val) :]


def _fix_ip_csum(raw: bytes) -> bytes:
    from softrdma.transport.roce import _ipv4_csum

    hdr = _with(raw[14:34], 10, b"\0\0")
    return _with(raw, 24, _ipv4_csum(hdr).to_bytes(2, "big"))


def _reicrc(raw: bytes) -> bytes:
    """The frame with its ICRC recomputed (icrc_check's reference value)."""
    try:
        icrc_check(raw[14:])
    except IcrcError as e:
        return raw[:-4] + e.expected.to_bytes(4, "little")
    return raw


BROKEN_ROCE: dict[str, tuple[bytes, str, type[MalformedPacket]]] = {
    "truncated": (_roce_frame()[:60], "truncated", MalformedPacket),
    "cut_in_bth": (_roce_frame()[:48], "truncated", MalformedPacket),
    "bad_tver": (_reicrc(_with(_roce_frame(), 43, b"\x01")), "bad_version", MalformedPacket),
    "bad_icrc": (_with(_roce_frame(), 60, b"\xee"), "bad_icrc", IcrcError),
    "bad_opcode": (_reicrc(_with(_roce_frame(), 42, b"\x1f")), "bad_opcode", UnknownOpcode),
    "bad_ip_version": (_fix_ip_csum(_with(_roce_frame(), 14, b"\x65")), "bad_version", MalformedPacket),
    "bad_ip_checksum": (_with(_roce_frame(), 24, b"\0\0"), "bad_checksum", MalformedPacket),
    "fragmented": (_fix_ip_csum(_with(_roce_frame(), 20, b"\x20\x00")), "bad_header", MalformedPacket),
    "bad_udp_length": (_with(_roce_frame(), 38, b"\x00\x10"), "bad_length", MalformedPacket),
    "payload_on_ack": (_reicrc(_with(_roce_frame(), 42, b"\x11")), "bad_length", MalformedPacket),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BROKEN_ROCE))
def test_broken_roce_frames(name: str) -> None:
    raw, reason, exc = BROKEN_ROCE[name]
    with pytest.raises(MalformedPacket) as ei:
        decode_roce_v2(raw)
    assert isinstance(ei.value, exc) and not isinstance(ei.value, NotRoceV2)
    assert ei.value.reason == reason, ei.value


def test_per_reason_counting_with_one_except() -> None:
    """What a device does with them: one handler, a counter per reason."""
    counts: dict[str, int] = {}
    frames = [bytes(f) for f in NOT_ROCE.values()] + [f for f, _, _ in BROKEN_ROCE.values()]
    for raw in [*frames, _roce_frame()]:
        try:
            decode_roce_v2(raw)
        except RejectedPacket as e:
            counts[e.reason] = counts.get(e.reason, 0) + 1
    assert counts["not_roce"] == len(NOT_ROCE)
    assert sum(counts.values()) == len(frames)
    assert set(counts) <= set(DROP_REASONS)


# --- reasons from the transport codecs ----------------------------------------------------


def test_packet_decode_reasons() -> None:
    send = Packet.build(Opcode.RC_SEND_ONLY, dest_qp=1, psn=2, payload=b"abcdef").encode()
    ack = Packet.build(Opcode.RC_ACKNOWLEDGE, dest_qp=1, psn=2, aeth=Aeth(0x1F, 3)).encode()
    cases: list[tuple[bytes, str]] = [
        (send[:11], "truncated"),  # shorter than a BTH
        (bytes([Opcode.RC_RDMA_WRITE_ONLY]) + send[1:16], "truncated"),  # no room for the RETH
        (b"\x1f" + send[1:], "bad_opcode"),
        (send[:-1], "bad_length"),  # not a multiple of 4
        (ack + b"\0\0\0\0", "bad_length"),  # an ACK carries no payload
        (send[:1] + bytes([send[1] | 0x01]) + send[2:], "bad_version"),  # TVer 1
        (send[:1] + b"\x30" + send[2:12], "bad_pad"),  # PadCnt 3, no payload
    ]
    for raw, reason in cases:
        with pytest.raises(MalformedPacket) as ei:
            Packet.decode(raw)
        assert ei.value.reason == reason, (raw.hex(), ei.value)


def test_header_reasons() -> None:
    with pytest.raises(MalformedPacket) as ei:
        Reth.unpack_from(bytes(15))
    assert ei.value.reason == "truncated"
    from softrdma.transport import Bth

    with pytest.raises(MalformedPacket) as ei:
        Bth.unpack_from(bytes([4, 0x01]) + bytes(10))
    assert ei.value.reason == "bad_version"
    for syndrome in (0x40, 0x7F):  # a reserved type, a reserved NAK code
        with pytest.raises(MalformedPacket) as ei:
            aeth_syndrome_parse(syndrome)
        assert ei.value.reason == "bad_header"


def test_icrc_helper_reasons() -> None:
    cases: list[tuple[Any, str]] = [
        (lambda: icrc_hdr(b""), "bad_version"),
        (lambda: icrc_hdr(b"\x50" + bytes(59)), "bad_version"),
        (lambda: icrc_hdr(b"\x46" + bytes(59)), "bad_header"),
        (lambda: icrc_hdr(b"\x45" + bytes(30)), "truncated"),
        (lambda: icrc_check(b"\x45"), "truncated"),
        (lambda: icrc_ipv4(b"\x60" + bytes(19), bytes(8), bytes(12)), "bad_version"),
        (lambda: icrc_ipv6(b"\x45" + bytes(39), bytes(8), bytes(12)), "bad_version"),
        (lambda: icrc_ipv4(b"\x45" + bytes(19), bytes(7), bytes(12)), "bad_length"),
        (lambda: icrc_ipv4(b"\x45" + bytes(19), bytes(8), bytes(11)), "truncated"),
    ]
    for call, reason in cases:
        with pytest.raises(MalformedPacket) as ei:
            call()
        assert ei.value.reason == reason, ei.value


def test_package_exports() -> None:
    """``from softrdma.transport import ...`` gives the wire format; the
    engines stay in their modules (they depend on the verbs layer)."""
    names = transport_pkg.__all__
    assert len(names) == len(set(names))
    for n in names:
        assert hasattr(transport_pkg, n), n
    for n in ("decode_roce_udp", "encode_roce_udp", "RoceFrame", "NotRoceV2", "Packet", "Bth",
              "IcrcError", "icrc_ipv4_solve", "rdma_ip2gid", "rdma_get_udp_sport", "DROP_REASONS"):  # fmt: skip
        assert n in names
    assert "RcTransport" not in names and "UdTransport" not in names
