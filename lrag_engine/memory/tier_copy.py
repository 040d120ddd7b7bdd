"""Execution of the paged store's tier moves: the copy plans of the extension's page
tables (``evict_gpu[i] -> evict_host[i]``, then ``load_host[i] -> load_gpu[i]``) applied
to the torch page pools.

On CUDA the copies run on a side copy stream, ordered against the compute stream with
stream waits (events), never a host sync. They use the extension's ``cudaMemcpyAsync``
batcher on raw pointers when it can run here, else per-page ``copy_(non_blocking=True)``
from/to the pinned host pool. On the CPU they are plain index copies.
"""
from __future__ import annotations

from typing import Sequence

import torch

from lrag_engine.memory import _ext
from lrag_engine.runtime.transfer import index_tensor


class TierCopier:
    """Moves pages between the device pools and the host pools of one paged store.

    device: the device of the GPU-tier pools (with its index on CUDA).
    page_bytes: bytes of one page of one pool, ``N * H * D * itemsize``.
    raw: use the extension's batched ``cudaMemcpyAsync`` (True when it can run here);
        False selects the per-page torch copies.
    """

    def __init__(self, device: torch.device, page_bytes: int) -> None:
        self.device, self.page_bytes = device, page_bytes
        on_cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if on_cuda else None
        self.raw = on_cuda and _ext.cuda_copy_reason() is None

    def synchronize(self) -> None:
        """Waits for the copies in flight (before host-tier pages are read on the host)."""
        if self.stream is not None:
            self.stream.synchronize()

    def move(self, plan, pools: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Executes the evictions then the loads of a copy plan on every pool pair.

        pools: (device pool ``[G, N, H, D]``, host pool ``[Hs, N, H, D]``) pairs (K, then V);
        passed per call because an unbounded GPU tier reallocates its device pools.
        """
        if not plan.evict_gpu and not plan.load_gpu:
            return
        # A swap (eviction into a host slot a load of this plan reads) needs the evicted
        # pages staged before the loads overwrite their GPU slots.
        staged = bool(set(plan.evict_host) & set(plan.load_host))
        if self.stream is None:
            self._move_cpu(plan, pools)
            return
        compute = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(compute)  # appended/read pages are final before moving
        with torch.cuda.stream(self.stream):
            if self.raw:
                self._move_raw(plan, pools, staged)
            else:
                self._move_torch(plan, pools, staged)
        compute.wait_stream(self.stream)

    @staticmethod
    def _move_cpu(plan, pools) -> None:
        evict_gpu, evict_host, load_gpu, load_host = (
            torch.tensor(ids, dtype=torch.int64) for ids in (plan.evict_gpu, plan.evict_host,
                                                              plan.load_gpu, plan.load_host))
        for pool, host in pools:
            # index_select copies, so every eviction is read before the loads land
            evicted = pool[evict_gpu]
            pool[load_gpu] = host[load_host]
            host[evict_host] = evicted

    def _move_torch(self, plan, pools, staged: bool) -> None:
        for pool, host in pools:
            if staged:
                evicted = pool[index_tensor(plan.evict_gpu, self.device)]
            else:
                for g, h in zip(plan.evict_gpu, plan.evict_host):
                    host[h].copy_(pool[g], non_blocking=True)
            for h, g in zip(plan.load_host, plan.load_gpu):
                pool[g].copy_(host[h], non_blocking=True)
            if staged:
                for i, h in enumerate(plan.evict_host):
                    host[h].copy_(evicted[i], non_blocking=True)

    def _move_raw(self, plan, pools, staged: bool) -> None:
        ext, stream, dev = _ext.load(), self.stream.cuda_stream, self.device.index
        n = len(plan.evict_gpu)
        for pool, host in pools:
            if staged:
                evicted = torch.empty(n, *pool.shape[1:], dtype=pool.dtype, device=pool.device)
                ext.copy_pages(evicted.data_ptr(), list(range(n)), pool.data_ptr(), plan.evict_gpu,
                               self.page_bytes, stream, dev)
            else:
                ext.copy_pages(host.data_ptr(), plan.evict_host, pool.data_ptr(), plan.evict_gpu,
                               self.page_bytes, stream, dev)
            ext.copy_pages(pool.data_ptr(), plan.load_gpu, host.data_ptr(), plan.load_host,
                           self.page_bytes, stream, dev)
            if staged:
                ext.copy_pages(host.data_ptr(), plan.evict_host, evicted.data_ptr(), list(range(n)),
                               self.page_bytes, stream, dev)
