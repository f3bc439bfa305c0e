"""IB CM messages cross-checked with Wireshark's CM dissector."""

from __future__ import annotations

import json
import random
import subprocess
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

from softrdma.cm.cma_hdr import (
    CmaHdr,
)
from softrdma.cm.messages import (
    CmDrep,
    CmDreq,
    CmMessage,
    CmRej,
    CmRep,
    CmReq,
    CmRtu,
    decode_cm_mad,
    encode_cm_mad,
)
from softrdma.fabric.pcap import PcapRecord, write_pcap
from softrdma.mad.header import (
    MadHdr,
)
from softrdma.transport.headers import Deth
from softrdma.transport.opcodes import Opcode
from softrdma.transport.packet import Packet
from softrdma.transport.roce import RoceFrame
from tests.cm._messages_helpers import (
    ACTIVE,
    BOOL,
    GID,
    PASSIVE,
    RECORDS,
    SPEC,
)
from tests.tshark import needs_tshark

# --------------------------------------------------------------------------
# Cross-check with Wireshark's CM dissector

# Our field -> Wireshark's, per message. Wireshark 4.0 dissects REQ, REP,
# REJ, RTU, DREQ and DREP (not MRA, LAP, APR or SIDR). Left out: the flow
# label and packet rate, which it decodes at the wrong bits (0x9c8 / 0x1c
# for the rping REQ whose flow label is 0x9c806, as the RC traffic's UDP
# source port confirms), the primary GIDs (shown as IPv4 from their last
# 4 bytes), and SAP Supported (shown as a reserved field).
_PATH_FIELDS = {
    "local_lid": "locallid",
    "remote_lid": "remotelid",
    "traffic_class": "tfcclass",
    "hop_limit": "hoplim",
    "sl": "sl",
    "subnet_local": "subnetlocal",
    "local_ack_timeout": "localacktout",
}
WIRESHARK: dict[type[Any], dict[str, str]] = {
    CmReq: {
        "local_comm_id": "infiniband.cm.req",
        **{
            ours: f"infiniband.cm.req.{theirs}"
            for ours, theirs in {
                "service_id": "serviceid",
                "local_ca_guid": "localcaguid",
                "local_qkey": "localqkey",
                "local_qpn": "localqpn",
                "responder_resources": "responderres",
                "local_eecn": "localeecn",
                "initiator_depth": "initdepth",
                "remote_eecn": "remoteeecn",
                "remote_cm_response_timeout": "remoteresptout",
                "transport_service_type": "transpsvctype",
                "end_to_end_flow_control": "e2eflowctrl",
                "starting_psn": "startpsn",
                "local_cm_response_timeout": "localresptout",
                "retry_count": "retrcount",
                "partition_key": "pkey",
                "path_mtu": "pppmtu",
                "rdc_exists": "rdcexist",
                "rnr_retry_count": "rnrretrcount",
                "max_cm_retries": "maxcmretr",
                "srq": "srq",
                "extended_transport_type": "ext_transport",
                "alternate_local_gid": "alt_localgid",
                "alternate_remote_gid": "alt_remotegid",
            }.items()
        },
        **{f"primary_{k}": f"infiniband.cm.req.prim_{v}" for k, v in _PATH_FIELDS.items()},
        **{f"alternate_{k}": f"infiniband.cm.req.alt_{v}" for k, v in _PATH_FIELDS.items()},
    },
    CmRep: {
        "local_comm_id": "infiniband.cm.rep",
        **{
            ours: f"infiniband.cm.rep.{theirs}"
            for ours, theirs in {
                "remote_comm_id": "remotecommid",
                "local_qkey": "localqkey",
                "local_qpn": "localqpn",
                "local_eecn": "localeecn",
                "starting_psn": "startpsn",
                "responder_resources": "respres",
                "initiator_depth": "initdepth",
                "target_ack_delay": "tgtackdelay",
                "failover_accepted": "failoveracc",
                "end_to_end_flow_control": "e2eflowctrl",
                "rnr_retry_count": "rnrretrcount",
                "srq": "srq",
                "local_ca_guid": "localcaguid",
            }.items()
        },
    },
    CmRej: {
        "local_comm_id": "infiniband.cm.rej.localcommid",
        "remote_comm_id": "infiniband.cm.rej.remotecommid",
        "message_rejected": "infiniband.cm.rej.msgrej",
        "reject_info_length": "infiniband.cm.rej.rejinfolen",
        "reason": "infiniband.cm.rej.reason",
    },
    CmRtu: {
        "local_comm_id": "infiniband.cm.rtu.localcommid",
        "remote_comm_id": "infiniband.cm.rtu.remotecommid",
    },
    CmDreq: {
        "local_comm_id": "infiniband.cm.dreq.localcommid",
        "remote_comm_id": "infiniband.cm.dreq.remotecommid",
        "remote_qpn": "infiniband.cm.req.remoteqpneecn",  # sic, Wireshark's name
    },
    CmDrep: {
        "local_comm_id": "infiniband.cm.drsp.localcommid",
        "remote_comm_id": "infiniband.cm.drsp.remotecommid",
    },
}
CMA_WIRESHARK = {
    "src_port": "infiniband.cm.req.ip_cm.sport",
    "ip_version": "infiniband.cm.req.ip_cm.ipv",
    "src": "infiniband.cm.req.ip_cm.sip4",
    "dst": "infiniband.cm.req.ip_cm.dip4",
}


