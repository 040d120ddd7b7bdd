"""Retrieval encoder (SPEC section 5): model, losses, checkpoints, descriptors, corpus, training, evaluation."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .corpus import CorpusError, CorpusWriter, LatentCorpus, SyntheticCorpusConfig, generate_synthetic_corpus
from ..memory.retrieval import MeanDescriptor
from .descriptor import EncoderDescriptor
from .losses import encoder_loss, trajectory_smoothing_loss, window_temporal_delta_loss
from .model import EncoderConfig, RetrievalEncoder

__all__ = [
    "CheckpointError", "CorpusError", "CorpusWriter", "EncoderConfig", "EncoderDescriptor", "LatentCorpus",
    "RetrievalEncoder", "MeanDescriptor", "SyntheticCorpusConfig", "encoder_loss",
    "generate_synthetic_corpus", "load_checkpoint", "save_checkpoint", "trajectory_smoothing_loss",
    "window_temporal_delta_loss",
]
