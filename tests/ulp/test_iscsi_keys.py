"""Login text and key negotiation (softrdma.ulp.iscsi.text / .negotiate):
each key's legal and illegal values get RFC 7143 §6 / §13's (and RFC 7145
§6's) answers, protocol errors end the login with the right status, and
the proposer side checks what it is answered. That the engine reproduces
the Linux session of iser_login.pcap byte for byte is in
test_iser_proto.py."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from softrdma.ulp.iscsi import (
    IRRELEVANT,
    ISCSI_KEYS,
    LIO_KEY_ORDER,
    NOT_UNDERSTOOD,
    REJECT,
    IscsiEncodeError,
    IscsiKeyKind,
    IscsiLoginStage,
    IscsiLoginStatusClass,
    IscsiLoginStatusDetail,
    IscsiNegotiationError,
    IscsiTextError,
    KeyNegotiator,
    decode_text,
    encode_text,
    linux_iser_initiator,
    lio_iser_target,
)

IQN_I = "iqn.2026-11.org.peer:init1"
IQN_T = "iqn.2026-11.org.peer:disk0"
NAMES = [("InitiatorName", IQN_I), ("TargetName", IQN_T)]
ISER = [*NAMES, ("RDMAExtensions", "Yes")]
PLAIN_TARGET = {  # an iSCSI/TCP target with RFC defaults and no digests
    name: key.default for name, key in ISCSI_KEYS.items() if key.default is not None
}


def answers(
    offer: list[tuple[str, str]],
    target: KeyNegotiator | None = None,
    stage: IscsiLoginStage = IscsiLoginStage.OP_PARMS_NEGOTIATION,
) -> dict[str, str]:
    """The target's answers (its own proposals left out)."""
    t = target if target is not None else lio_iser_target()
    offered = {name for name, _ in offer}
    return {k: v for k, v in t.step(offer, stage) if k in offered}


def plain(**overrides: str) -> KeyNegotiator:
    return KeyNegotiator("target", {**PLAIN_TARGET, **overrides})


# --- text ------------------------------------------------------------------------------------


def test_text_round_trip() -> None:
    pairs = [("InitiatorName", IQN_I), ("TargetAlias", "LIO Target"), ("X-a.b", "é=1")]
    raw = encode_text(pairs)
    assert (
        raw == b"InitiatorName=" + IQN_I.encode() + b"\0TargetAlias=LIO Target\0X-a.b=\xc3\xa9=1\0"
    )
    assert decode_text(raw) == pairs
    assert decode_text(b"") == [] and encode_text([]) == b""
    assert decode_text(b"A=\0") == [("A", "")]


@pytest.mark.parametrize(
    "raw",
    [
        b"A=B",  # no terminating NUL
        b"AB\0",  # no separator
        b"=B\0",  # empty key
        b"A B=C\0",  # a space in the key
        b"A=B\0\0",  # an empty pair
        b"K" * 64 + b"=1\0",  # key longer than 63 bytes
        b"A=\xff\0",  # not UTF-8
        b"A=" + b"v" * 8193 + b"\0",  # value too long
    ],
)
def test_malformed_text(raw: bytes) -> None:
    with pytest.raises(IscsiTextError):
        decode_text(raw)


@pytest.mark.parametrize("pairs", [[("A", "x\0y")], [("bad key", "1")], [("", "1")]])
def test_text_that_cannot_be_encoded(pairs: list[tuple[str, str]]) -> None:
    with pytest.raises(IscsiEncodeError):
        encode_text(pairs)


_KEYS = st.text("ABCxyz019.-+@_", min_size=1, max_size=63)
_VALUES = st.text(st.characters(blacklist_characters="\0", codec="utf-8"), max_size=40)


@given(st.lists(st.tuples(_KEYS, _VALUES), max_size=8))
def test_text_round_trip_property(pairs: list[tuple[str, str]]) -> None:
    assert decode_text(encode_text(pairs)) == pairs


@given(st.binary(max_size=120))
def test_text_fuzzing(raw: bytes) -> None:
    try:
        pairs = decode_text(raw)
    except IscsiTextError:
        return
    assert encode_text(pairs) == raw


# --- the key table ---------------------------------------------------------------------------


