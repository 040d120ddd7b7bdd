"""Fixtures of the serving tests: a small fast engine, and a second engine with the same
weights for reference runs on the test thread (helpers: serving_helpers.py)."""
from __future__ import annotations

import pytest

from lrag_engine import Engine, MemoryConfig

# Retrieval is active from block window + recency_guard = 7 on; the history cap lets
# endless streams in (the scheduler refuses them without one).
SMALL_MEMORY = dict(window=6, top_k=2, recency_guard=1, frames_per_block=1, max_history_frames=8)


def make_engine(seed: int = 0) -> Engine:
    """The tiny preset with small memory, a random text encoder and VAE (seeded)."""
    engine = Engine("tiny", memory=MemoryConfig(**SMALL_MEMORY), seed=seed)
    engine.attach_random_pipeline(seed=seed)
    return engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine()


@pytest.fixture(scope="module")
def reference_engine() -> Engine:
    """Same weights as ``engine``; only the test thread uses it."""
    return make_engine()
