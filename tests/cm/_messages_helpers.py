"""IB CM message and RDMA CM header codecs against real Linux CM traffic.

The reference is ``tests/data/cm_mads.json``: every CM MAD of four Linux 6.1
rdma_rxe captures (rping, two SRP logins, an iSER login), extracted by
``tests/data/extract_cm_mads.py``. Each must decode and re-encode byte for
byte, and the field values are pinned to what the captures show
independently: the RC traffic in the three captures kept under
``tests/data/captures`` (QPN, first PSNs, UDP source port) and, when tshark
is installed, Wireshark's CM dissector. Hypothesis covers the rest of the
value space, the range checks and the malformed inputs.
"""

from __future__ import annotations

import dataclasses
import json
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st

from softrdma.cm.messages import (
    CmApr,
    CmDrep,
    CmDreq,
    CmLap,
    CmMessage,
    CmMra,
    CmRej,
    CmRep,
    CmReq,
    CmRtu,
    CmSidrRep,
    CmSidrReq,
    decode_cm_mad,
)
from softrdma.mad.header import (
    MadHdr,
)

DATA = Path(__file__).resolve().parents[1] / "data"
CAPTURES = DATA / "captures"

ACTIVE = IPv4Address("10.77.0.2")  # the initiator in every capture (SUMMARY.md)
PASSIVE = IPv4Address("10.77.0.1")
RC_QPN = 0x11


@dataclasses.dataclass(frozen=True)
class Record:
    """One CM MAD of cm_mads.json."""

    capture: str
    frame: int
    src: IPv4Address
    dst: IPv4Address
    mad: bytes

    @property
    def id(self) -> str:
        return f"{self.capture.removesuffix('.pcap')}:{self.frame}"


def _load() -> list[Record]:
    out = []
    for r in json.loads((DATA / "cm_mads.json").read_text()):
        src, dst = r["direction"].split("->")
        out.append(
            Record(
                r["capture"],
                r["frame"],
                IPv4Address(src),
                IPv4Address(dst),
                bytes.fromhex(r["mad"]),
            )
        )
    return out


RECORDS = _load()

# The CM exchange of each capture, in order (SUMMARY.md).
EXPECTED = {
    "rping.pcap": ["REQ", "REP", "RTU", "DREQ", "DREP"],
    "srp_imm.pcap": ["REQ", "REP", "RTU"],
    "srp_rdma.pcap": ["REQ", "REP", "RTU"],
    "iser_login.pcap": ["REQ", "REP", "RTU", "DREQ", "DREQ", "DREP"],
}


def session(capture: str) -> list[tuple[Record, MadHdr, CmMessage]]:
    """The decoded CM MADs of one capture, in capture order."""
    return [(r, *decode_cm_mad(r.mad)) for r in RECORDS if r.capture == capture]


def first(capture: str, cls: type[Any]) -> Any:
    """The first message of type ``cls`` in ``capture``."""
    return next(m for _, _, m in session(capture) if isinstance(m, cls))


# --------------------------------------------------------------------------
# Properties over generated messages

GID = "gid"
BOOL = "bool"

