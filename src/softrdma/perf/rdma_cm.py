"""perftest's ``-R``: the test's QP connected by the RDMA CM
(``perftest_communication.c``: ``retry_rdma_connect``,
``rdma_client_connect``, ``rdma_server_connect`` on the test's context),
on softrdma's RDMA CM (:mod:`softrdma.cm`).

After the info block the server prints that it waits for the client's
rdma_cm QP, listens again on the test's port and takes one connection
request; the client resolves the server's address and route, creates its
resources on the ID and sends the REQ (no private data after the
``cma_hdr``), retrying while the server does not listen yet. For READ and
atomic tests both depths are ``out_reads``, else 0 (the QP then has no
READ or atomic access); retry and RNR retry counts are 7. The client waits
for ESTABLISHED; the server goes on after ``rdma_accept`` (its QP is at RTS
then), as perftest's does. The key lines are exchanged afterwards as
without ``-R``, but nothing is connected by hand.
"""

from __future__ import annotations

import time

from softrdma.cm.cma import (
    RdmaCmError,
    RdmaCmEventType,
    RdmaCmId,
    RdmaConnParam,
    RdmaEventChannel,
)
from softrdma.perf.cm_comm import CM_TIMEOUT, NUM_OF_RETRIES, RETRY_DELAY, CmComm, resolve
from softrdma.perf.context import PerfContext, PerfError
from softrdma.perf.params import PerfParams, Verb

__all__ = ["WAITING_FOR_CM_QP", "listen_for_qp", "rdma_client_connect", "rdma_server_connect"]

WAITING_FOR_CM_QP = (
    " Waiting for client rdma_cm QP to connect",
    " Please run the same command with the IB/RoCE interface IP",
)
"""What perftest's server prints before it listens for the test's QP."""


def _conn_param(params: PerfParams) -> RdmaConnParam:
    reads = params.tool.verb in (Verb.READ, Verb.ATOMIC)
    depth = params.out_reads if reads else 0
    return RdmaConnParam(responder_resources=depth, initiator_depth=depth,
                         retry_count=7, rnr_retry_count=7)  # fmt: skip


def rdma_client_connect(
    comm: CmComm, params: PerfParams, server: str, local_ip: str | None, *, sgid_index: int
) -> PerfContext:
    """``retry_rdma_connect``: a context whose QP the CM connected (its
    buffer registered), on the comm channel's device."""
    dev = comm.dev
    last = ""
    # the test's context has its own event channel, as in perftest
    channel = RdmaEventChannel(dev.host)
    # perftest tries 10 times, but each try of its rebuilds its resources,
    # which takes a while: here the tries go on for as long as a slow server
    # may take to listen again (a REJ with "invalid service ID" until then)
    deadline = time.monotonic() + CM_TIMEOUT
    tries = 0
    while tries < NUM_OF_RETRIES or time.monotonic() < deadline:
        tries += 1
        cid = RdmaCmId(channel)
        ctx: PerfContext | None = None
        try:
            resolve(cid, server, params.port, local_ip)
            ctx = PerfContext(dev, params, sgid_index=sgid_index, cm_id=cid)
            try:
                cid.connect(_conn_param(params))
            except RdmaCmError as e:
                raise PerfError(f"Function rdma_connect failed: {e}") from None
            try:
                ev = channel.get_cm_event(CM_TIMEOUT)
            except RdmaCmError:
                raise PerfError("rdma_get_cm_events failed") from None
            if ev.event == RdmaCmEventType.ESTABLISHED:
                ctx.register()
                return ctx
            last = f"Unexpected CM event bl blka {int(ev.event)} (status {ev.status})"
        except BaseException:
            if ctx is not None:
                ctx.close()
            cid.destroy()
            raise
        ctx.close()
        cid.destroy()
        time.sleep(RETRY_DELAY)
    raise PerfError(f"{last}\nUnable to connect (retries = {tries})")


def listen_for_qp(comm: CmComm, params: PerfParams, local_ip: str | None) -> RdmaCmId:
    """The server's listener for the test's QP, on its own event channel.
    It is made before the exchange's first message is answered: a client
    connects right after it, and perftest's does not retry a REJ."""
    listener = RdmaCmId(RdmaEventChannel(comm.dev.host))
    try:
        listener.bind_addr(local_ip or "0.0.0.0", params.port)
        listener.listen(params.num_qps)
    except RdmaCmError as e:
        listener.destroy()
        raise PerfError(f" rdma_bind_addr failed: {e}") from None
    return listener


def rdma_server_connect(
    comm: CmComm, params: PerfParams, listener: RdmaCmId, *, sgid_index: int
) -> PerfContext:
    """``rdma_server_connect``: take one connection request on
    ``listener`` (from :func:`listen_for_qp`), create the resources on its
    ID and accept."""
    channel = listener.channel
    try:
        try:
            ev = channel.get_cm_event(CM_TIMEOUT)
        except RdmaCmError:
            raise PerfError(
                f"rdma_get_cm_events failed (no connect request in {CM_TIMEOUT:.0f} s)"
            ) from None
        if ev.event != RdmaCmEventType.CONNECT_REQUEST:
            raise PerfError(f"bad event waiting for connect request {int(ev.event)}")
    finally:
        listener.destroy()
    cid = ev.id
    ctx: PerfContext | None = None
    try:
        ctx = PerfContext(comm.dev, params, sgid_index=sgid_index, cm_id=cid)
        try:
            cid.accept(_conn_param(params))
        except RdmaCmError as e:
            raise PerfError(f"Function rdma_accept failed: {e}") from None
        ctx.register()
    except BaseException:
        if ctx is not None:
            ctx.close()
        cid.destroy()
        raise
    return ctx
