"""iSCSI text: the ``key=value\\0`` lists of Login and Text PDUs.

RFC 7143 §6.1 (text format) and §6.2 (value syntax); kernel counterparts:
LIO's ``iscsi_extract_key_value`` / ``iscsi_decode_text_input`` reading
them, open-iscsi's ``iscsi_add_text`` writing them.

A data segment holds key=value pairs, each ended by a NUL byte. Keys are at
most 63 bytes of letters, digits and ``. - + @ _``; values are UTF-8 (at
most 8192 bytes); the list keeps the sender's order and duplicates (a
duplicate is a negotiation error, found by :mod:`.negotiate`, not a syntax
error).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final

from softrdma.transport.headers import BytesLike
from softrdma.ulp.iscsi.proto import IscsiEncodeError, IscsiProtocolError

__all__ = [
    "ISCSI_KEY_MAXLEN",
    "ISCSI_VALUE_MAXLEN",
    "IscsiTextError",
    "TextPairs",
    "decode_text",
    "encode_text",
]

ISCSI_KEY_MAXLEN: Final = 63
ISCSI_VALUE_MAXLEN: Final = 8192

TextPairs = list[tuple[str, str]]

_KEY: Final = re.compile(r"[A-Za-z0-9.\-+@_]{1,63}")


class IscsiTextError(IscsiProtocolError):
    """A data segment that is not a valid key=value list: no terminating
    NUL, a pair without ``=``, a bad key name, a value that is too long or
    not UTF-8 (LIO answers these by failing the login with an initiator
    error)."""


def _check_key(key: str) -> None:
    if not _KEY.fullmatch(key):
        raise IscsiTextError(f"{key[:80]!r} is not a valid key name")


def decode_text(data: BytesLike) -> TextPairs:
    """The key=value pairs of a Login or Text data segment, in order (the
    loop of LIO's ``iscsi_decode_text_input``). ``data`` is the data
    segment without padding: empty, or ending in NUL."""
    raw = bytes(data)
    if not raw:
        return []
    if not raw.endswith(b"\0"):
        raise IscsiTextError("text data does not end with a NUL byte")
    pairs: TextPairs = []
    for item in raw[:-1].split(b"\0"):
        key_b, eq, value_b = item.partition(b"=")
        if not eq:
            raise IscsiTextError(f"{item[:80]!r}: no '=' separator")
        try:
            key = key_b.decode("ascii")
            value = value_b.decode("utf-8")
        except UnicodeDecodeError as e:
            raise IscsiTextError(f"{item[:80]!r}: not UTF-8 ({e.reason})") from None
        _check_key(key)
        if len(value_b) > ISCSI_VALUE_MAXLEN:
            raise IscsiTextError(f"{key}: value of {len(value_b)} bytes")
        pairs.append((key, value))
    return pairs


def encode_text(pairs: Iterable[tuple[str, str]]) -> bytes:
    """The data segment for ``pairs``: each ``key=value`` and a NUL
    (open-iscsi ``iscsi_add_text``, LIO ``iscsi_encode_text_output``)."""
    out = bytearray()
    for key, value in pairs:
        try:
            _check_key(key)
        except IscsiTextError as e:
            raise IscsiEncodeError(str(e)) from None
        raw = value.encode("utf-8")
        if b"\0" in raw or len(raw) > ISCSI_VALUE_MAXLEN:
            raise IscsiEncodeError(f"{key}: value contains NUL or exceeds {ISCSI_VALUE_MAXLEN}")
        out += key.encode("ascii") + b"=" + raw + b"\0"
    return bytes(out)
