"""The streaming server: a FastAPI app over an :class:`AsyncEngine` (``lrag-engine serve``).

    app = create_app(AsyncEngine(engine, max_streams=16))
    uvicorn.run(app, host="127.0.0.1", port=8000)

WebSocket ``/v1/stream``, one stream per socket:

- The client's first message is a JSON object: the fields of ``StreamRequest.from_dict``
  (prompt, num_frames, seed, prompt_timeline, recache_sink, top_k, recency_guard,
  widen_local_until_memory, request_id) plus ``"format"``: ``"jpeg"`` (decoded frames,
  needs a VAE) or ``"latents"`` (default), and for JPEG ``"jpeg_quality"`` (1-95, default 90).
  ``num_frames`` left out: an endless stream, until the client cancels.
- Per block the server sends a JSON message ``{"type": "block", "request_id", "block",
  "frames": [first, end), "log" (the block's retrieval log), "final", "seconds", "batch",
  "format"}`` with, for JPEG, ``"num_images"``, ``"height"``, ``"width"``, followed by that many
  binary messages (one JPEG per video frame, in order); for latents ``"shape": [F, C, H,
  W]`` and ``"dtype": "float32"``, followed by one binary message (little-endian float32,
  C order).
- While the stream runs the client may send ``{"type": "switch", "prompt": "...",
  "recache_sink": false}`` (acknowledged by ``{"type": "switched", "request_id", "prompt"}``;
  it applies from the stream's next block) and ``{"type": "cancel"}``.
- At the end the server sends ``{"type": "end", "request_id", "status": "finished" |
  "cancelled" | "failed", "blocks", "error"}`` and closes the socket (code 1000).
- Errors are ``{"type": "error", "message": ...}``, naming the bad field. A bad or refused
  start request is answered with one and the socket closes (code 1008, policy violation;
  1013 when the engine cannot admit it: ``AdmissionError``); a bad message during a stream
  (malformed JSON, unknown type or field, a bad prompt) is answered with one and the
  socket and its stream go on.
- A client that goes away cancels its stream (its history pages are freed at once).

HTTP: ``GET /health`` (200 ``{"status": "ok"}``, 503 when the worker is down), ``GET
/metrics`` (``AsyncEngine.stats()`` plus ``memory_by_tier``: active streams, waiting,
blocks/s, queue depth, the page pool by tier), ``POST /v1/generate`` (a JSON
``StreamRequest`` with ``num_frames``, plus ``"fps"``, default 16 -> ``video/mp4``; errors are
400, or 503 when the request cannot be admitted, with ``{"type": "error", "message"}``).
"""
# No "from __future__ import annotations": FastAPI reads the handlers' annotations
# (WebSocket, Request), imported inside create_app, at definition time.
import asyncio
import io
import json
import shutil
import tempfile
from contextlib import asynccontextmanager
from pathlib import Path

from .async_engine import AsyncEngine, AsyncStream, StreamFailed
from .scheduler import AdmissionError, StreamBlock, StreamRequest

__all__ = ["create_app", "FORMATS"]

FORMATS = ("jpeg", "latents")
DEFAULT_JPEG_QUALITY = 90
# The WebSocket protocol allows 123 bytes of close reason.
_MAX_REASON_BYTES = 123
_SERVER_KEYS = ("format", "jpeg_quality")


def _install_hint(exc: ImportError) -> ImportError:
    return ImportError(f'the server needs FastAPI and uvicorn: pip install -e ".[serve]" ({exc})')


def _reason(message: str) -> str:
    data = message.encode()[:_MAX_REASON_BYTES]
    return data.decode(errors="ignore")


def parse_start(text: str | None, has_vae: bool) -> tuple[StreamRequest, str, int]:
    """The first message of a socket -> (request, format, jpeg quality); ValueError/TypeError
    naming the bad field."""
    if text is None:
        raise ValueError("the first message must be a JSON text message (a stream request), got a binary one")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"the first message is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"the first message must be a JSON object (a stream request), got {type(data).__name__}")
    fmt = data.pop("format", "latents")
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    quality = data.pop("jpeg_quality", DEFAULT_JPEG_QUALITY)
    if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 95:
        raise ValueError(f"jpeg_quality must be an int in [1, 95], got {quality!r}")
    if "output" in data:
        raise ValueError("output is set by format on the socket: give format 'jpeg' or 'latents'")
    if fmt == "jpeg" and not has_vae:
        raise ValueError("format 'jpeg' needs decoded frames, and this engine has no VAE: use format 'latents'")
    data["output"] = "frames" if fmt == "jpeg" else "latents"
    return StreamRequest.from_dict(data), fmt, quality


