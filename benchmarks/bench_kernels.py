"""Benchmark of the search, splice and fused RoPE-store kernels against the plain PyTorch way.

On CUDA: median times (``triton.testing.do_bench``) of each kernel and of its PyTorch
equivalent, bytes moved over time in GB/s next to a measured device-to-device copy
bandwidth, and the speed-up; results go to a JSON file with the environment record of
``lrag_engine.bench.records`` (date, commit, versions, device), rewritten after every
case so that a run cut short keeps what it measured. A case that fails is recorded
with its error and the others still run.

``--tiny``: the same code at tiny shapes on the CPU in the Triton interpreter
(``TRITON_INTERPRET=1`` exported), timed with perf_counter: a check of the script's
paths, not a measurement. ``--smoke``: both older kernels once at tiny sizes in the
interpreter against their references, nothing timed. Without CUDA and without either
flag nothing runs: the script says so and exits 0.

    python benchmarks/bench_kernels.py [--out PATH] [--smoke | --tiny]
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import torch

from lrag_engine.bench.devices import device_slug
from lrag_engine.bench.provenance import now
from lrag_engine.bench.rates import copy_bandwidth
from lrag_engine.bench.records import environment, write_json
from lrag_engine.bench.timing import do_bench_ms, median_seconds

REPO = Path(__file__).resolve().parents[1]

# (B, N, D, k, keys shared by the batch), bf16
SEARCH_CASES = [(1, 4096, 1024, 6, False), (8, 4096, 1024, 6, False), (8, 100_000, 1024, 6, False),
                (8, 100_000, 1024, 6, True)]
# What the engine splices per block at the PERF.md reference workload (Wan 1.3B: 30
# layers, 1560 tokens per frame, 12 heads x 128; window 12, sink 1, K = 6): the context
# [sink | 6 retrieved | 5 local] of every layer, window frames from the window pool and
# retrieved frames from the history's chunked pool (256 MiB chunks), in one launch; the
# history stored as is (bf16) or as FP8 codes with per page-and-head scales.
SPLICE_CASES = [dict(layers=30, batch=1, grid=(30, 52), heads=12, head_dim=128, window=12, sink=1, top_k=6,
                     chunk_bytes=256 * 2 ** 20, history_dtype=h) for h in (None, "fp8_e4m3")]
# One layer-forward of Wan 1.3B: a block of 3 frames x 1560 tokens, 12 heads x 128, a
# window of 12 frames; the recache pass also stores the window (raw=True).
ROPE_STORE_CASES = [dict(batch=1, frames=3, grid=(30, 52), heads=12, head_dim=128, window=12, raw=False),
                    dict(batch=1, frames=3, grid=(30, 52), heads=12, head_dim=128, window=12, raw=True)]
TINY_SEARCH_CASES = [(2, 130, 40, 5, False), (3, 33, 24, 3, True)]
TINY_SPLICE_CASES = [dict(layers=2, batch=2, grid=(3, 5), heads=3, head_dim=12, window=5, sink=1, top_k=2,
                          chunk_bytes=3 * 15 * 3 * 12 * 4, history_dtype=h) for h in (None, "fp8_e4m3")]
TINY_ROPE_STORE_CASES = [dict(batch=2, frames=2, grid=(3, 5), heads=3, head_dim=12, window=5, raw=True)]


def bench_ms(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn``: do_bench on CUDA, a few perf_counter calls elsewhere."""
    if device.type == "cuda":
        return do_bench_ms(fn)
    return 1e3 * median_seconds(fn, device, warmup=1, reps=3)


def _rates(nbytes: int, times: dict, copy_gbps: float) -> dict:
    return dict(gbps={name: nbytes / ms / 1e6 for name, ms in times.items()},
                fraction_of_copy={name: nbytes / ms / 1e6 / copy_gbps for name, ms in times.items()},
                speedup_vs_torch=times["torch"] / times["triton"])


def torch_search(query, keys, k, num_eligible):
    """The PyTorch way: normalize, batched mat-vec, mask, topk."""
    qn = torch.nn.functional.normalize(query, dim=-1)
    kn = torch.nn.functional.normalize(keys, dim=-1)
    scores = torch.bmm(kn, qn.unsqueeze(-1)).squeeze(-1).float()
    rows = torch.arange(keys.shape[1], device=keys.device)
    scores = scores.masked_fill(rows >= num_eligible[:, None], float("-inf"))
    return torch.topk(scores, k, dim=1)