def test_key_table() -> None:
    expected = {
        "RDMAExtensions", "InitiatorRecvDataSegmentLength", "TargetRecvDataSegmentLength",
        "MaxRecvDataSegmentLength", "MaxOutstandingUnexpectedPDUs", "HeaderDigest",
        "DataDigest", "MaxBurstLength", "FirstBurstLength", "ImmediateData", "InitialR2T",
        "MaxConnections", "ErrorRecoveryLevel", "DefaultTime2Wait", "DefaultTime2Retain",
        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "IFMarker", "OFMarker",
        "InitiatorName", "TargetName", "SessionType", "AuthMethod", "TargetAlias",
        "InitiatorAlias", "TargetPortalGroupTag",
    }  # fmt: skip
    assert expected <= ISCSI_KEYS.keys()
    assert all(name in LIO_KEY_ORDER for name in ISCSI_KEYS if "Unexpected" not in name)
    kinds = {n: ISCSI_KEYS[n].kind for n in ("InitialR2T", "ImmediateData", "DefaultTime2Wait")}
    assert kinds == {
        "InitialR2T": IscsiKeyKind.BOOL_OR,
        "ImmediateData": IscsiKeyKind.BOOL_AND,
        "DefaultTime2Wait": IscsiKeyKind.NUM_MAX,
    }
    defaults = {n: ISCSI_KEYS[n].default for n in ("MaxBurstLength", "FirstBurstLength")}
    assert defaults == {"MaxBurstLength": "262144", "FirstBurstLength": "65536"}


# --- each key's answers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "local", "offered", "answer"),
    [
        # Boolean OR: the answer to an offered Yes is optional (left out).
        ("InitialR2T", "Yes", "No", "Yes"),
        ("InitialR2T", "No", "No", "No"),
        ("InitialR2T", "No", "Yes", None),
        ("DataPDUInOrder", "Yes", "No", "Yes"),
        ("DataPDUInOrder", "No", "Yes", None),
        ("DataSequenceInOrder", "No", "No", "No"),
        # Boolean AND: the answer to an offered No is optional.
        ("ImmediateData", "Yes", "Yes", "Yes"),
        ("ImmediateData", "No", "Yes", "No"),
        ("ImmediateData", "Yes", "No", None),
        ("RDMAExtensions", "Yes", "Yes", "Yes"),
        ("RDMAExtensions", "No", "Yes", "No"),
        # Minimum / maximum, decimal or hex.
        ("MaxBurstLength", "262144", "16776192", "262144"),
        ("MaxBurstLength", "262144", "4096", "4096"),
        ("MaxBurstLength", "262144", "0x1000", "4096"),
        ("FirstBurstLength", "65536", "262144", "65536"),
        ("MaxConnections", "1", "4", "1"),
        ("MaxConnections", "8", "4", "4"),
        ("ErrorRecoveryLevel", "0", "2", "0"),
        ("ErrorRecoveryLevel", "2", "1", "1"),
        ("DefaultTime2Wait", "2", "0", "2"),
        ("DefaultTime2Wait", "2", "10", "10"),
        ("DefaultTime2Retain", "20", "0", "0"),
        ("DefaultTime2Retain", "20", "3600", "20"),
        ("MaxOutstandingR2T", "1", "8", "1"),
        # Out of range, not a number, not a Boolean: Reject.
        ("MaxBurstLength", "262144", "511", REJECT),
        ("MaxBurstLength", "262144", "16777216", REJECT),
        ("MaxBurstLength", "262144", "-1", REJECT),
        ("MaxBurstLength", "262144", "lots", REJECT),
        ("MaxBurstLength", "262144", "", REJECT),
        ("FirstBurstLength", "65536", "100", REJECT),
        ("MaxConnections", "1", "0", REJECT),
        ("MaxConnections", "1", "65536", REJECT),
        ("ErrorRecoveryLevel", "0", "3", REJECT),
        ("DefaultTime2Wait", "2", "3601", REJECT),
        ("DefaultTime2Retain", "20", "3601", REJECT),
        ("MaxOutstandingR2T", "1", "0", REJECT),
        ("InitialR2T", "Yes", "yes", REJECT),
        ("ImmediateData", "Yes", "Maybe", REJECT),
        ("DataPDUInOrder", "Yes", "", REJECT),
    ],
)
def test_session_key_answers(key: str, local: str, offered: str, answer: str | None) -> None:
    got = answers([*NAMES, (key, offered)], plain(**{key: local}))
    assert got.get(key) == answer


