"""The descriptor ring (descriptors, norms and per-frame page addresses) and the
HistoryStore ring over it, against plain lists, over many wraps, drops and growth; and
drops that cost the frames dropped."""
import warnings

import pytest
import torch

from lrag_engine.memory import _ext
from lrag_engine.memory.descriptors import DescriptorRing
from lrag_engine.memory.history import HistoryStore, PagePool
from lrag_engine.ops.splice import read_pages
from lrag_engine.testing import assert_close

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


@pytest.fixture(params=[pytest.param("cpp", marks=needs_cpp), "python"])
def table(request):
    return request.param


@pytest.mark.parametrize("layers", [0, 3], ids=["no-pages", "pages"])
@pytest.mark.parametrize("capacity", [1, 3, 7])
def test_descriptor_ring_matches_a_list(capacity, layers):
    g = torch.Generator().manual_seed(capacity + layers)
    ring = DescriptorRing(batch=2, dim=5, capacity=capacity, device="cpu", layers=layers)
    model: list[tuple[torch.Tensor, torch.Tensor]] = []   # ([B, Dd], [B, layers]) per frame, oldest first
    next_page = 0
    for step in range(60):
        fe = int(torch.randint(1, capacity + 1, (1,), generator=g))
        if len(model) + fe > ring.capacity:
            if step % 3 == 0:
                ring.reserve(2 * ring.capacity)   # growth while the ring is wrapped
            else:
                drop = len(model) + fe - ring.capacity
                ring.drop_oldest(drop)
                del model[:drop]
        desc = torch.randn(2, fe, 5, generator=g)
        pages = torch.arange(next_page, next_page + 2 * fe * layers).view(2, fe, layers)
        next_page += pages.numel()
        ring.append(desc, pages if layers else None)
        model += list(zip(desc.unbind(1), pages.unbind(1)))
        assert ring.num_frames == len(model)
        want = torch.stack([d for d, _ in model], dim=1)
        assert torch.equal(ring.descriptors(), want), f"step {step}"
        assert_close(ring.norms(), want.double().norm(dim=-1), dtype=torch.float32, name=f"norms at step {step}")
        got_pages = ring.pages()
        assert got_pages.shape == (2, len(model), layers) and got_pages.dtype == torch.int64
        assert torch.equal(got_pages, torch.stack([p for _, p in model], dim=1)), f"pages at step {step}"
    with pytest.raises(RuntimeError, match="exceed its capacity"):
        ring.append(torch.zeros(2, ring.capacity - ring.num_frames + 1, 5))
    with pytest.raises(ValueError, match="count must be in"):
        ring.drop_oldest(ring.num_frames + 1)
    # pages go with a ring that has layers, and only with one
    ring.drop_oldest(ring.num_frames)
    with pytest.raises(ValueError, match="pages must be given exactly when the ring has layers"):
        ring.append(torch.zeros(2, 1, 5), None if layers else torch.zeros(2, 1, 1, dtype=torch.int64))
    assert ring.num_frames == 0


@pytest.mark.parametrize("layers", [0, 3])
def test_descriptor_ring_bytes_count_the_pages(layers):
    ring = DescriptorRing(batch=2, dim=5, capacity=4, device="cpu", layers=layers)
    # descriptor, norm (float32), page addresses, ordinal, hits, last use (int64)
    per_slot = 5 * 4 + 4 + layers * 8 + 3 * 8
    assert ring.nbytes == 2 * (2 * 4) * per_slot   # B x 2C slots
    ring.reserve(8)
    assert ring.nbytes == 2 * (2 * 8) * per_slot


