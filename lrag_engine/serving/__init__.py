"""Serving many streams on one engine: the continuous-batching scheduler, an asyncio
front (AsyncEngine), the streaming HTTP/WebSocket server and Ray Serve replicas."""
from .scheduler import AdmissionError, Scheduler, StreamBlock, StreamEnd, StreamRequest
from .async_engine import AsyncEngine, AsyncStream, StreamFailed

__all__ = ["Scheduler", "StreamRequest", "StreamBlock", "StreamEnd", "AdmissionError",
           "AsyncEngine", "AsyncStream", "StreamFailed"]