def test_optional_answers_can_be_sent() -> None:
    t = KeyNegotiator("target", PLAIN_TARGET, omit_optional_answers=False)
    got = answers([("InitialR2T", "Yes"), ("ImmediateData", "No")], t)
    assert got == {"InitialR2T": "Yes", "ImmediateData": "No"}


@pytest.mark.parametrize(
    ("key", "offered", "answer"),
    [
        ("InitiatorRecvDataSegmentLength", "262144", "262144"),
        ("InitiatorRecvDataSegmentLength", "4096", "4096"),
        ("InitiatorRecvDataSegmentLength", "1048576", "262144"),
        ("TargetRecvDataSegmentLength", "8192", "8192"),
        ("TargetRecvDataSegmentLength", "262144", "8192"),
        ("TargetRecvDataSegmentLength", "511", REJECT),
        ("InitiatorRecvDataSegmentLength", "16777216", REJECT),
        ("MaxOutstandingUnexpectedPDUs", "0", None),  # declarative
        ("MaxOutstandingUnexpectedPDUs", "2", None),
        ("MaxOutstandingUnexpectedPDUs", "1", REJECT),
        ("MaxOutstandingUnexpectedPDUs", "4294967296", REJECT),
        # RDMAExtensions=Yes replaces MaxRecvDataSegmentLength and the digests.
        ("MaxRecvDataSegmentLength", "262144", IRRELEVANT),
        ("HeaderDigest", "CRC32C,None", "None"),
        ("DataDigest", "None", "None"),
        ("HeaderDigest", "CRC32C", REJECT),
        # The obsolete markers: No (never NotUnderstood); the intervals: Reject.
        ("IFMarker", "No", "No"),
        ("OFMarker", "Yes", "No"),
        ("IFMarker", "Perhaps", REJECT),
        ("IFMarkInt", "2048~8192", REJECT),
        ("OFMarkInt", "2048", REJECT),
    ],
)
def test_iser_key_answers(key: str, offered: str, answer: str | None) -> None:
    expected = {"RDMAExtensions": "Yes"} | ({} if answer is None else {key: answer})
    assert answers([*ISER, (key, offered)]) == expected


def test_max_outstanding_unexpected_pdus_is_declared() -> None:
    """Each side declares how many unexpected PDUs it can take (0: no
    limit); a declaration gets no answer."""
    t = lio_iser_target()
    t.step([*ISER, ("MaxOutstandingUnexpectedPDUs", "16")])
    assert t.values["MaxOutstandingUnexpectedPDUs"] == "16"
    mine = KeyNegotiator(
        "initiator",
        {"RDMAExtensions": "Yes", "MaxOutstandingUnexpectedPDUs": "0"},
        ["RDMAExtensions", "MaxOutstandingUnexpectedPDUs"],
    )
    out = mine.step([("MaxOutstandingUnexpectedPDUs", "4"), ("RDMAExtensions", "Yes")])
    assert out == [("RDMAExtensions", "Yes"), ("MaxOutstandingUnexpectedPDUs", "0")]
    result = mine.finish()
    assert result.max_outstanding_unexpected_pdus == 4  # the peer's limit on us
    assert result.declared == {"MaxOutstandingUnexpectedPDUs": "0"}


@pytest.mark.parametrize(
    "key",
    [
        "InitiatorRecvDataSegmentLength",
        "TargetRecvDataSegmentLength",
        "MaxOutstandingUnexpectedPDUs",
    ],
)
def test_iser_keys_are_irrelevant_without_rdma_extensions(key: str) -> None:
    got = answers([*NAMES, ("RDMAExtensions", "No"), (key, "8192")], lio_iser_target())
    assert got == {key: IRRELEVANT}  # RDMAExtensions=No itself needs no answer (AND, No)
    assert answers([*NAMES, (key, "8192")], plain()) == {key: IRRELEVANT}