@pytest.mark.parametrize("batch", [1, 3])
def test_history_store_ring_matches_lists(table, batch):
    L, N, H, D, DD = 2, 3, 2, 4, 5
    pages_per_frame = L * batch
    # 5.5 frames of pages: 5 whole frames over both tiers, chunks of 3 pages
    pool = PagePool(L, N, H, D, torch.float32, "cpu", gpu_pages=3 * pages_per_frame,
                    host_pages=int(2.5 * pages_per_frame), chunk_pages=3, table=table)
    store = HistoryStore(pool, batch, DD, overflow_policy="drop_oldest", initial_frames=2)
    assert store.capacity_frames == 5
    g = torch.Generator().manual_seed(batch)
    frames: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []   # k, v [L, B, N, H, D], desc [B, Dd]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for fe in (2, 3, 1, 3, 2, 1, 1, 3, 2, 3, 3, 1):
            k = torch.randn(L, batch, fe, N, H, D, generator=g)
            v = torch.randn(k.shape, generator=g)
            desc = torch.randn(batch, fe, DD, generator=g)
            store.append(k, v, desc)
            frames += [(k[:, :, f], v[:, :, f], desc[:, f]) for f in range(fe)]
            del frames[:len(frames) - 5]
            assert store.num_frames == len(frames)
            want_desc = torch.stack([d for _, _, d in frames], dim=1)
            assert torch.equal(store.descriptors(), want_desc)
            assert_close(store.descriptor_norms(), want_desc.double().norm(dim=-1), dtype=torch.float32)
            ids = torch.arange(store.num_frames).expand(batch, -1).clone()
            ids[0, 0] = -1
            pages = store.page_ids(ids)                               # [L, B, n]
            assert (pages[:, 0, 0] == -1).all()
            assert torch.equal(pages.permute(1, 2, 0)[ids >= 0], store.page_addresses()[ids >= 0])
            for f, (fk, fv, _) in enumerate(frames):
                got_k, got_v = store.frame_kv(f)
                assert torch.equal(got_k, fk) and torch.equal(got_v, fv)
                for b in range(batch):
                    if b == 0 and f == 0:
                        continue
                    assert torch.equal(read_pages(pool.k_chunks, pages[:, b, f], pool.chunk_pages), fk[:, b])
                    assert torch.equal(read_pages(pool.v_chunks, pages[:, b, f], pool.chunk_pages), fv[:, b])
    assert store.dropped_frames == 25 - 5
    assert pool.usage()["pages_used"] == 5 * pages_per_frame
    pool.table.check_invariants()


def test_drop_copies_nothing_but_the_new_frames(table, monkeypatch):
    """Once the budget is full, an append writes only the appended pages: nothing held is
    moved and no chunk is reallocated, whatever the budget."""
    L, B, N, H, D, DD = 2, 1, 3, 2, 4, 5
    copied = []
    real_copy, real_index_copy = torch.Tensor.copy_, torch.Tensor.index_copy_

    def counting_copy(self, src, *args, **kwargs):
        copied.append(self.numel())
        return real_copy(self, src, *args, **kwargs)

    def counting_index_copy(self, dim, index, src, *args, **kwargs):
        copied.append(src.numel())
        return real_index_copy(self, dim, index, src, *args, **kwargs)

    for budget_frames in (8, 64):
        pool = PagePool(L, N, H, D, torch.float32, "cpu", gpu_pages=budget_frames * L * B, host_pages=0,
                        chunk_pages=5, table=table)
        store = HistoryStore(pool, B, DD, overflow_policy="drop_oldest")
        g = torch.Generator().manual_seed(0)
        block = (torch.randn(L, B, 3, N, H, D, generator=g), torch.randn(L, B, 3, N, H, D, generator=g),
                 torch.randn(B, 3, DD, generator=g))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(budget_frames // 3 + 2):
                store.append(*block)
            assert store.dropped_frames > 0
            chunks = [c.data_ptr() for c in pool.k_chunks + pool.v_chunks]
            monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
            monkeypatch.setattr(torch.Tensor, "index_copy_", counting_index_copy)
            copied.clear()
            store.append(*block)
            monkeypatch.undo()
        # K and V of 3 frames x L layers x B streams, nothing more.
        assert sum(copied) == 2 * 3 * L * B * N * H * D, (budget_frames, copied)
        assert [c.data_ptr() for c in pool.k_chunks + pool.v_chunks] == chunks
        assert store.num_frames == budget_frames
