"""Names the current rdma-core test suite imports at load time and what
they do here: the GPU dma-buf allocators of ``pyverbs.dmabuf`` (no GPU:
the errors rdma-core's helpers give), the flat and grouped
``pyverbs.libibverbs_enums``, and pyverbs' typed ``post_send``."""

from __future__ import annotations

import errno

import pytest


def test_gpu_dmabuf_allocators_find_no_gpu(pyverbs_on_path: None) -> None:
    from pyverbs.dmabuf import DmaBuf, DrmDmaBuf, GpuType, HabanaLabsDmaBuf
    from pyverbs.pyverbs_error import PyverbsRDMAError

    # rdma-core's suites skip on ENOENT (no render node) / any failure
    with pytest.raises(PyverbsRDMAError) as ex:
        DrmDmaBuf(4096, gpu=1)
    assert ex.value.error_code == errno.ENOENT and "renderD129" in str(ex.value)
    with pytest.raises(PyverbsRDMAError) as ex:
        DmaBuf(4096, gpu=0)  # rdma-core 44's DRM allocation
    assert ex.value.error_code == errno.ENOENT
    with pytest.raises(PyverbsRDMAError) as ex:
        HabanaLabsDmaBuf(4096)
    assert ex.value.error_code == errno.ENODEV
    assert issubclass(DrmDmaBuf, DmaBuf) and {t.name for t in GpuType} == {"drm", "habana"}


def test_libibverbs_enums_new_members_and_flat_names(pyverbs_on_path: None) -> None:
    import pyverbs.libibverbs_enums as le

    values = {
        int(le.ibv_mr_init_attr_mask.IBV_REG_MR_MASK_DMAH): 16,
        int(le.ibv_mr_init_attr_mask.IBV_REG_MR_MASK_ADDR): 2,
        int(le.ibv_tph_mem_type.IBV_TPH_MEM_TYPE_PM): 1,
        int(le.ibv_dmah_init_attr_mask.IBV_DMAH_INIT_ATTR_MASK_TPH_MEM_TYPE): 4,
    }
    assert all(k == v for k, v in values.items())
    # every member is a module-level name too (the generated module's way)
    flat = vars(le)
    assert flat["IBV_QPT_RC"] is le.ibv_qp_type.IBV_QPT_RC
    assert flat["IBV_WC_EX_WITH_COMPLETION_TIMESTAMP"] == 128
    assert flat["IBV_WC_STANDARD_FLAGS"] == 127  # macros keep their own value


@pytest.mark.parametrize("machine", ["rxe0:cpu"], indirect=True)
def test_post_send_of_something_else_is_a_type_error(machine: str) -> None:
    from pyverbs.wr import SGE

    from tests.pyverbs.helpers import connect, player

    a, b = player(machine), player(machine)
    connect(a, b)
    # Cython's typed argument: TypeError, and nothing is posted
    with pytest.raises(TypeError, match="SendWR"):
        a.qp.post_send(SGE(a.mr.buf, 8, a.mr.lkey))  # type: ignore[arg-type]
    assert a.cq.poll(1)[0] == 0
    a.ctx.close()
    b.ctx.close()