def test_digests_and_mrdsl_without_iser() -> None:
    t = plain(HeaderDigest="CRC32C,None")
    got = answers(
        [
            ("HeaderDigest", "CRC32C,None"),
            ("DataDigest", "CRC32C"),
            ("MaxRecvDataSegmentLength", "262144"),
        ],
        t,
    )
    assert got == {"HeaderDigest": "CRC32C", "DataDigest": REJECT}  # MRDSL: declarative
    assert t.values["MaxRecvDataSegmentLength"] == "262144"
    assert answers([("MaxRecvDataSegmentLength", "100")], plain()) == {
        "MaxRecvDataSegmentLength": REJECT
    }
    assert answers([("HeaderDigest", "MD5,None")], plain()) == {"HeaderDigest": "None"}


def test_first_burst_length() -> None:
    # Never above the negotiated MaxBurstLength.
    got = answers([("MaxBurstLength", "4096"), ("FirstBurstLength", "8192")], plain())
    assert got == {"MaxBurstLength": "4096", "FirstBurstLength": "4096"}
    # Irrelevant when neither unsolicited nor immediate data can be sent.
    got = answers([("ImmediateData", "No"), ("FirstBurstLength", "8192")], plain())
    assert got == {"FirstBurstLength": IRRELEVANT}


def test_auth_method() -> None:
    sec = IscsiLoginStage.SECURITY_NEGOTIATION
    assert answers([("AuthMethod", "CHAP,None")], plain(), sec) == {"AuthMethod": "None"}
    assert answers([("AuthMethod", "KRB5,SRP")], plain(), sec) == {"AuthMethod": REJECT}
    assert answers([("AuthMethod", "CHAP")], plain(AuthMethod="CHAP,None"), sec) == {
        "AuthMethod": "CHAP"
    }
    with pytest.raises(IscsiNegotiationError):
        plain().step([("AuthMethod", "None")])  # in the operational stage


def test_declarative_keys() -> None:
    t = lio_iser_target()
    out = t.step([*NAMES, ("InitiatorAlias", "host-b"), ("SessionType", "Normal")])
    assert not {"InitiatorName", "TargetName", "InitiatorAlias", "SessionType"} & dict(out).keys()
    assert t.values["InitiatorAlias"] == "host-b"
    # Keys only the target may send, sent by an initiator: Reject.
    t = lio_iser_target()
    out = t.step([*NAMES, ("TargetAlias", "x"), ("TargetPortalGroupTag", "1")])
    assert ("TargetAlias", REJECT) in out and ("TargetPortalGroupTag", REJECT) in out
    assert len({k for k, _ in out}) == len(out)  # never a key twice in one PDU
    # The target's own declarations follow in its next PDU.
    later = t.step([])
    assert ("TargetAlias", "LIO Target") in later and ("TargetPortalGroupTag", "1") in later
    # An initiator answers a target that sends InitiatorName.
    i = linux_iser_initiator(IQN_I, IQN_T)
    i.step()
    assert ("InitiatorName", REJECT) in i.step([("InitiatorName", "iqn.x")])


def test_discovery_session() -> None:
    offer = [
        ("InitiatorName", IQN_I),
        ("SessionType", "Discovery"),
        ("MaxBurstLength", "4096"),
        ("InitialR2T", "No"),
        ("RDMAExtensions", "Yes"),
        ("TargetRecvDataSegmentLength", "8192"),
        ("DefaultTime2Wait", "2"),
    ]
    t = lio_iser_target()
    out = dict(t.step(offer))
    assert {k: out[k] for k, _ in offer if k in out} == {
        "MaxBurstLength": IRRELEVANT,
        "InitialR2T": IRRELEVANT,
        "RDMAExtensions": IRRELEVANT,
        "TargetRecvDataSegmentLength": IRRELEVANT,
        "DefaultTime2Wait": "2",
    }
    # No session keys of its own either, and no TargetName needed.
    assert "MaxConnections" not in out and "ImmediateData" not in out
    offered = dict(offer)
    echo = [
        (k, v)
        for k, v in out.items()
        if k not in offered and k not in ("TargetAlias", "TargetPortalGroupTag")
    ]
    assert {k for k, _ in echo} == {"DefaultTime2Retain", "ErrorRecoveryLevel"}
    assert t.step(echo) == []
    assert not t.finish().rdma_extensions


