"""Window placement against the eviction rules of SPEC section 4, listed by hand."""
import torch

from lrag_engine.memory.window import WindowCache


def _window(window, sink):
    return WindowCache(num_layers=1, batch=1, window=window, sink=sink, tokens_per_frame=1, num_heads=1,
                       head_dim=6, descriptor_dim=2, dtype=torch.float32, device="cpu")


def _run(cache, blocks, frames):
    history = []
    orders = []
    for _ in range(blocks):
        placement = cache.plan_block(frames)
        history += [f.frame for f in placement.evicted]
        cache.commit(placement)
        orders.append([f.frame for f in placement.order])
    return history, orders


def test_sink1_window12_block3():
    history, orders = _run(_window(12, 1), 6, 3)
    assert orders[3] == list(range(12))
    assert orders[4] == [0] + list(range(4, 15))
    assert orders[5] == [0] + list(range(7, 18))
    assert history == [1, 2, 3, 4, 5, 6]          # evicted frame i is global frame S + i


def test_sink0_and_sink2():
    history, orders = _run(_window(6, 0), 4, 2)
    assert orders[-1] == [2, 3, 4, 5, 6, 7] and history == [0, 1]
    history, orders = _run(_window(7, 2), 5, 3)
    assert orders[-1] == [0, 1, 10, 11, 12, 13, 14]
    assert history == list(range(2, 10))


def test_slots_are_reused_and_unique():
    cache = _window(5, 1)
    for _ in range(10):
        placement = cache.plan_block(2)
        freed = {f.slot for f in placement.evicted}
        assert {f.slot for f in placement.block} <= freed | ({*range(5)} - {f.slot for f in cache.order})
        cache.commit(placement)
        slots = [f.slot for f in cache.order]
        assert len(slots) == len(set(slots)) and all(0 <= s < 5 for s in slots)
