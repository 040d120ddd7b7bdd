"""Benchmark of the search and splice kernels against the plain PyTorch way.

On CUDA: median times (``triton.testing.do_bench``) of each kernel and of its PyTorch
equivalent, bytes moved over time in GB/s next to a measured device-to-device copy
bandwidth, and the speed-up; results go to a JSON file with the environment record of
``lrag_engine.bench.records`` (date, commit, versions, device). Without CUDA nothing is timed:
the script says so and exits 0, or with ``--smoke`` runs both kernels once at tiny sizes
in the Triton interpreter and checks them against the references.

    python benchmarks/bench_kernels.py [--out PATH] [--smoke]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from lrag_engine.bench.devices import device_slug
from lrag_engine.bench.provenance import now
from lrag_engine.bench.rates import copy_bandwidth
from lrag_engine.bench.records import environment, write_json
from lrag_engine.bench.timing import do_bench_ms

REPO = Path(__file__).resolve().parents[1]

SEARCH_CASES = [(1, 4096, 1024, 6), (8, 4096, 1024, 6), (8, 100_000, 1024, 6)]  # (B, N, D, k), bf16
# Wan 1.3B: 30 layers, 1560 tokens per frame, 12 heads x 128; K=6 retrieved + window 12.
SPLICE_CASE = dict(layers=30, batch=1, frames=6 + 12, grid=(30, 52), heads=12, head_dim=128)


def torch_search(query, keys, k, num_eligible):
    """The PyTorch way: normalize, batched mat-vec, mask, topk."""
    qn = torch.nn.functional.normalize(query, dim=-1)
    kn = torch.nn.functional.normalize(keys, dim=-1)
    scores = torch.bmm(kn, qn.unsqueeze(-1)).squeeze(-1).float()
    rows = torch.arange(keys.shape[1], device=keys.device)
    scores = scores.masked_fill(rows >= num_eligible[:, None], float("-inf"))
    return torch.topk(scores, k, dim=1)


def torch_splice(pool_k, pool_v, page_ids, positions, tables, out_k, out_v, retrieved=6):
    """The PyTorch way: per layer, index_select the retrieved and the window pages,
    cat them into one context, rotate K."""
    from lrag_engine.ops.rope import apply_rope_ref
    num_layers, batch, frames = page_ids.shape
    n, heads, head_dim = pool_k.shape[1:]
    cos, sin = tables.frame_cos_sin(positions)  # [Fc, N, D/2]
    cos, sin = cos.reshape(frames * n, -1), sin.reshape(frames * n, -1)

    def gather(pool, ids):
        return pool.index_select(0, ids.reshape(-1)).reshape(batch, -1, heads, head_dim)

    for layer in range(num_layers):
        ids = page_ids[layer]
        parts = (ids[:, :retrieved], ids[:, retrieved:])
        k = torch.cat([gather(pool_k, part) for part in parts], dim=1)
        v = torch.cat([gather(pool_v, part) for part in parts], dim=1)
        out_k[layer, :, : frames * n] = apply_rope_ref(k, cos, sin)
        out_v[layer, :, : frames * n] = v


def bench_search(copy_gbps: float) -> list[dict]:
    from lrag_engine.ops.search_topk import search_topk, search_topk_ref
    results = []
    for batch, n, d, k in SEARCH_CASES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        query = torch.randn(batch, d, device="cuda", generator=gen).bfloat16()
        keys = torch.randn(batch, n, d, device="cuda", generator=gen).bfloat16()
        norms = keys.float().norm(dim=-1)
        eligible = torch.full((batch,), n, device="cuda")
        got = search_topk(query, keys, k, eligible, mode="triton")
        want = search_topk_ref(query, keys, k, eligible)
        exact = bool(torch.equal(got[1], want[1]))
        nbytes = keys.numel() * keys.element_size() + query.numel() * query.element_size()
        times = {
            "triton": do_bench_ms(lambda: search_topk(query, keys, k, eligible, mode="triton")),
            "triton_norms_kept": do_bench_ms(
                lambda: search_topk(query, keys, k, eligible, key_norms=norms, mode="triton")),
            "torch": do_bench_ms(lambda: torch_search(query, keys, k, eligible)),
        }
        results.append(dict(
            op="search_topk", shape=dict(B=batch, N=n, D=d, k=k), dtype="bfloat16", bytes=nbytes,
            matches_reference=exact, ms=times,
            gbps={name: nbytes / ms / 1e6 for name, ms in times.items()},
            fraction_of_copy={name: nbytes / ms / 1e6 / copy_gbps for name, ms in times.items()},
            speedup_vs_torch=times["torch"] / times["triton"],
        ))
    return results


def bench_splice(copy_gbps: float) -> dict:
    from lrag_engine.ops.rope import RopeTables
    from lrag_engine.ops.splice import splice, splice_ref
    c = SPLICE_CASE
    n = c["grid"][0] * c["grid"][1]
    pages = c["layers"] * c["batch"] * c["frames"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    tables = RopeTables.build(c["head_dim"], *c["grid"], device="cuda")
    shape = (pages, n, c["heads"], c["head_dim"])
    pool_k = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    pool_v = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    page_ids = torch.randperm(pages, device="cuda", generator=gen).reshape(c["layers"], c["batch"], c["frames"])
    positions = torch.cat([torch.zeros(6, dtype=torch.int64), torch.arange(12)]).cuda()
    out_shape = (c["layers"], c["batch"], c["frames"] * n, c["heads"], c["head_dim"])
    outs = [torch.empty(out_shape, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
    splice(pool_k, pool_v, page_ids, positions, tables, outs[0], outs[1], mode="triton")
    splice_ref(pool_k, pool_v, page_ids, positions, tables, outs[2], outs[3])
    max_err = (outs[0].float() - outs[2].float()).abs().max().item()
    v_exact = bool(torch.equal(outs[1], outs[3]))
    nbytes = 4 * pages * n * c["heads"] * c["head_dim"] * 2  # K and V, read once and written once
    times = {
        "triton": do_bench_ms(
            lambda: splice(pool_k, pool_v, page_ids, positions, tables, outs[0], outs[1], mode="triton")),
        "torch": do_bench_ms(
            lambda: torch_splice(pool_k, pool_v, page_ids, positions, tables, outs[2], outs[3])),
    }
    return dict(
        op="splice", shape=dict(L=c["layers"], B=c["batch"], Fc=c["frames"], N=n, H=c["heads"], D=c["head_dim"]),
        dtype="bfloat16", bytes=nbytes, k_max_abs_err_vs_reference=max_err, v_bit_exact=v_exact, ms=times,
        gbps={name: nbytes / ms / 1e6 for name, ms in times.items()},
        fraction_of_copy={name: nbytes / ms / 1e6 / copy_gbps for name, ms in times.items()},
        speedup_vs_torch=times["torch"] / times["triton"],
    )


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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/kernels-<device>-<date>.json)")
    parser.add_argument("--smoke", action="store_true", help="without CUDA: a tiny interpreter run, no timings")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        if args.smoke:
            return smoke()
        print("bench_kernels: no CUDA device, nothing measured (--smoke runs a tiny interpreter check)")
        return 0
    device = torch.device("cuda", torch.cuda.current_device())
    env = environment(device)
    copy = copy_bandwidth(device)
    copy_gbps = copy["d2d_bytes_per_s"] / 1e9
    cases = bench_search(copy_gbps) + [bench_splice(copy_gbps)]
    report = dict(benchmark="kernels", environment=env, copy_bandwidth=copy, cases=cases)
    date = now().strftime("%Y-%m-%d")
    out = args.out or REPO / "benchmarks" / "results" / f"kernels-{device_slug(device)}-{date}.json"
    write_json(out, report)
    print(f"device {env['device']['name']}; copy {copy_gbps:.0f} GB/s")
    print(f"{'case':<42} {'variant':<18} {'ms':>9} {'GB/s':>8} {'of copy':>8}")
    for case in cases:
        label = case["op"] + " " + ",".join(f"{k}={v}" for k, v in case["shape"].items())
        for name, ms in case["ms"].items():
            print(f"{label:<42} {name:<18} {ms:>9.4f} {case['gbps'][name]:>8.0f} "
                  f"{100 * case['fraction_of_copy'][name]:>7.1f}%")
        print(f"{'':<42} speed-up vs torch: {case['speedup_vs_torch']:.2f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