def encode_jpegs(frames, quality: int) -> list[bytes]:
    """uint8 frames [T, H, W, 3] (tensor) -> one JPEG per frame."""
    from PIL import Image

    out = []
    for image in frames.numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        out.append(buffer.getvalue())
    return out


def _block_message(block: StreamBlock, fmt: str) -> dict:
    return {"type": "block", "request_id": block.request_id, "block": block.block,
            "frames": list(block.frames), "log": block.log, "final": block.final,
            "seconds": block.seconds, "batch": block.batch, "format": fmt}


def parse_switch(data: dict) -> tuple[str, bool]:
    """A switch message -> (prompt, recache_sink); ValueError naming the bad field."""
    unknown = sorted(set(data) - {"type", "prompt", "recache_sink"})
    if unknown:
        raise ValueError(f"switch: unknown fields {unknown} (allowed: prompt, recache_sink)")
    prompt = data.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"switch: prompt must be a non-empty string, got {prompt!r}")
    recache_sink = data.get("recache_sink", False)
    if not isinstance(recache_sink, bool):
        raise ValueError(f"switch: recache_sink must be true or false, got {recache_sink!r}")
    return prompt, recache_sink


def memory_by_tier(memory: dict) -> dict:
    """The page pool's usage (``Engine.memory_usage``) grouped by tier."""
    tiers = {}
    for tier in ("gpu", "host"):
        tiers[tier] = {"pages_used": memory.get(f"{tier}_pages_used", 0),
                       "bytes_used": memory.get(f"{tier}_bytes_used", 0),
                       "bytes_reserved": memory.get(f"{tier}_bytes_reserved", 0),
                       "pages_budget": memory.get(f"{tier}_pages_budget")}
    return tiers


class _Socket:
    """One WebSocket with one stream: sends under a lock (a block's JSON and its binaries
    stay together), reads the client's switch/cancel messages."""

    def __init__(self, ws, ae: AsyncEngine) -> None:
        self.ws, self.ae = ws, ae
        self.lock = asyncio.Lock()

    async def send_json(self, message: dict) -> None:
        async with self.lock:
            await self.ws.send_text(json.dumps(message))

    async def error(self, message: str) -> None:
        await self.send_json({"type": "error", "message": message})

    async def refuse(self, message: str, code: int = 1008) -> None:
        await self.error(message)
        await self.ws.close(code=code, reason=_reason(message))

    async def send_blocks(self, stream: AsyncStream, fmt: str, quality: int) -> None:
        try:
            async for block in stream:
                message = _block_message(block, fmt)
                if fmt == "jpeg":
                    payloads = await asyncio.to_thread(encode_jpegs, block.frames_rgb, quality)
                    _, height, width, _ = block.frames_rgb.shape
                    message.update(num_images=len(payloads), height=height, width=width)
                else:
                    latents = block.latents.contiguous()
                    payloads = [latents.numpy().astype("<f4", copy=False).tobytes()]
                    message.update(shape=list(latents.shape), dtype="float32")
                async with self.lock:
                    await self.ws.send_text(json.dumps(message))
                    for payload in payloads:
                        await self.ws.send_bytes(payload)
        except AdmissionError as exc:
            await self.refuse(str(exc), code=1013)
            return
        except (ValueError, TypeError, KeyError) as exc:
            await self.refuse(str(exc))
            return
        except StreamFailed as exc:
            end = exc.end
        else:
            end = stream.end
        await self.send_json({"type": "end", "request_id": end.request_id, "status": end.status,
                              "blocks": end.blocks, "error": end.error})
        await self.ws.close(code=1000)

    async def receive_commands(self, request_id: str) -> None:
        """Until the client goes away: switch and cancel messages; a bad one is answered
        with an error and the socket goes on."""
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            text = message.get("text")
            if text is None:
                await self.error("messages after the request must be JSON text: {\"type\": \"switch\" | \"cancel\"}")
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                await self.error(f"message is not valid JSON: {exc}")
                continue
            kind = data.get("type") if isinstance(data, dict) else None
            try:
                if kind == "cancel":
                    await self.ae.cancel(request_id)
                elif kind == "switch":
                    prompt, recache_sink = parse_switch(data)
                    await self.ae.switch_prompt(request_id, prompt, recache_sink=recache_sink)
                    await self.send_json({"type": "switched", "request_id": request_id, "prompt": prompt})
                else:
                    raise ValueError(f"type must be 'switch' or 'cancel', got {kind!r}")
            except KeyError:
                await self.error(f"stream {request_id} is not running (it has ended)")
            except (ValueError, TypeError) as exc:
                await self.error(str(exc))