def torch_splice(window_k, window_v, history_k, history_v, scales, page_ids, source, positions, tables, out_k,
                 out_v):
    """The PyTorch way: per layer, index_select the window and the history pages (decoding
    FP8 ones), cat them in context order, rotate K."""
    from lrag_engine.ops.quant import dequantize_fp8
    from lrag_engine.ops.rope import apply_rope_ref
    num_layers, batch, frames = page_ids.shape
    n, heads, head_dim = window_k.shape[1:]
    cos, sin = tables.frame_cos_sin(positions)  # [Fc, N, D/2]
    cos, sin = cos.reshape(frames * n, -1), sin.reshape(frames * n, -1)
    from_window = source == 0
    win_at, hist_at = from_window.nonzero().squeeze(1), (~from_window).nonzero().squeeze(1)

    def gather(pool, ids, scale=None):
        pages = pool.index_select(0, ids.reshape(-1))
        if scale is not None:
            pages = dequantize_fp8(pages, scale.index_select(0, ids.reshape(-1)), out_k.dtype)
        return pages.reshape(batch, -1, n, heads, head_dim)

    for layer in range(num_layers):
        ids = page_ids[layer]
        win_ids, hist_ids = ids[:, win_at], ids[:, hist_at]
        k = torch.cat([gather(window_k, win_ids), gather(history_k, hist_ids, scales[0])], dim=1)
        v = torch.cat([gather(window_v, win_ids), gather(history_v, hist_ids, scales[1])], dim=1)
        order = torch.cat([win_at, hist_at]).argsort()
        k, v = k[:, order].flatten(1, 2), v[:, order].flatten(1, 2)
        out_k[layer, :, : frames * n] = apply_rope_ref(k, cos, sin).to(out_k.dtype)
        out_v[layer, :, : frames * n] = v


def bench_search(case: tuple, device: torch.device, copy_gbps: float) -> dict:
    from lrag_engine.ops.search_topk import search_topk, search_topk_ref
    batch, n, d, k, shared = case
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    query = torch.randn(batch, d, device=device, generator=gen).to(dtype)
    keys = torch.randn(1 if shared else batch, n, d, device=device, generator=gen).to(dtype).expand(batch, -1, -1)
    norms = keys.float().norm(dim=-1)
    eligible = torch.full((batch,), n, device=device)
    got = search_topk(query, keys, k, eligible, mode="triton")
    want = search_topk_ref(query, keys, k, eligible)
    exact = bool(torch.equal(got[1], want[1]))
    # Shared keys (batch stride 0) are one buffer: read once.
    nbytes = (n * d if shared else keys.numel()) * keys.element_size() + query.numel() * query.element_size()
    times = {
        "triton": bench_ms(lambda: search_topk(query, keys, k, eligible, mode="triton"), device),
        "triton_norms_kept": bench_ms(
            lambda: search_topk(query, keys, k, eligible, key_norms=norms, mode="triton"), device),
        "torch": bench_ms(lambda: torch_search(query, keys, k, eligible), device),
    }
    return dict(op="search_topk", shape=dict(B=batch, N=n, D=d, k=k, shared=shared), dtype=str(dtype).split(".")[-1],
                bytes=nbytes, matches_reference=exact, ms=times, **_rates(nbytes, times, copy_gbps))


