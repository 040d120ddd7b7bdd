"""PagedHistoryStore on a CUDA device: pinned host tier, copy stream, both copy paths
(the extension's cudaMemcpyAsync batcher and per-page torch copies) against HistoryStore."""
import pytest
import torch

from lrag_engine.memory import _ext
from lrag_engine.memory.history import HistoryStore

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason())),
]


@pytest.mark.parametrize("raw", [pytest.param(True, id="cudaMemcpyAsync"), pytest.param(False, id="torch-copies")])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_cuda_store_matches_history_store(raw, dtype):
    from lrag_engine.memory.paged import PagedHistoryStore
    if raw and _ext.cuda_copy_reason() is not None:
        pytest.skip(f"extension CUDA copies unavailable: {_ext.cuda_copy_reason()}")
    L, B, N, H, D, Dd = 3, 2, 111, 2, 64, 8
    kw = dict(num_layers=L, batch=B, tokens_per_frame=N, num_heads=H, head_dim=D, descriptor_dim=Dd, dtype=dtype)
    fb = 2 * L * B * N * H * D * dtype.itemsize
    paged = PagedHistoryStore(**kw, device="cuda", gpu_budget_bytes=3 * fb, host_budget_bytes=12 * fb)
    paged._raw_copies = raw
    assert paged.host_k.is_pinned() and paged.host_v.is_pinned()
    ref = HistoryStore(**kw, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(6):
        fe = 3 if step % 2 == 0 else 1
        k = torch.randn(L, B, fe, N, H, D, device="cuda", generator=g).to(dtype)
        v = torch.randn(L, B, fe, N, H, D, device="cuda", generator=g).to(dtype)
        d = torch.randn(B, fe, Dd, device="cuda", generator=g)
        paged.append(k, v, d)
        ref.append(k, v, d)
        ids = torch.stack([torch.randperm(ref.num_frames, device="cuda", generator=g)[:3] for _ in range(B)])
        got, want = paged.page_ids(ids), ref.page_ids(ids)
        # read on the compute stream right after page_ids, as the splice does
        assert torch.equal(paged.pool_k[got], ref.pool_k[want])
        assert torch.equal(paged.pool_v[got], ref.pool_v[want])
    assert paged.usage()["host_used"] > 0
    for f in range(ref.num_frames):
        for a, b in zip(paged.frame_kv(f), ref.frame_kv(f)):
            assert torch.equal(a, b)
    paged._mem.check_invariants()


def test_pure_device_gather_when_resident():
    from lrag_engine.memory.paged import PagedHistoryStore
    store = PagedHistoryStore(2, 1, 4, 1, 8, 4, torch.float32, device="cuda", host_budget_bytes=1 << 20)
    store.append(torch.randn(2, 1, 3, 4, 1, 8, device="cuda"), torch.randn(2, 1, 3, 4, 1, 8, device="cuda"),
                 torch.randn(1, 3, 4, device="cuda"))
    assert store._all_resident
    ids = torch.tensor([[2, 0, -1]], device="cuda")
    pages = store.page_ids(ids)
    assert pages.is_cuda and pages.shape == (2, 1, 3) and (pages[:, 0, 2] == -1).all()
    assert len(store._pending_touches) == 1  # recency recorded without a sync, applied later
