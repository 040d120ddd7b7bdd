"""Bridges to other libraries, each an optional extra imported only when used.

``lrag_engine.integrations.diffusers``: LongLive-RAG memory for a diffusers
``WanTransformer3DModel`` (``pip install -e ".[diffusers]"``).
"""
