"""One device address on the real network, used by several processes.

Kernel counterpart: rxe has one UDP tunnel socket per network namespace
(``rxe_net.c``) and one device however many processes open it; what
arrives is demultiplexed by destination QPN (``rxe_rcv`` →
``rxe_pool_get_index``), and the IB CM finds a MAD's listener or connection
in its device-wide tables (``cm_recv_handler``). Here each process runs its
own copy of the device (:mod:`softrdma.verbs.share`), and the copies meet
at the address this way:

* The first process binds the address's UDP port, as an unshared device
  does, and becomes the **owner** (slot 0). It also binds an abstract Unix
  datagram socket named after the address and port — abstract names belong
  to the network namespace and vanish with their socket, so there is
  nothing to clean up.
* A later process whose bind fails with ``EADDRINUSE`` **joins** through
  that socket and is given a slot (1–255). It sends from its own UDP
  sockets at the same address as before, and receives nothing from the
  wire: the owner passes it what is its own.
* For each packet it decodes, the owner asks whose it is — by the slot in
  the destination QPN, and for the GSI QP's CM MADs by the slot in the
  connection's comm ID or by who claimed the REQ's service ID — and hands
  it, with the addresses, ports and IPv4 ID it arrived with, to that
  process, which checks the ICRC again and delivers it to its copy.
  Packets of no live member's slot stay with the owner's copy (which
  drops an unknown QPN, or rejects a REQ nobody listens on).

Only packets for this address are shared out; a member still reaches
other hosts directly. When the owner exits, the members' inbound traffic
stops (this is the process the kernel's device lives in); a member that
exits is forgotten as soon as the owner finds its socket gone (handing it
a packet, deciding a claim of its service, answering a join), and its slot
is free again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import struct
import threading
from collections import Counter
from collections.abc import Callable
from ipaddress import IPv4Address

from softrdma.errors import SoftRdmaError
from softrdma.transport.headers import BytesLike
from softrdma.transport.packet import Packet
from softrdma.verbs.share import COMM_ID_SLOT_SHIFT, MAX_SLOTS, QPN_SLOT_SHIFT

__all__ = ["Deliver", "GsiRoute", "ShareError", "UdpShare"]

log = logging.getLogger("softrdma.fabric.udp_share")

#: What the owner asks of a GSI QP's payload (a MAD): ``("service", ID)``
#: or ``("comm_id", ID)``, None when it belongs to the owner
#: (:func:`softrdma.cm.cm_port.cm_route_key`).
GsiRoute = Callable[[BytesLike], "tuple[str, int] | None"]
#: How a member hands a packet passed to it to its link:
#: ``(payload, saddr, daddr, sport, dport, ip_id, df)``.
Deliver = Callable[[bytes, bytes, bytes, int, int, int, bool], None]

#: Seconds a member waits for the owner to answer.
RPC_TIMEOUT = 2.0
_GSI_QPN = 1
# Messages: a one-byte kind, then its fields.
_JOIN, _SLOT, _CLAIM, _RELEASE, _LEAVE, _YES, _NO, _PACKET, _PROBE = (
    bytes([c]) for c in b"JSCRLYNP?"
)
_SLOT_MSG = struct.Struct(">cB")
_CLAIM_MSG = struct.Struct(">cBQ")
_PACKET_HDR = struct.Struct(">c4s4sHHHB")
_MAX_MSG = 65536 + _PACKET_HDR.size
_RX_BATCH = 64


class ShareError(SoftRdmaError, OSError):
    """The owner of a shared address could not be reached or refused."""


def _name(ip: IPv4Address, port: int) -> str:
    return f"\0softrdma-roce/{ip}:{port}"


def _dgram() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)


class UdpShare:
    """This process's end of a shared address: the owner's
    (:meth:`own`) or a member's (:meth:`join`); it implements
    :class:`~softrdma.verbs.share.DeviceShare` for the device on the
    link. ``sock`` is read by the network's loop (:meth:`on_readable`)."""

    def __init__(self, sock: socket.socket, slot: int, owner_name: str) -> None:
        self.sock = sock
        self._slot = slot
        self._owner_name = owner_name
        self._lock = threading.Lock()
        self._members: dict[int, bytes] = {}  # owner: slot -> the member's socket name
        self._services: dict[int, int] = {}  # owner: service ID -> slot
        self.gsi_route: GsiRoute | None = None
        self.deliver: Deliver | None = None
        self.counters: Counter[str] = Counter()
        """``passed`` (owner: packets handed to members), ``pass_dropped``
        (a member's socket was full), ``member_gone``, ``joined``."""

    # -- opening -----------------------------------------------------------------------

    @classmethod
    def own(cls, ip: IPv4Address, port: int, gsi_route: GsiRoute | None) -> UdpShare:
        """The owner's end, for the process that bound ``ip:port``."""
        sock = _dgram()
        try:
            sock.bind(_name(ip, port))
        except OSError as e:
            sock.close()
            raise ShareError(e.errno, f"cannot share {ip}:{port}: {e.strerror}") from None
        sock.setblocking(False)
        share = cls(sock, 0, _name(ip, port))
        share.gsi_route = gsi_route
        return share

    @classmethod
    def join(cls, ip: IPv4Address, port: int, deliver: Deliver) -> UdpShare:
        """A member's end: ask the process that owns ``ip:port`` for a
        slot. Raises :class:`ShareError` with ``ECONNREFUSED`` when no
        softrdma process shares the address, ``ENOSPC`` when every slot is
        taken, ``ETIMEDOUT`` when the owner does not answer."""
        sock = _dgram()
        sock.bind("")  # an abstract name of the kernel's choosing
        try:
            reply = _rpc(sock, _name(ip, port), _JOIN)
        except ShareError:
            sock.close()
            raise
        if reply[:1] != _SLOT:
            sock.close()
            raise ShareError(errno.ENOSPC, f"{ip}:{port} is shared by {MAX_SLOTS} processes")
        sock.setblocking(False)
        share = cls(sock, reply[1], _name(ip, port))
        share.deliver = deliver
        return share

    # -- DeviceShare ------------------------------------------------------------------

    @property
    def slot(self) -> int:
        """0 for the owner, 1–255 for a member."""
        return self._slot

    @property
    def members(self) -> int:
        """The owner's count of live members (0 for a member)."""
        return len(self._members)

    def claim_service(self, service_id: int) -> bool:
        """False when another process's copy listens on ``service_id``."""
        if self._slot == 0:
            return self._claim(0, service_id)
        return self._ask(_CLAIM_MSG.pack(_CLAIM, self._slot, service_id)) == _YES

    def release_service(self, service_id: int) -> None:
        if self._slot == 0:
            self._release(0, service_id)
        else:
            # when the owner is gone, its table went with it
            with contextlib.suppress(ShareError):
                self._ask(_CLAIM_MSG.pack(_RELEASE, self._slot, service_id))

    def _ask(self, msg: bytes) -> bytes:
        with _dgram() as sock:
            sock.bind("")
            return _rpc(sock, self._owner_name, msg)[:1]

    # -- the owner's tables ---------------------------------------------------------

    def _claim(self, slot: int, service_id: int) -> bool:
        holder = self._services.get(service_id)
        if holder is not None and holder != slot and (holder == 0 or self._alive(holder)):
            return False
        with self._lock:
            self._services[service_id] = slot
        return True

    def _alive(self, slot: int) -> bool:
        """Whether member ``slot``'s process still has its socket (a process
        that exits without leaving is forgotten here)."""
        name = self._members.get(slot)
        if name is None:
            return False
        try:
            self.sock.sendto(_PROBE, name)
        except (BlockingIOError, InterruptedError):
            return True  # alive, only busy
        except OSError:
            self.counters["member_gone"] += 1
            self._forget(slot)
            return False
        return True

    def _release(self, slot: int, service_id: int) -> None:
        with self._lock:
            if self._services.get(service_id) == slot:
                del self._services[service_id]

    def _forget(self, slot: int) -> None:
        with self._lock:
            self._members.pop(slot, None)
            for sid in [s for s, owner in self._services.items() if owner == slot]:
                del self._services[sid]

    def route(self, frame: Packet) -> int:
        """The slot whose copy ``frame`` is for (0: the owner's)."""
        qpn = frame.bth.dest_qp
        if qpn != _GSI_QPN:
            slot = qpn >> QPN_SLOT_SHIFT
        else:
            key = None if self.gsi_route is None else self.gsi_route(frame.payload)
            if key is None:
                return 0
            kind, value = key
            if kind == "service":
                slot = self._services.get(value, 0)
            else:
                slot = value >> COMM_ID_SLOT_SHIFT
        return slot if slot in self._members else 0

    def pass_on(
        self,
        slot: int,
        payload: BytesLike,
        saddr: bytes,
        daddr: bytes,
        sport: int,
        dport: int,
        ip_id: int,
        df: bool,
    ) -> None:
        """Hand a packet that arrived at the address to member ``slot``."""
        name = self._members.get(slot)
        if name is None:
            return
        hdr = _PACKET_HDR.pack(_PACKET, saddr, daddr, sport, dport, ip_id, df)
        try:
            self.sock.sendmsg([hdr, payload], [], 0, name)
        except (BlockingIOError, InterruptedError):
            self.counters["pass_dropped"] += 1  # as a full socket buffer drops
            return
        except OSError:  # its socket is closed: the process is gone
            self.counters["member_gone"] += 1
            self._forget(slot)
            return
        self.counters["passed"] += 1

    # -- what arrives on the socket --------------------------------------------------

    def on_readable(self) -> None:
        """Read what is queued: the owner's requests from members, or a
        member's packets from the owner."""
        for _ in range(_RX_BATCH):
            try:
                msg, sender = self.sock.recvfrom(_MAX_MSG)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if self._slot == 0:
                self._request(msg, sender)
            elif msg[:1] == _PACKET and len(msg) >= _PACKET_HDR.size and self.deliver:
                _, saddr, daddr, sport, dport, ip_id, df = _PACKET_HDR.unpack_from(msg)
                self.deliver(msg[_PACKET_HDR.size :], saddr, daddr, sport, dport, ip_id, bool(df))

    def _request(self, msg: bytes, sender: bytes | str) -> None:
        kind = msg[:1]
        if not isinstance(sender, bytes) or not sender:
            return  # an unnamed sender cannot be answered
        if kind == _JOIN:
            for slot in list(self._members):
                self._alive(slot)  # slots of processes that are gone are free again
            with self._lock:
                free = next((s for s in range(1, MAX_SLOTS) if s not in self._members), None)
                if free is not None:
                    self._members[free] = sender
                    self.counters["joined"] += 1
            reply = _NO if free is None else _SLOT_MSG.pack(_SLOT, free)
        elif kind in (_CLAIM, _RELEASE) and len(msg) == _CLAIM_MSG.size:
            _, slot, service_id = _CLAIM_MSG.unpack(msg)
            if kind == _CLAIM:
                reply = _YES if self._claim(slot, service_id) else _NO
            else:
                self._release(slot, service_id)
                reply = _YES
        elif kind == _LEAVE and len(msg) == _SLOT_MSG.size:
            self._forget(msg[1])
            return
        else:
            return  # not ours to answer
        with contextlib.suppress(OSError):  # it may have given up waiting
            self.sock.sendto(reply, sender)

    def close(self) -> None:
        """A member tells the owner it leaves; either end closes its socket."""
        if self._slot != 0:
            with contextlib.suppress(OSError):
                self.sock.sendto(_SLOT_MSG.pack(_LEAVE, self._slot), self._owner_name)
        self.sock.close()


def _rpc(sock: socket.socket, name: str, msg: bytes) -> bytes:
    """Send ``msg`` to the owner at ``name`` and wait for its answer."""
    sock.settimeout(RPC_TIMEOUT)
    try:
        sock.sendto(msg, name)
        while True:
            reply, sender = sock.recvfrom(_MAX_MSG)
            if sender == name.encode():
                return reply
    except (ConnectionRefusedError, FileNotFoundError):
        raise ShareError(errno.ECONNREFUSED, f"no softrdma process shares {name[1:]}") from None
    except TimeoutError:
        raise ShareError(errno.ETIMEDOUT, f"{name[1:]}: the owner did not answer") from None
    except OSError as e:
        raise ShareError(e.errno or errno.EIO, f"{name[1:]}: {e.strerror}") from None
