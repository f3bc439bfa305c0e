"""``pyverbs.utils``: text for pyverbs' numeric values."""

from __future__ import annotations

import pyverbs.enums as e
from pyverbs.pyverbs_error import PyverbsUserError

__all__ = [
    "access_flags_to_str",
    "gid_str",
    "gid_str_to_array",
    "mig_state_to_str",
    "mtu_to_str",
    "qp_state_to_str",
    "qp_type_to_str",
    "rereg_error_to_str",
]


def gid_str(subnet_prefix: int, interface_id: int) -> str:
    """A GID as eight groups of four hex digits, from its two 64-bit
    halves as stored in memory (big-endian, read as little-endian)."""
    raw = subnet_prefix.to_bytes(8, "little") + interface_id.to_bytes(8, "little")
    h = raw.hex()
    return ":".join(h[i : i + 4] for i in range(0, 32, 4))


def gid_str_to_array(val: str) -> list[str]:
    """``'xxxx:...'`` → the 16 bytes as two-digit hex strings."""
    groups = val.split(":")
    if len(groups) != 8 or any(len(g) != 4 for g in groups):
        raise PyverbsUserError(f"Invalid GID value ({groups})")
    try:
        int("".join(groups), 16)
    except ValueError:
        raise PyverbsUserError(f"Invalid GID value ({groups})") from None
    return [g[i : i + 2] for g in groups for i in (0, 2)]


_QP_TYPES = {2: "RC", 3: "UC", 4: "UD", 8: "Raw Packet", 9: "XRCD_SEND", 10: "XRCD_RECV"}
_QP_STATES = ["Reset", "Init", "RTR", "RTS", "SQD", "SQE", "Error", "Unknown"]


def qp_type_to_str(qp_type: int) -> str:
    if qp_type == 0xFF:
        return "Driver QP"
    return _QP_TYPES.get(qp_type, f"Unknown ({qp_type})")


def qp_state_to_str(qp_state: int) -> str:
    if 0 <= qp_state < len(_QP_STATES):
        return _QP_STATES[qp_state]
    return f"Unknown ({qp_state})"


def mtu_to_str(mtu: int) -> int:
    """The bytes of an ``ibv_mtu`` (0 when invalid)."""
    return 128 << mtu if 1 <= mtu <= 5 else 0


def access_flags_to_str(flags: int) -> str:
    names: dict[int, str] = {
        e.IBV_ACCESS_LOCAL_WRITE: "Local write",
        e.IBV_ACCESS_REMOTE_WRITE: "Remote write",
        e.IBV_ACCESS_REMOTE_READ: "Remote read",
        e.IBV_ACCESS_REMOTE_ATOMIC: "Remote atomic",
        e.IBV_ACCESS_MW_BIND: "MW bind",
        e.IBV_ACCESS_ZERO_BASED: "Zero based",
        e.IBV_ACCESS_ON_DEMAND: "On demand",
    }
    return "".join(f"{text} " for bit, text in names.items() if flags & bit)


def mig_state_to_str(mig: int) -> str:
    return {0: "Migrated", 1: "Re-arm", 2: "Armed"}.get(mig, f"Unknown ({mig})")


def rereg_error_to_str(error: int) -> str:
    names: dict[int, str] = {
        e.IBV_REREG_MR_ERR_INPUT: "IBV_REREG_MR_ERR_INPUT",
        e.IBV_REREG_MR_ERR_DONT_FORK_NEW: "IBV_REREG_MR_ERR_DONT_FORK_NEW",
        e.IBV_REREG_MR_ERR_DO_FORK_OLD: "IBV_REREG_MR_ERR_DO_FORK_OLD",
        e.IBV_REREG_MR_ERR_CMD: "IBV_REREG_MR_ERR_CMD",
        e.IBV_REREG_MR_ERR_CMD_AND_DO_FORK_NEW: "IBV_REREG_MR_ERR_CMD_AND_DO_FORK_NEW",
    }
    return names.get(error, f"Unknown error ({error})")