def create_app(async_engine: AsyncEngine, close_on_shutdown: bool = True):
    """The FastAPI app serving ``async_engine`` (see the module docstring for the protocol).
    The app starts the engine's worker when the server starts (on the server's event
    loop) and, with ``close_on_shutdown``, closes it when the server stops."""
    try:
        from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
        from fastapi.responses import JSONResponse, Response
    except ImportError as exc:
        raise _install_hint(exc) from None
    if not isinstance(async_engine, AsyncEngine):
        raise TypeError(f"create_app needs an AsyncEngine, got {type(async_engine).__name__}")
    ae = async_engine

    @asynccontextmanager
    async def lifespan(app):
        await ae.start()
        try:
            yield
        finally:
            if close_on_shutdown:
                await ae.aclose()

    app = FastAPI(title="lrag-engine", lifespan=lifespan)
    app.state.async_engine = ae

    @app.get("/health")
    async def health():
        if ae.worker_alive and ae.running:
            return {"status": "ok"}
        return JSONResponse({"status": "down"}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        stats = ae.stats()
        stats["memory_by_tier"] = memory_by_tier(stats.get("memory") or {})
        return stats

    @app.post("/v1/generate")
    async def generate(request: Request):
        def bad(message: str, status: int = 400):
            return JSONResponse({"type": "error", "message": message}, status_code=status)
        try:
            data = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return bad(f"the body is not valid JSON: {exc}")
        if not isinstance(data, dict):
            return bad(f"the body must be a JSON object (a stream request), got {type(data).__name__}")
        fps = data.pop("fps", 16)
        if isinstance(fps, bool) or not isinstance(fps, int) or not 1 <= fps <= 240:
            return bad(f"fps must be an int in [1, 240], got {fps!r}")
        if "output" in data:
            return bad("output: /v1/generate always returns decoded frames as an mp4; leave output out")
        if data.get("num_frames") is None:
            return bad("num_frames is required for /v1/generate (a positive multiple of frames_per_block)")
        if ae.engine.vae is None:
            return bad("/v1/generate needs decoded frames, and this engine has no VAE")
        data["output"] = "frames"
        try:
            stream = ae.stream_async(StreamRequest.from_dict(data))
        except (ValueError, TypeError) as exc:
            return bad(str(exc))
        from ..pipeline.video import Mp4Writer
        folder = tempfile.mkdtemp(prefix="lrag-generate-")
        path = Path(folder) / "video.mp4"
        writer = None
        try:
            async with stream:
                async for block in stream:
                    if writer is None:
                        writer = await asyncio.to_thread(Mp4Writer, path, fps)
                    await asyncio.to_thread(writer.append, block.frames_rgb)
            if writer is None:
                return bad(f"stream {stream.request_id} ended without blocks ({stream.end.status})", 500)
            await asyncio.to_thread(writer.close)
            video = path.read_bytes()
            frames = writer.frames_written
            writer = None
        except AdmissionError as exc:
            return bad(str(exc), 503)
        except (ValueError, TypeError) as exc:
            return bad(str(exc))
        except StreamFailed as exc:
            return bad(str(exc), 500)
        finally:
            if writer is not None:
                writer.abort()
            shutil.rmtree(folder, ignore_errors=True)
        return Response(video, media_type="video/mp4",
                        headers={"X-Request-Id": stream.request_id, "X-Video-Frames": str(frames)})

    @app.websocket("/v1/stream")
    async def stream_socket(ws: WebSocket):
        await ws.accept()
        sock = _Socket(ws, ae)
        try:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                request, fmt, quality = parse_start(message.get("text"), ae.engine.vae is not None)
                stream = ae.stream_async(request)
            except (ValueError, TypeError) as exc:
                await sock.refuse(str(exc))
                return
        except WebSocketDisconnect:
            return
        sender = asyncio.create_task(sock.send_blocks(stream, fmt, quality))
        receiver = asyncio.create_task(sock.receive_commands(stream.request_id))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, receiver):
                task.cancel()
            await asyncio.gather(sender, receiver, return_exceptions=True)
            await stream.aclose()   # a dropped client: the stream is cancelled, its pages freed

    return app
