"""lrag_engine: retrieval-augmented AR long-video generation."""
