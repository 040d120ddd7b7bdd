"""lrag_engine: retrieval-augmented autoregressive long-video generation (LongLive-RAG).

    from lrag_engine import Engine, MemoryConfig
    result = Engine("tiny", memory=MemoryConfig(top_k=6)).generate(num_frames=48)
"""
from .attention import NoPositions, PositionEncoding, RetrievalAttention, TemporalRope, Wan3DRope
from .config import MemoryConfig, ModelConfig, RuntimeConfig
from .engine import BlockOutput, Engine, GenerationResult
from .memory.retrieval import BlockLog
from .session import Session

__all__ = ["Engine", "Session", "GenerationResult", "BlockOutput", "BlockLog", "ModelConfig", "MemoryConfig",
           "RuntimeConfig", "RetrievalAttention", "PositionEncoding", "Wan3DRope", "TemporalRope", "NoPositions"]
__version__ = "0.1.0"
