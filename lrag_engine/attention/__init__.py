"""The public attention seam: retrieval memory as the self-attention of any AR video
backbone (:class:`RetrievalAttention`), its position encodings, and the backends."""
from .positions import NoPositions, PositionEncoding, TemporalRope, Wan3DRope
from .retrieval import RetrievalAttention

__all__ = ["RetrievalAttention", "PositionEncoding", "Wan3DRope", "TemporalRope", "NoPositions"]
