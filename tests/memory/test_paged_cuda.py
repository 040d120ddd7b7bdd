"""HistoryStore on a CUDA device: device chunks first, then pinned host chunks that the
splice reads in place (UVA), against a store whose pages all sit on the device; the
engine's latents with host-resident history against device-only history; and the
extension's raw page-copy binding (cudaMemcpyAsync batcher)."""
import pytest
import torch

from lrag_engine.memory import _ext
from lrag_engine.memory.history import HistoryStore, PagePool
from lrag_engine.ops.rope import RopeTables
from lrag_engine.ops.splice import read_pages, splice, splice_ref
from lrag_engine.testing import assert_close

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

needs_cpp = pytest.mark.skipif(not _ext.extension_available(), reason=str(_ext.missing_reason()))


@pytest.fixture(params=[pytest.param("cpp", marks=needs_cpp), "python"])
def table(request):
    return request.param


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "f32"])
def test_host_chunks_match_device_chunks_through_the_splice(table, dtype):
    L, B, H, D, Dd, grid = 3, 2, 2, 64, 8, (6, 10)
    N = grid[0] * grid[1]
    ppf = L * B
    # 1 frame and 2 pages on the device, the rest on pinned host chunks of 4 pages
    mixed_pool = PagePool(L, N, H, D, dtype, "cuda", gpu_pages=ppf + 2, host_pages=12 * ppf, chunk_pages=4,
                          table=table)
    device_pool = PagePool(L, N, H, D, dtype, "cuda", chunk_pages=4, table=table)
    mixed, device = HistoryStore(mixed_pool, B, Dd), HistoryStore(device_pool, B, Dd)
    tables = RopeTables.build(D, *grid, max_frames=64, device="cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    for step in range(6):
        fe = 3 if step % 2 == 0 else 1
        k = torch.randn(L, B, fe, N, H, D, device="cuda", generator=g).to(dtype)
        v = torch.randn(L, B, fe, N, H, D, device="cuda", generator=g).to(dtype)
        d = torch.randn(B, fe, Dd, device="cuda", generator=g)
        mixed.append(k, v, d)
        device.append(k, v, d)
        ids = torch.stack([torch.randperm(device.num_frames, device="cuda", generator=g)[:4] for _ in range(B)])
        ids[0, -1] = -1
        got, want = mixed.page_ids(ids), device.page_ids(ids)
        assert got.is_cuda and torch.equal(got == -1, want == -1)
        # the splice reads the host chunks in place, right after page_ids on the same stream
        positions = torch.randint(0, 64, (B, ids.shape[1]), device="cuda", generator=g)
        outs = [torch.zeros(L, B, ids.shape[1] * N, H, D, dtype=dtype, device="cuda") for _ in range(6)]
        splice(mixed_pool.k_chunks, mixed_pool.v_chunks, got, positions, tables, outs[0], outs[1],
               chunk_pages=mixed_pool.chunk_pages)
        splice(device_pool.k_chunks, device_pool.v_chunks, want, positions, tables, outs[2], outs[3],
               chunk_pages=device_pool.chunk_pages)
        splice_ref(mixed_pool.k_chunks, mixed_pool.v_chunks, got, positions, tables, outs[4], outs[5],
                   chunk_pages=mixed_pool.chunk_pages)
        assert torch.equal(outs[0], outs[2]) and torch.equal(outs[1], outs[3])
        assert_close(outs[0], outs[4], name="kernel k over host chunks")
        assert torch.equal(outs[1], outs[5])
        torch.cuda.synchronize()   # read_pages reads host chunks from the CPU side
        assert torch.equal(read_pages(mixed_pool.k_chunks, got.clamp(min=0), 4)[got >= 0],
                           read_pages(device_pool.k_chunks, want.clamp(min=0), 4)[want >= 0])
    usage = mixed_pool.usage()
    assert usage["gpu_pages_used"] == ppf + 2 and usage["host_pages_used"] == mixed.num_frames * ppf - ppf - 2
    assert usage["host_chunks"] > 0 and device_pool.usage()["host_chunks"] == 0
    for i, (kc, vc) in enumerate(zip(mixed_pool.k_chunks, mixed_pool.v_chunks)):
        on_host = mixed_pool.is_host(i * mixed_pool.chunk_pages)
        assert on_host == (kc.device.type == "cpu") == (vc.device.type == "cpu")
        assert not on_host or (kc.is_pinned() and vc.is_pinned())
        assert on_host or kc.device == torch.device("cuda", torch.cuda.current_device())
    for f in range(device.num_frames):
        for a, b in zip(mixed.frame_kv(f), device.frame_kv(f)):
            assert torch.equal(a, b)
    mixed_pool.table.check_invariants()
    mixed.close()
    device.close()
    assert mixed_pool.usage()["pages_used"] == device_pool.usage()["pages_used"] == 0


def test_append_window_writes_host_pages_from_the_device_window(table):
    L, B, W, N, H, D = 2, 2, 5, 4, 1, 8
    pool = PagePool(L, N, H, D, torch.float32, "cuda", gpu_pages=0, host_pages=None, chunk_pages=3, table=table)
    store = HistoryStore(pool, B, 4)
    window_k = torch.randn(L, B, W, N, H, D, device="cuda")
    window_v = torch.randn(L, B, W, N, H, D, device="cuda")
    want_k, want_v = window_k.clone(), window_v.clone()
    slots = [4, 1, 2]
    store.append_window(window_k, window_v, slots, torch.randn(B, 3, 4, device="cuda"))
    window_k.zero_()   # queued after the copies into pinned memory: they read the old values
    window_v.zero_()
    assert pool.usage()["gpu_chunks"] == 0 and pool.usage()["host_pages_used"] == 3 * L * B
    assert all(c.is_pinned() for c in pool.k_chunks + pool.v_chunks)
    for f, slot in enumerate(slots):
        k, v = store.frame_kv(f)
        assert k.is_cuda and torch.equal(k, want_k[:, :, slot]) and torch.equal(v, want_v[:, :, slot])
    store.close()


def test_engine_latents_same_with_host_resident_history():
    from lrag_engine import Engine, MemoryConfig, ModelConfig, RuntimeConfig
    cfg = ModelConfig.preset("tiny")
    page_bytes = 2 * cfg.tokens_per_frame * cfg.num_heads * cfg.head_dim * 4
    frame_bytes = cfg.num_layers * page_bytes
    base = dict(window=6, sink=1, top_k=2, recency_guard=1, page_chunk_bytes=2 * page_bytes)
    configs = {
        "device": MemoryConfig(**base),
        # the first 3 evicted frames (global ids 1..3) on the device, the rest on pinned host chunks
        "spill": MemoryConfig(**base, gpu_budget_bytes=3 * frame_bytes, host_budget_bytes=30 * frame_bytes),
        "host": MemoryConfig(**base, history_tier="host", host_budget_bytes=30 * frame_bytes),
    }
    results, usage = {}, {}
    for name, memory in configs.items():
        engine = Engine(cfg, memory, RuntimeConfig(device="cuda"), seed=0)
        results[name] = engine.generate(24, seed=3)
        usage[name] = engine.memory_usage()
    assert usage["device"]["host_chunks"] == 0
    assert usage["spill"]["host_chunks"] > 0 and usage["host"]["host_chunks"] > 0
    for name in ("spill", "host"):
        assert usage[name]["pages_used"] == 0   # the session gave its pages back
        assert [b["selected"] for b in results[name].log_dicts()] == \
            [b["selected"] for b in results["device"].log_dicts()], name
        assert torch.equal(results[name].latents, results["device"].latents), name
    selected = [f for block in results["spill"].log_dicts() for row in block["selected"] for f in row]
    assert max(selected, default=0) >= 4, "no retrieved frame was read from a host chunk"


def test_raw_copy_pages_binding():
    """``_C.copy_pages``: pages by slot between device and pinned host memory, runs of
    consecutive slots merged, on the given stream."""
    reason = _ext.cuda_copy_reason()
    if reason is not None:
        pytest.skip(f"extension CUDA copies unavailable: {reason}")
    C = _ext.load()
    page = 257   # float32 elements: an odd page size
    src = torch.randn(6, page, device="cuda")
    host = torch.zeros(5, page).pin_memory()
    back = torch.zeros(6, page, device="cuda")
    stream = torch.cuda.current_stream()
    device = torch.cuda.current_device()
    dst_slots, src_slots = [0, 1, 2, 4], [3, 4, 5, 0]
    C.copy_pages(host.data_ptr(), dst_slots, src.data_ptr(), src_slots, page * 4, stream.cuda_stream, device)
    C.copy_pages(back.data_ptr(), src_slots, host.data_ptr(), dst_slots, page * 4, stream.cuda_stream, device)
    torch.cuda.synchronize()
    assert torch.equal(host[dst_slots], src[src_slots].cpu()) and (host[3] == 0).all()
    assert torch.equal(back[src_slots], src[src_slots]) and (back[[1, 2]] == 0).all()
    with pytest.raises(ValueError, match="2 destination slots but 1 source slots"):
        C.copy_pages(host.data_ptr(), [0, 1], src.data_ptr(), [0], page * 4, stream.cuda_stream, device)