Kind = int | str | tuple[str, int]
PATH_SPEC: dict[str, Kind] = {
    "local_lid": 16,
    "remote_lid": 16,
    "local_gid": GID,
    "remote_gid": GID,
    "flow_label": 20,
    "packet_rate": 6,
    "traffic_class": 8,
    "hop_limit": 8,
    "sl": 4,
    "subnet_local": BOOL,
    "local_ack_timeout": 5,
}
# Field widths per message, written from the IBTA tables independently of
# the module's own layout tables: int = bit width, ("data", n) = up to n bytes.
SPEC: dict[type[Any], dict[str, Kind]] = {
    CmReq: {
        "local_comm_id": 32,
        "vendor_id": 24,
        "service_id": 64,
        "local_ca_guid": 64,
        "local_qkey": 32,
        "local_qpn": 24,
        "responder_resources": 8,
        "local_eecn": 24,
        "initiator_depth": 8,
        "remote_eecn": 24,
        "remote_cm_response_timeout": 5,
        "transport_service_type": 2,
        "end_to_end_flow_control": BOOL,
        "starting_psn": 24,
        "local_cm_response_timeout": 5,
        "retry_count": 3,
        "partition_key": 16,
        "path_mtu": 4,
        "rdc_exists": BOOL,
        "rnr_retry_count": 3,
        "max_cm_retries": 4,
        "srq": BOOL,
        "extended_transport_type": 3,
        **{
            f"{p}_{name}": kind
            for p in ("primary", "alternate")
            for name, kind in PATH_SPEC.items()
        },
        "sap_supported": BOOL,
        "private_data": ("data", 92),
    },
    CmMra: {
        "local_comm_id": 32,
        "remote_comm_id": 32,
        "message_mraed": 2,
        "service_timeout": 5,
        "private_data": ("data", 222),
    },
    CmRej: {
        "local_comm_id": 32,
        "remote_comm_id": 32,
        "message_rejected": 2,
        "reject_info_length": 7,
        "reason": 16,
        "ari": ("data", 72),
        "private_data": ("data", 148),
    },
    CmRep: {
        "local_comm_id": 32,
        "remote_comm_id": 32,
        "local_qkey": 32,
        "local_qpn": 24,
        "vendor_id": 24,
        "local_eecn": 24,
        "starting_psn": 24,
        "responder_resources": 8,
        "initiator_depth": 8,
        "target_ack_delay": 5,
        "failover_accepted": 2,
        "end_to_end_flow_control": BOOL,
        "rnr_retry_count": 3,
        "srq": BOOL,
        "local_ca_guid": 64,
        "private_data": ("data", 196),
    },
    CmRtu: {"local_comm_id": 32, "remote_comm_id": 32, "private_data": ("data", 224)},
    CmDreq: {
        "local_comm_id": 32,
        "remote_comm_id": 32,
        "remote_qpn": 24,
        "private_data": ("data", 220),
    },
    CmDrep: {"local_comm_id": 32, "remote_comm_id": 32, "private_data": ("data", 224)},
    CmSidrReq: {
        "request_id": 32,
        "partition_key": 16,
        "service_id": 64,
        "private_data": ("data", 216),
    },
    CmSidrRep: {
        "request_id": 32,
        "status": 8,
        "additional_info_length": 8,
        "vendor_id": 24,
        "qpn": 24,
        "service_id": 64,
        "qkey": 32,
        "additional_info": ("data", 72),
        "private_data": ("data", 136),
    },
    CmLap: {
        "local_comm_id": 32,
        "remote_comm_id": 32,
        "remote_qpn": 24,
        "remote_cm_response_timeout": 5,
        "alternate_local_lid": 16,
        "alternate_remote_lid": 16,
        "alternate_local_gid": GID,
        "alternate_remote_gid": GID,
        "alternate_flow_label": 20,
        "alternate_traffic_class": 8,
        "alternate_hop_limit": 8,
        "alternate_packet_rate": 6,
        "alternate_sl": 4,
        "alternate_subnet_local": BOOL,
        "alternate_local_ack_timeout": 5,
        "private_data": ("data", 168),
    },
    CmApr: {
        "local_comm_id": 32,
        "remote_comm_id": 32,
        "additional_info_length": 8,
        "ap_status": 8,
        "additional_info": ("data", 72),
        "private_data": ("data", 148),
    },
}
CLASSES = list(SPEC)
PRIVATE_DATA_SIZES = {
    CmReq: 92,
    CmMra: 222,
    CmRej: 148,
    CmRep: 196,
    CmRtu: 224,
    CmDreq: 220,
    CmDrep: 224,
    CmSidrReq: 216,
    CmSidrRep: 136,
    CmLap: 168,
    CmApr: 148,
}
FAST = settings(max_examples=25, deadline=None)


def _strategy(kind: Kind) -> st.SearchStrategy[Any]:
    if kind == BOOL:
        return st.booleans()
    if kind == GID:
        return st.binary(min_size=16, max_size=16)
    if isinstance(kind, tuple):
        return st.binary(min_size=kind[1], max_size=kind[1])
    assert isinstance(kind, int)
    return st.integers(0, (1 << kind) - 1)


def messages(cls: type[Any]) -> st.SearchStrategy[Any]:
    """Messages of ``cls`` with every field in range (full-length byte fields,
    so decode(encode(x)) == x exactly)."""
    return st.builds(cls, **{name: _strategy(kind) for name, kind in SPEC[cls].items()})
