"""iSER, iSCSI Extensions for RDMA (RFC 7145; kernel:
``drivers/infiniband/ulp/iser`` — the initiator ``ib_iser`` — and
``drivers/infiniband/ulp/isert`` — LIO's target ``ib_isert``).

:mod:`.proto` holds the byte-exact iSER header (``struct iser_ctrl``), the
Hello / HelloReply messages, the CM private data (``struct iser_cm_hdr``)
and the framing of one iSCSI PDU per SEND; the PDUs themselves are
:mod:`softrdma.ulp.iscsi`'s. :mod:`.target` is the target,
:class:`IserTarget` (LIO's ``ib_isert`` with ``iscsi_target`` over the
shared SCSI core); :mod:`.initiator` the initiator, :class:`IserInitiator`
(``ib_iser`` under libiscsi, as a block device).
"""

from softrdma.ulp.iser.initiator import (
    ISER_DEF_CAN_QUEUE,
    ISER_DEF_MAX_SECTORS,
    IserCommandTimeout,
    IserConnectError,
    IserInitiator,
    IserInitiatorError,
    IserIo,
    IserLoginRejected,
    IserRequest,
    IserState,
    IserTransportError,
)
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
from softrdma.ulp.iser.target import (
    ISERT_DEFAULT_PORT,
    ISERT_MAX_RDMA_READ,
    ISERT_QP_MAX_RECV_DTOS,
    IserConn,
    IserTarget,
)

__all__ = [
    "ISERT_DEFAULT_PORT",
    "ISERT_MAX_RDMA_READ",
    "ISERT_QP_MAX_RECV_DTOS",
    "ISER_DEF_CAN_QUEUE",
    "ISER_DEF_MAX_SECTORS",
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
    "IserCommandTimeout",
    "IserConn",
    "IserConnectError",
    "IserEncodeError",
    "IserError",
    "IserFlag",
    "IserHdr",
    "IserHello",
    "IserHelloReply",
    "IserInitiator",
    "IserInitiatorError",
    "IserIo",
    "IserLoginRejected",
    "IserOpcode",
    "IserProtocolError",
    "IserRequest",
    "IserState",
    "IserTarget",
    "IserTransportError",
    "decode_iser_send",
    "encode_iser_send",
]
