"""One device shared by several processes, as rdma-core's RDMA CM tests use
it: the parent opens the device, then forks a passive and an active side
that connect from the device's address to itself."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from tests.fabric.netaddr import loopback_addresses
from tests.pyverbs.conftest import pyverbs_env

TIMEOUT = 90.0

_SCRIPT = """
import multiprocessing as mp, sys
import pyverbs.cm_enums as ce
import pyverbs.device as d
import pyverbs.enums as e
from pyverbs import _softrdma as sim
from pyverbs.cmid import CMID, AddrInfo, ConnParam
from pyverbs.qp import QPCap, QPInitAttr

IP = sys.argv[1]
init = QPInitAttr(qp_type=e.IBV_QPT_RC, cap=QPCap(max_send_wr=2, max_recv_wr=2))
ctx = d.Context(name="rxe0")  # the parent opens the device first: it carries it
owner = sim.process().devices["rxe0"]

def passive(ready, done):
    cid = CMID(creator=AddrInfo(src=IP, src_service="7471", flags=ce.RAI_PASSIVE),
               qp_init_attr=init)
    cid.listen()
    ready.wait(30)
    conn = cid.get_request()
    mr = conn.reg_msgs(16)
    conn.post_recv(mr, 16)
    conn.accept(ConnParam())
    assert conn.get_recv_comp().status == e.IBV_WC_SUCCESS
    assert mr.read(16, 0) == b"shared device!!!", mr.read(16, 0)
    share = sim.process().devices["rxe0"].share
    assert share.slot > 0 and conn.qpn >> 16 == share.slot
    done.wait(30)

def active(ready, done):
    ready.wait(30)
    cid = CMID(creator=AddrInfo(src=IP, dst=IP, dst_service="7471"), qp_init_attr=init)
    cid.connect(ConnParam())
    mr = cid.reg_msgs(16)
    mr.write(b"shared device!!!", 16)
    cid.post_send(mr, 0, 16)
    assert cid.get_send_comp().status == e.IBV_WC_SUCCESS
    done.wait(30)
    cid.disconnect()

c = mp.get_context("fork")
ready, done = c.Barrier(3, timeout=60), c.Barrier(3, timeout=60)
procs = [c.Process(target=f, args=(ready, done)) for f in (passive, active)]
for p in procs:
    p.start()
ready.wait(30)
done.wait(60)
for p in procs:
    p.join(30)
    if p.is_alive():
        p.kill()
print([p.exitcode for p in procs], owner.share.slot, owner.share.counters["joined"],
      owner.share.counters["passed"] > 0, owner.stats["rx_bad_icrc"])
"""


@contextmanager
def _first_process(cmd: list[str], env: dict[str, str]) -> Iterator[str]:
    """Run ``cmd`` (which prints a line, then waits for one on stdin) for
    the block; yield the line it printed, then let it end."""
    first = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdin is not None
        yield first.stdout.readline()
        first.stdin.write("\n")
        first.stdin.flush()
        first.wait(TIMEOUT)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()


def _second_process(cmd: list[str], env: dict[str, str]) -> str:
    out = subprocess.run(cmd, env=env, input="\n", capture_output=True, text=True, timeout=TIMEOUT)
    return out.stdout or out.stderr


def test_forked_processes_share_the_parents_device(pyverbs_on_path: None) -> None:
    """rdma-core's two-process CM pattern: one address, three processes,
    one device — the REQ reaches the process that listens, the data the
    process that owns the QP, with valid ICRCs all the way."""
    (ip,) = loopback_addresses(1)
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, ip],
        env=pyverbs_env() | {"SOFTRDMA_PYVERBS_NETWORK": f"udp:{ip}"},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert out.stdout.split("\n")[-2] == "[0, 0] 0 2 True 0", out.stdout + out.stderr


def test_a_second_process_joins_instead_of_failing(pyverbs_on_path: None) -> None:
    """An unrelated process opening the same address becomes a member of the
    device (slot 1), its QP numbers in its slot; when its owner is gone the
    address is free again."""
    (ip,) = loopback_addresses(1)
    script = (
        "import pyverbs.device as d, pyverbs.enums as e, sys\n"
        "from pyverbs import _softrdma as sim\n"
        "from pyverbs.pd import PD\n"
        "from pyverbs.cq import CQ\n"
        "from pyverbs.qp import QP, QPCap, QPInitAttr\n"
        "ctx = d.Context(name='rxe0')\n"
        "pd, cq = PD(ctx), CQ(ctx, 4)\n"
        "qp = QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=cq, rcq=cq, cap=QPCap(1, 1, 1, 1)))\n"
        "print(sim.process().devices['rxe0'].share.slot, hex(qp.qp_num), flush=True)\n"
        "sys.stdin.readline()\n"
    )
    env = pyverbs_env() | {"SOFTRDMA_PYVERBS_NETWORK": f"udp:{ip}"}
    cmd = [sys.executable, "-c", script]
    with _first_process(cmd, env) as line:
        assert line == "0 0x11\n"
        assert _second_process(cmd, env) == "1 0x10011\n"
    assert _second_process(cmd, env) == "0 0x11\n"


def test_a_port_another_process_listens_on_is_in_use(pyverbs_on_path: None) -> None:
    """``rdma_listen`` on a shared device's address and port that another
    process listens on fails with ``EADDRINUSE`` (the CM's service ID is
    device-wide), and works again once that process is gone."""
    (ip,) = loopback_addresses(1)
    script = (
        "import errno, sys\n"
        "import pyverbs.cm_enums as ce\n"
        "from pyverbs.cmid import CMID, AddrInfo\n"
        "from pyverbs.pyverbs_error import PyverbsRDMAError\n"
        "from pyverbs.qp import QPInitAttr\n"
        "cid = CMID(creator=AddrInfo(src=sys.argv[1], src_service='7480',"
        " flags=ce.RAI_PASSIVE), qp_init_attr=QPInitAttr())\n"
        "try:\n"
        "    cid.listen()\n"
        "except PyverbsRDMAError as ex:\n"
        "    print('refused', ex.error_code == errno.EADDRINUSE, flush=True)\n"
        "else:\n"
        "    print('listening', flush=True)\n"
        "sys.stdin.readline()\n"
    )
    env = pyverbs_env() | {"SOFTRDMA_PYVERBS_NETWORK": f"udp:{ip}"}
    cmd = [sys.executable, "-c", script, ip]
    with _first_process(cmd, env) as line:
        assert line == "listening\n"
        assert _second_process(cmd, env) == "refused True\n"
    assert _second_process(cmd, env) == "listening\n"
