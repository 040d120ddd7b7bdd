"""The history ring (HistoryStore) and the descriptor ring against plain lists, over
many wraps, drops and growth; and drops that cost the frames dropped."""
import warnings

import pytest
import torch

from lrag_engine.memory.descriptors import DescriptorRing
from lrag_engine.memory.history import HistoryStore
from lrag_engine.testing import assert_close


@pytest.mark.parametrize("capacity", [1, 3, 7])
def test_descriptor_ring_matches_a_list(capacity):
    g = torch.Generator().manual_seed(capacity)
    ring = DescriptorRing(batch=2, dim=5, capacity=capacity, device="cpu")
    model: list[torch.Tensor] = []          # [B, Dd] per frame, oldest first
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
        ring.append(desc)
        model += list(desc.unbind(1))
        want = torch.stack(model, dim=1)
        assert torch.equal(ring.descriptors(), want), f"step {step}"
        assert_close(ring.norms(), want.double().norm(dim=-1), dtype=torch.float32, name=f"norms at step {step}")
    with pytest.raises(RuntimeError, match="exceed its capacity"):
        ring.append(torch.zeros(2, ring.capacity - ring.num_frames + 1, 5))
    with pytest.raises(ValueError, match="count must be in"):
        ring.drop_oldest(ring.num_frames + 1)


@pytest.mark.parametrize("batch", [1, 3])
def test_history_store_ring_matches_lists(batch):
    L, N, H, D, DD = 2, 3, 2, 4, 5
    frame_bytes = 2 * L * batch * N * H * D * 4
    store = HistoryStore(L, batch, N, H, D, DD, torch.float32, gpu_budget_bytes=int(5.5 * frame_bytes),
                         overflow_policy="drop_oldest")
    assert store.max_frames == 5
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
            for f, (fk, fv, _) in enumerate(frames):
                got_k, got_v = store.frame_kv(f)
                assert torch.equal(got_k, fk) and torch.equal(got_v, fv)
                for b in range(batch):
                    if b == 0 and f == 0:
                        continue
                    assert torch.equal(store.pool_k[pages[:, b, f]], fk[:, b])
                    assert torch.equal(store.pool_v[pages[:, b, f]], fv[:, b])
    assert store.dropped_frames == 25 - 5


def test_drop_copies_nothing_but_the_new_frames(monkeypatch):
    """Once the budget is full, an append writes only the appended pages: the pool is
    never shifted, whatever the budget."""
    L, B, N, H, D, DD = 2, 1, 3, 2, 4, 5
    frame_bytes = 2 * L * B * N * H * D * 4
    copied = []
    original = torch.Tensor.copy_

    def counting_copy(self, src, *args, **kwargs):
        copied.append(self.numel())
        return original(self, src, *args, **kwargs)

    for budget_frames in (8, 64):
        store = HistoryStore(L, B, N, H, D, DD, torch.float32, gpu_budget_bytes=budget_frames * frame_bytes,
                             overflow_policy="drop_oldest")
        g = torch.Generator().manual_seed(0)
        block = (torch.randn(L, B, 3, N, H, D, generator=g), torch.randn(L, B, 3, N, H, D, generator=g),
                 torch.randn(B, 3, DD, generator=g))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(budget_frames // 3 + 2):
                store.append(*block)
            assert store.dropped_frames > 0
            monkeypatch.setattr(torch.Tensor, "copy_", counting_copy)
            copied.clear()
            store.append(*block)
            monkeypatch.setattr(torch.Tensor, "copy_", original)
        # K and V of 3 frames x L layers x B streams, nothing more.
        assert sum(copied) == 2 * 3 * L * B * N * H * D, (budget_frames, copied)
