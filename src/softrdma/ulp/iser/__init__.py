"""iSER, iSCSI Extensions for RDMA (RFC 7145; kernel:
``drivers/infiniband/ulp/iser`` — the initiator ``ib_iser`` — and
``drivers/infiniband/ulp/isert`` — LIO's target ``ib_isert``).

:mod:`.proto` holds the byte-exact iSER header (``struct iser_ctrl``), the
Hello / HelloReply messages, the CM private data (``struct iser_cm_hdr``)
and the framing of one iSCSI PDU per SEND; the PDUs themselves are
:mod:`softrdma.ulp.iscsi`'s.
"""

from softrdma.ulp.iser.proto import (
    ISER_HDR_LEN,
    ISER_HELLO,
    ISER_HELLORPLY,
    ISER_RSV,
    ISER_SEND_W_INV_NOT_SUP,
    ISER_VER,
    ISER_WSV,
    ISER_ZBVA_NOT_SUP,
    IserCmFlag,
    IserCmHdr,
    IserEncodeError,
    IserError,
    IserFlag,
    IserHdr,
    IserHello,
    IserHelloReply,
    IserOpcode,
    IserProtocolError,
    decode_iser_send,
    encode_iser_send,
)

__all__ = [
    "ISER_HDR_LEN",
    "ISER_HELLO",
    "ISER_HELLORPLY",
    "ISER_RSV",
    "ISER_SEND_W_INV_NOT_SUP",
    "ISER_VER",
    "ISER_WSV",
    "ISER_ZBVA_NOT_SUP",
    "IserCmFlag",
    "IserCmHdr",
    "IserEncodeError",
    "IserError",
    "IserFlag",
    "IserHdr",
    "IserHello",
    "IserHelloReply",
    "IserOpcode",
    "IserProtocolError",
    "decode_iser_send",
    "encode_iser_send",
]
