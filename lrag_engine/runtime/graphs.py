"""Static-buffer forwards, captured as CUDA graphs on CUDA.

A ``StaticForward`` owns copies of its inputs; every call copies fresh values into
them and runs the function over the static copies, so the function always sees the
same tensors. On CUDA it is captured once and replayed; elsewhere it runs eagerly,
which keeps the static-buffer plumbing testable on the CPU.

Capture happens on the first call with that call's real inputs. The function may
write into persistent buffers (context tail, window slots); the warm-up and the
capture-time run therefore write exactly what the first replay writes.
"""
from __future__ import annotations

from typing import Callable

import torch


class StaticForward:
    def __init__(self, fn: Callable[..., torch.Tensor], capture: bool, pool=None, warmup: int = 2) -> None:
        self.fn = fn
        self.capture = capture
        self.pool = pool
        self.warmup = warmup
        self.inputs: dict[str, torch.Tensor] | None = None
        self.output: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None
        self.calls = 0

    def __call__(self, **inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.inputs is None:
            self.inputs = {name: value.clone() for name, value in inputs.items()}
            if self.capture:
                self._capture()
        else:
            for name, value in inputs.items():
                self.inputs[name].copy_(value)
        if self.graph is not None:
            self.graph.replay()
            return self.output
        return self.fn(**self.inputs)

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(**self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.output = self.fn(**self.inputs)


class GraphCache:
    """StaticForwards keyed by a shape signature; one memory pool shared by all graphs.

    An engine holds one for all its sessions: a forward built for a signature is
    reused by every later session with that signature.
    """

    def __init__(self, capture: bool) -> None:
        self.capture = capture
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._forwards: dict[tuple, StaticForward] = {}

    def __contains__(self, key: tuple) -> bool:
        return key in self._forwards

    def get(self, key: tuple, fn: Callable[[], Callable[..., torch.Tensor]]) -> StaticForward:
        """The forward for ``key``; ``fn()`` builds its function the first time."""
        if key not in self._forwards:
            self._forwards[key] = StaticForward(fn(), self.capture, self.pool)
        return self._forwards[key]

    @property
    def captures(self) -> int:
        """CUDA graphs captured so far (0 off CUDA)."""
        return sum(f.graph is not None for f in self._forwards.values())

    @property
    def calls(self) -> int:
        """Calls of all static forwards (the first of each runs or captures it)."""
        return sum(f.calls for f in self._forwards.values())

    def keys(self) -> list[tuple]:
        return list(self._forwards)

    def __len__(self) -> int:
        return len(self._forwards)