def test_bad_session_type() -> None:
    with pytest.raises(IscsiNegotiationError) as e:
        lio_iser_target().step([*NAMES, ("SessionType", "Bogus")])
    assert e.value.status_class == IscsiLoginStatusClass.INITIATOR_ERR
    assert e.value.status_detail == IscsiLoginStatusDetail.NO_SESSION_TYPE


def test_unknown_keys_are_not_understood_and_answered_last() -> None:
    t = lio_iser_target()
    out = t.step([("X-com.example.Feature", "1"), *ISER, ("SendTargets", "All")])
    assert out[-2:] == [("X-com.example.Feature", NOT_UNDERSTOOD), ("SendTargets", NOT_UNDERSTOOD)]


def test_non_leading_connection() -> None:
    t = lio_iser_target(leading=False)
    got = answers([("MaxBurstLength", "4096"), ("TargetRecvDataSegmentLength", "4096")], t)
    assert got == {"MaxBurstLength": IRRELEVANT, "TargetRecvDataSegmentLength": "4096"}


@pytest.mark.parametrize(
    "offer",
    [
        [("MaxBurstLength", "4096"), ("MaxBurstLength", "8192")],  # twice in one PDU
        [("MaxBurstLength", REJECT)],  # an answer value offered
        [("InitialR2T", NOT_UNDERSTOOD)],
        [("ImmediateData", IRRELEVANT)],
    ],
)
def test_protocol_errors(offer: list[tuple[str, str]]) -> None:
    with pytest.raises(IscsiNegotiationError) as e:
        lio_iser_target().step(offer)
    assert e.value.status_class == IscsiLoginStatusClass.INITIATOR_ERR
    assert e.value.status_detail == IscsiLoginStatusDetail.INIT_ERR


def test_renegotiation_within_a_login_is_an_error() -> None:
    t = lio_iser_target()
    t.step([*ISER, ("MaxBurstLength", "4096")])
    with pytest.raises(IscsiNegotiationError):
        t.step([("MaxBurstLength", "8192")])


def test_target_needs_the_names() -> None:
    t = lio_iser_target()
    t.step([("TargetName", IQN_T)])
    with pytest.raises(IscsiNegotiationError) as e:
        t.finish()
    assert e.value.status_detail == IscsiLoginStatusDetail.MISSING_FIELDS
    t = lio_iser_target()
    t.step([("InitiatorName", IQN_I)])
    with pytest.raises(IscsiNegotiationError):
        t.finish()


def test_lio_proposes_what_the_initiator_left_out() -> None:
    """LIO offers its own values for the keys it negotiates, in its order,
    after answering; the digests and MaxRecvDataSegmentLength are not
    among them on an iSER portal."""
    out = lio_iser_target().step(NAMES)
    assert [k for k, _ in out] == [
        "MaxConnections", "TargetAlias", "TargetPortalGroupTag", "InitialR2T", "ImmediateData",
        "MaxBurstLength", "FirstBurstLength", "DefaultTime2Wait", "DefaultTime2Retain",
        "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder", "ErrorRecoveryLevel",
        "RDMAExtensions", "InitiatorRecvDataSegmentLength", "TargetRecvDataSegmentLength",
    ]  # fmt: skip
    assert dict(out)["DefaultTime2Retain"] == "20"
    assert lio_iser_target(target_alias=None).step(NAMES)[1] == ("TargetPortalGroupTag", "1")


# --- the proposer checks its answers --------------------------------------------------------


def _initiator(**overrides: str) -> KeyNegotiator:
    i = linux_iser_initiator(IQN_I, IQN_T, overrides=overrides)
    i.step()
    return i


@pytest.mark.parametrize(
    ("key", "answer"),
    [
        ("MaxBurstLength", "16776193"),  # above the offer of a minimum key
        ("DefaultTime2Wait", "1"),  # below the offer of a maximum key
        ("DataPDUInOrder", "No"),  # OR offered Yes must stay Yes
        ("MaxConnections", NOT_UNDERSTOOD),  # a standard key
        ("MaxConnections", "many"),
    ],
)
def test_bad_answers(key: str, answer: str) -> None:
    with pytest.raises(IscsiNegotiationError):
        _initiator().step([(key, answer)])