def generated_for_wireshark() -> list[CmMessage]:
    """Four messages of each class Wireshark dissects, every field drawn at
    random over its whole range (seeded): positions, not just widths, are
    then checked against an independent decoder."""
    rnd = random.Random(20240601)
    out: list[CmMessage] = []
    for cls in WIRESHARK:
        for _ in range(4):
            kw: dict[str, object] = {}
            for name, kind in SPEC[cls].items():
                if kind == BOOL:
                    kw[name] = rnd.random() < 0.5
                elif kind == GID:
                    kw[name] = rnd.randbytes(16)
                elif isinstance(kind, tuple):
                    kw[name] = rnd.randbytes(kind[1])
                else:
                    assert isinstance(kind, int)
                    kw[name] = rnd.getrandbits(kind)
                    if name == "service_id":
                        kw[name] = rnd.getrandbits(63) | 1 << 63  # not an IP CM service ID
            out.append(cls(**kw))
    return out


def _flatten(obj: object, out: dict[str, str]) -> dict[str, str]:
    """tshark JSON layers as one name -> value dict (first occurrence wins)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, dict | list):
                _flatten(v, out)
            else:
                out.setdefault(k, v)
    elif isinstance(obj, list):
        for v in obj:
            _flatten(v, out)
    return out


def dissect(tmp: Path, mads: list[tuple[IPv4Address, IPv4Address, bytes]]) -> list[dict[str, str]]:
    """Wrap each MAD in a RoCEv2 UD SEND to QP1 (as rxe sends CM MADs), write
    them to a pcap and let tshark dissect it: one field dict per MAD."""
    path = tmp / "cm_mads.pcap"
    frames = []
    for src, dst, mad in mads:
        pkt = Packet.build(
            Opcode.UD_SEND_ONLY, dest_qp=1, psn=0, payload=mad, deth=Deth(0x80010000, 1)
        )
        frames.append(RoceFrame.build(pkt, src, dst, 0xC000).encode())
    write_pcap(path, [PcapRecord(i * 1000, f, len(f)) for i, f in enumerate(frames)])
    out = subprocess.run(
        ["tshark", "-r", str(path), "--disable-protocol", "rpcordma", "-T", "json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return [_flatten(p["_source"]["layers"]["infiniband"], {}) for p in json.loads(out)]


def _same(text: str, ours: object) -> bool:
    if isinstance(ours, IPv4Address | IPv6Address):
        return ip_address(text) == ours
    if isinstance(ours, bytes):
        return bytes.fromhex(text.replace(":", "")) == ours
    return int(text, 0) == ours


def _compare(what: str, fields: dict[str, str], pairs: dict[str, str], obj: object) -> int:
    for ours, theirs in pairs.items():
        assert theirs in fields, f"{what}: tshark has no {theirs}"
        value = getattr(obj, ours)
        assert _same(fields[theirs], value), f"{what}: {ours}={value!r}, tshark {fields[theirs]}"
    return len(pairs)


@needs_tshark
def test_linux_mads_agree_with_wireshark(tmp_path: Path) -> None:
    dissected = dissect(tmp_path, [(r.src, r.dst, r.mad) for r in RECORDS])
    assert len(dissected) == len(RECORDS)
    compared = 0
    for rec, fields in zip(RECORDS, dissected, strict=True):
        hdr, msg = decode_cm_mad(rec.mad)
        assert int(fields["infiniband.mad.transactionid"], 0) == hdr.tid, rec.id
        assert int(fields["infiniband.mad.attributeid"], 0) == hdr.attr_id, rec.id
        compared += _compare(rec.id, fields, WIRESHARK[type(msg)], msg)
        if isinstance(msg, CmReq):
            compared += _compare(rec.id, fields, CMA_WIRESHARK, CmaHdr.decode(msg.private_data))
    assert compared > 200


@needs_tshark
def test_generated_messages_agree_with_wireshark(tmp_path: Path) -> None:
    msgs = generated_for_wireshark()
    hdr = MadHdr(tid=0x0123456789ABCDEF)
    dissected = dissect(tmp_path, [(ACTIVE, PASSIVE, encode_cm_mad(hdr, m)) for m in msgs])
    assert len(dissected) == len(msgs)
    for i, (msg, fields) in enumerate(zip(msgs, dissected, strict=True)):
        _compare(f"{type(msg).__name__} #{i}", fields, WIRESHARK[type(msg)], msg)