def bench_splice(c: dict, device: torch.device, copy_gbps: float) -> dict:
    """One block's context splice as the engine runs it (one launch over the window and
    history pools) against the two launches of one source each, and the PyTorch way."""
    from lrag_engine.ops.quant import quantize_fp8
    from lrag_engine.ops.rope import RopeTables
    from lrag_engine.ops.splice import PageSource, splice, splice_sources
    n = c["grid"][0] * c["grid"][1]
    layers, batch, heads, head_dim = c["layers"], c["batch"], c["heads"], c["head_dim"]
    local = c["window"] - c["sink"] - c["top_k"]
    frames = c["sink"] + c["top_k"] + local
    fp8 = c["history_dtype"] == "fp8_e4m3"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    tables = RopeTables.build(head_dim, *c["grid"], device=device)
    page = (n, heads, head_dim)
    window_pages = layers * batch * c["window"]
    window_k = torch.randn(window_pages, *page, device=device, generator=gen).to(dtype)
    window_v = torch.randn(window_pages, *page, device=device, generator=gen).to(dtype)
    # A history of one page per context frame (of which the retrieved ones are read), in
    # chunks of chunk_bytes.
    history_pages = layers * batch * frames
    page_bytes = n * heads * head_dim * (1 if fp8 else torch.finfo(dtype).bits // 8)
    chunk_pages = max(1, c["chunk_bytes"] // page_bytes)
    history_k = torch.randn(history_pages, *page, device=device, generator=gen).to(dtype)
    history_v = torch.randn(history_pages, *page, device=device, generator=gen).to(dtype)
    scales = (None, None)
    if fp8:
        (history_k, scale_k), (history_v, scale_v) = quantize_fp8(history_k), quantize_fp8(history_v)
        scales = (scale_k, scale_v)
    k_chunks, v_chunks = (list(t.split(chunk_pages)) for t in (history_k, history_v))
    scale_chunks = [None if s is None else list(s.split(chunk_pages)) for s in scales]
    window = PageSource(window_k, window_v)
    history = PageSource(k_chunks, v_chunks, chunk_pages, *scale_chunks)
    # [sink | retrieved | local], as RetrievalCache._splice_context builds it
    source = torch.tensor([0] * c["sink"] + [1] * c["top_k"] + [0] * local, device=device)
    win_ids = torch.randperm(window_pages, device=device, generator=gen)[:layers * batch * frames]
    hist_ids = torch.randperm(history_pages, device=device, generator=gen)[:layers * batch * frames]
    page_ids = torch.where(source == 0, win_ids.view(layers, batch, frames), hist_ids.view(layers, batch, frames))
    positions = torch.cat([torch.arange(c["sink"]), torch.zeros(c["top_k"], dtype=torch.int64),
                           torch.arange(c["window"] - local, c["window"])]).to(device)
    out_shape = (layers, batch, frames * n, heads, head_dim)
    outs = [torch.empty(out_shape, device=device, dtype=dtype) for _ in range(4)]
    args = (page_ids, source, positions, tables)
    splice_sources([window, history], *args, outs[0], outs[1], mode="triton")
    splice_sources([window, history], *args, outs[2], outs[3], mode="reference")
    max_err = (outs[0].float() - outs[2].float()).abs().max().item()
    v_exact = bool(torch.equal(outs[1], outs[3]))
    torch_splice(window_k, window_v, history_k, history_v, scales, page_ids, source, positions, tables, outs[0],
                 outs[1])
    torch_err = max((outs[i].float() - outs[i + 2].float()).abs().max().item() for i in (0, 1))
    minus = torch.full_like(page_ids, -1)
    by_source = [torch.where(source == s, page_ids, minus) for s in (0, 1)]

    def two_launches():
        splice(window_k, window_v, by_source[0], positions, tables, outs[0], outs[1], mode="triton")
        splice(k_chunks, v_chunks, by_source[1], positions, tables, outs[0], outs[1], mode="triton",
               chunk_pages=chunk_pages, scale_k=scale_chunks[0], scale_v=scale_chunks[1])

    element = outs[0].element_size()
    window_frames = layers * batch * (frames - c["top_k"])
    history_frames = layers * batch * c["top_k"]
    history_element = 1 if fp8 else element
    # K and V: read once (history pages in their stored width, plus FP8 scales), written once
    nbytes = 2 * n * heads * head_dim * (window_frames * 2 * element
                                         + history_frames * (history_element + element))
    nbytes += 2 * history_frames * heads * 4 if fp8 else 0
    times = {
        "triton": bench_ms(lambda: splice_sources([window, history], *args, outs[0], outs[1], mode="triton"),
                           device),
        "triton_two_launches": bench_ms(two_launches, device),
        "torch": bench_ms(lambda: torch_splice(window_k, window_v, history_k, history_v, scales, page_ids, source,
                                               positions, tables, outs[2], outs[3]), device),
    }
    return dict(
        op="splice", shape=dict(L=layers, B=batch, Fc=frames, window=frames - c["top_k"], retrieved=c["top_k"],
                                N=n, H=heads, D=head_dim, history=c["history_dtype"] or "as is"),
        dtype=str(dtype).split(".")[-1], bytes=nbytes, k_max_abs_err_vs_reference=max_err,
        torch_way_max_abs_err_vs_reference=torch_err,
        # the interpreter rounds float32 -> bfloat16 toward zero: decoded FP8 V is not comparable bit for bit
        v_bit_exact=v_exact if not fp8 or dtype != torch.bfloat16 or device.type == "cuda" else None,
        ms=times, **_rates(nbytes, times, copy_gbps))


def bench_rope_store(c: dict, device: torch.device, copy_gbps: float) -> dict:
    """The fused per-forward kernel against the PyTorch ops it replaces, at one layer-forward."""
    from lrag_engine.ops.rope_store import rope_store, rope_store_ref
    n = c["grid"][0] * c["grid"][1]
    tokens = c["frames"] * n
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    shape = (c["batch"], tokens, c["heads"], c["head_dim"])
    # q, k, v as a backbone hands them over: views of one fused projection.
    q, k, v = torch.randn(c["batch"], tokens, 3, c["heads"], c["head_dim"], device=device,
                          generator=gen).to(dtype).unbind(2)
    cos = torch.rand(tokens, c["head_dim"] // 2, device=device, generator=gen)
    sin = torch.rand(tokens, c["head_dim"] // 2, device=device, generator=gen)
    ctx = [torch.empty(shape, device=device, dtype=dtype) for _ in range(4)]
    raw = []
    if c["raw"]:
        win_shape = (c["batch"], c["window"], n, c["heads"], c["head_dim"])
        raw = [torch.zeros(win_shape, device=device, dtype=dtype) for _ in range(4)]
        slots = torch.arange(c["frames"], device=device) + (c["window"] - c["frames"])
    fused = (raw[0], raw[1], slots) if raw else ()
    plain = (raw[2], raw[3], slots) if raw else ()
    q_fused = rope_store(q, k, v, cos, sin, ctx[0], ctx[1], *fused, mode="triton")
    q_plain = rope_store_ref(q, k, v, cos, sin, ctx[2], ctx[3], *plain)
    max_err = max((a.float() - b.float()).abs().max().item() for a, b in ((q_fused, q_plain), (ctx[0], ctx[2])))
    exact = bool(torch.equal(ctx[1], ctx[3])) and all(torch.equal(raw[i], raw[i + 2]) for i in range(len(raw) // 2))
    element = q.element_size()
    # Read q, k, v; write q_rot, K, V (+ K, V into the window); cos/sin read once.
    nbytes = q.numel() * element * (6 + (2 if raw else 0)) + 2 * cos.numel() * 4
    times = {
        "triton": bench_ms(lambda: rope_store(q, k, v, cos, sin, ctx[0], ctx[1], *fused, mode="triton"), device),
        "torch": bench_ms(lambda: rope_store_ref(q, k, v, cos, sin, ctx[2], ctx[3], *plain), device),
    }
    return dict(op="rope_store", shape=dict(B=c["batch"], T=tokens, H=c["heads"], D=c["head_dim"],
                                            window_store=c["raw"]),
                dtype=str(dtype).split(".")[-1], bytes=nbytes, max_abs_err_vs_reference=max_err,
                matches_reference=exact, ms=times, **_rates(nbytes, times, copy_gbps))


def smoke() -> int:
    """Both kernels once at tiny sizes in the interpreter, checked against the references."""
    os.environ.setdefault("TRITON_INTERPRET", "1")
    from lrag_engine.ops.rope import RopeTables
    from lrag_engine.ops.search_topk import search_topk, search_topk_ref
    from lrag_engine.ops.splice import splice, splice_ref
    query, keys = torch.randn(2, 40), torch.randn(2, 300, 40)
    got, want = search_topk(query, keys, 5, 250, mode="triton"), search_topk_ref(query, keys, 5, 250)
    search_ok = torch.equal(got[1], want[1]) and torch.allclose(got[0], want[0], atol=1e-5, rtol=1e-5)
    tables = RopeTables.build(12, 3, 5, max_frames=8)
    pool_k, pool_v = torch.randn(6, 15, 2, 12), torch.randn(6, 15, 2, 12)
    ids, pos = torch.tensor([[[0, -1, 5]], [[2, 3, 4]]]), torch.tensor([0, 3, 7])
    outs = [torch.zeros(2, 1, 45, 2, 12) for _ in range(4)]
    splice(pool_k, pool_v, ids, pos, tables, outs[0], outs[1], mode="triton")
    splice_ref(pool_k, pool_v, ids, pos, tables, outs[2], outs[3])
    splice_ok = torch.allclose(outs[0], outs[2], atol=1e-5, rtol=1e-5) and torch.equal(outs[1], outs[3])
    print(f"smoke (Triton interpreter, nothing timed): search_topk {'ok' if search_ok else 'MISMATCH'}, "
          f"splice {'ok' if splice_ok else 'MISMATCH'}")
    return 0 if search_ok and splice_ok else 1


def run_cases(device: torch.device, tiny: bool, out: Path) -> dict:
    """Every case in turn, the JSON rewritten after each (``<out>.partial.json`` until the
    last, then ``out``)."""
    env = environment(device)
    copy = copy_bandwidth(device)
    copy_gbps = copy["d2d_bytes_per_s"] / 1e9
    cases = ([(bench_rope_store, c) for c in (TINY_ROPE_STORE_CASES if tiny else ROPE_STORE_CASES)]
             + [(bench_search, c) for c in (TINY_SEARCH_CASES if tiny else SEARCH_CASES)]
             + [(bench_splice, c) for c in (TINY_SPLICE_CASES if tiny else SPLICE_CASES)])
    report = dict(benchmark="kernels", kind="code-path check (CPU interpreter)" if tiny else "GPU measurement",
                  environment=env, copy_bandwidth=copy, cases=[])
    partial = out.with_suffix(".partial.json")
    for bench, case in cases:
        op = bench.__name__.removeprefix("bench_")
        print(f"  {op} {case} ...", flush=True)
        try:
            report["cases"].append(bench(case, device, copy_gbps))
        except Exception as exc:  # one failing kernel must not lose the others' numbers
            traceback.print_exc()
            report["cases"].append(dict(op=op, shape=case if isinstance(case, dict) else {"case": list(case)},
                                        error=f"{type(exc).__name__}: {exc}"))
        write_json(partial, report)
    write_json(out, report)
    partial.unlink(missing_ok=True)
    return report


def print_table(report: dict, copy_gbps: float) -> None:
    print(f"device {report['environment']['device']['name']}; copy {copy_gbps:.0f} GB/s; {report['kind']}")
    print(f"{'case':<48} {'variant':<18} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
    for case in report["cases"]:
        label = case["op"] + " " + ",".join(f"{k}={v}" for k, v in case["shape"].items())
        if "error" in case:
            print(f"{label:<48} ERROR {case['error']}")
            continue
        for name, ms in case["ms"].items():
            print(f"{label:<48} {name:<18} {ms:>9.4f} {case['gbps'][name]:>8.0f} "
                  f"{100 * case['fraction_of_copy'][name]:>7.1f}%")
        print(f"{'':<48} speed-up vs torch: {case['speedup_vs_torch']:.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/out/kernels-<device>-<date>.json, ignored by git)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="without CUDA: a tiny interpreter run, no timings")
    group.add_argument("--tiny", action="store_true",
                      help="the benchmark's code at tiny shapes on the CPU in the Triton interpreter "
                           "(export TRITON_INTERPRET=1): a path check, not a measurement")
    args = parser.parse_args()
    if args.tiny:
        from lrag_engine.ops.dispatch import interpreting
        if not interpreting():
            print("bench_kernels: --tiny runs the kernels in the Triton interpreter: export TRITON_INTERPRET=1",
                  file=sys.stderr)
            return 2
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        if args.smoke:
            return smoke()
        print("bench_kernels: no CUDA device, nothing measured (--smoke or --tiny run interpreter checks)")
        return 0
    else:
        device = torch.device("cuda", torch.cuda.current_device())
    date = now().strftime("%Y-%m-%d")
    out = args.out or REPO / "benchmarks" / "out" / f"kernels-{device_slug(device)}-{date}.json"
    report = run_cases(device, args.tiny, out)
    print_table(report, report["copy_bandwidth"]["d2d_bytes_per_s"] / 1e9)
    print(f"wrote {out}")
    failed = [c for c in report["cases"] if "error" in c]
    mismatched = [c for c in report["cases"] if c.get("matches_reference") is False or c.get("v_bit_exact") is False]
    return 1 if failed or mismatched else 0


if __name__ == "__main__":
    sys.exit(main())