def test_and_offered_no_cannot_become_yes() -> None:
    with pytest.raises(IscsiNegotiationError):
        _initiator(ImmediateData="No").step([("ImmediateData", "Yes")])


def test_reject_and_irrelevant_answers_restore_the_default() -> None:
    i = _initiator()
    i.step([("MaxBurstLength", REJECT), ("DefaultTime2Retain", IRRELEVANT)])
    with pytest.raises(IscsiNegotiationError, match="no answer"):
        i.finish()  # InitialR2T and the rest were never answered
    i = _initiator()
    lio = lio_iser_target()
    answer = [
        (k, REJECT if k == "MaxBurstLength" else v)
        for k, v in lio.step(linux_iser_initiator(IQN_I, IQN_T).step())
    ]
    i.step(answer)
    result = i.finish()
    assert "MaxBurstLength" not in result.values and result.max_burst_length == 262144


def test_list_answer_must_be_one_offered_value() -> None:
    i = KeyNegotiator("initiator", {"HeaderDigest": "None,CRC32C"}, ["HeaderDigest"])
    assert i.step() == [("HeaderDigest", "None,CRC32C")]
    with pytest.raises(IscsiNegotiationError):
        i.step([("HeaderDigest", "MD5")])
    i = KeyNegotiator("initiator", {"HeaderDigest": "None,CRC32C"}, ["HeaderDigest"])
    i.step()
    i.step([("HeaderDigest", "CRC32C")])
    assert i.finish().values["HeaderDigest"] == "CRC32C"


def test_proposals_need_a_local_value() -> None:
    with pytest.raises(ValueError):
        KeyNegotiator("initiator", {}, ["MaxBurstLength"])
    with pytest.raises(ValueError):
        KeyNegotiator("initiator", {"Foo": "1"}, ["Foo"])
    with pytest.raises(ValueError):
        KeyNegotiator("peer", {})  # type: ignore[arg-type]


# --- the engine never fails with anything but its typed error --------------------------------

_VALUE_SAMPLES = st.sampled_from(
    ["Yes", "No", "0", "1", "2", "512", "8192", "262144", "16777215", "16777216", "0x10",
     "None", "CRC32C", "CRC32C,None", "CHAP,None", "Normal", "Discovery", "", "x", REJECT,
     IRRELEVANT, NOT_UNDERSTOOD, "-1", "99999999999999999999999"]
)  # fmt: skip
_OFFERS = st.lists(
    st.tuples(st.sampled_from([*ISCSI_KEYS, "X-foo", "SendTargets"]), _VALUE_SAMPLES),
    max_size=12,
)


@given(_OFFERS, st.booleans(), st.booleans())
def test_any_offer_gets_answers_or_the_typed_error(
    offer: list[tuple[str, str]], leading: bool, security: bool
) -> None:
    t = lio_iser_target(leading=leading)
    stage = (
        IscsiLoginStage.SECURITY_NEGOTIATION if security else IscsiLoginStage.OP_PARMS_NEGOTIATION
    )
    try:
        out = t.step(offer, stage)
    except IscsiNegotiationError:
        return
    names = [k for k, _ in out]
    assert len(names) == len(set(names))
    decode_text(encode_text(out))  # always well-formed text
    offered = dict(offer)
    for name, value in out:
        if name in offered and name in ISCSI_KEYS and value not in (REJECT, IRRELEVANT):
            key = ISCSI_KEYS[name]
            if key.kind in (IscsiKeyKind.BOOL_AND, IscsiKeyKind.BOOL_OR):
                assert value in ("Yes", "No")
        if name not in ISCSI_KEYS:
            assert value == NOT_UNDERSTOOD


@given(_OFFERS)
def test_any_answer_is_checked_or_the_typed_error(answer: list[tuple[str, str]]) -> None:
    i = linux_iser_initiator(IQN_I, IQN_T)
    i.step()
    try:
        i.step(answer)
        i.finish()
    except IscsiNegotiationError:
        return
