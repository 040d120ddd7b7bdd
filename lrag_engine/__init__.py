"""lrag_engine: retrieval-augmented autoregressive long-video generation (LongLive-RAG).

    from lrag_engine import Engine, MemoryConfig
    result = Engine("tiny", memory=MemoryConfig(top_k=6)).generate(num_frames=48)
"""
from .config import MemoryConfig, ModelConfig, RuntimeConfig
from .engine import BlockOutput, Engine, GenerationResult
from .memory.retrieval import BlockLog

__all__ = ["Engine", "GenerationResult", "BlockOutput", "BlockLog", "ModelConfig", "MemoryConfig",
           "RuntimeConfig"]
__version__ = "0.1.0"
