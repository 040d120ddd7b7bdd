"""Ray Serve: one engine per replica (one GPU each on a cluster), each stream pinned to its replica.

    from lrag_engine.config import RuntimeConfig
    from lrag_engine.serving.ray_app import EngineSpec, build_app, run
    spec = EngineSpec(model_dir="Wan2.1-T2V-1.3B", runtime=RuntimeConfig(device="cuda", dtype="bfloat16"))
    app = build_app(spec, replicas=4, gpus_per_replica=1)
    url = run(app, host="0.0.0.0", port=8000)      # ws://host:8000/v1/stream, /health, /metrics

Every replica is a Ray actor that builds its own engine (``engine_factory()``, called in
the replica's process, so weights load once per GPU and never cross the network) and one
:class:`~lrag_engine.serving.AsyncEngine` over it, and serves the same HTTP and WebSocket
protocol as ``lrag-engine serve`` (:mod:`lrag_engine.serving.server`), with two response
headers that name the replica: ``x-lrag-replica`` (Serve's replica id) and
``x-lrag-replica-pid``.

Sticky streams. A stream's state (its place in the scheduler, its window and history
pages) lives in one replica's engine, so everything about a stream must reach that
replica. Here a stream *is* one WebSocket connection (``/v1/stream``): Serve's proxy
routes a connection to one replica and keeps it there until it closes, and the stream's
prompt switches and its cancel travel on the same socket, so they reach the replica that
holds the stream by construction, with no routing table to keep in step and no request
that can land on a replica that does not know the stream. A client that goes away cancels
its stream on that replica (its pages are freed). Serve's model multiplexing was not used
for this: it prefers the replica that holds a model id but falls back to another one when
that replica is busy, which is right for a cache of weights and wrong for a stream's
memory.

Load and admission. An open stream counts as one ongoing request of its replica, and
Serve's router sends a new connection to the less loaded of two replicas it samples, so
streams spread over the replicas. A replica accepts ``max_streams + http_headroom``
ongoing requests (Serve's ``max_ongoing_requests``): past ``max_streams`` running streams
a new connection waits in Serve's queue for whichever replica frees a place first,
rather than in one replica's waiting queue; the headroom keeps ``/health`` and
``/metrics`` answering on a full replica. Within a replica, the AsyncEngine's scheduler
batches the streams it holds.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

try:
    import ray
    from ray import serve
except ImportError as exc:   # an optional part: the rest of lrag_engine.serving works without it
    raise ImportError(f"lrag_engine.serving.ray_app needs Ray Serve: pip install -e \".[ray]\" ({exc})") from None

from ..config import MemoryConfig, RuntimeConfig
from .async_engine import AsyncEngine
from .server import create_app

__all__ = ["EngineSpec", "StreamReplica", "build_app", "run", "REPLICA_HEADER", "REPLICA_PID_HEADER"]

REPLICA_HEADER = "x-lrag-replica"
REPLICA_PID_HEADER = "x-lrag-replica-pid"
# Ongoing requests a replica takes beyond its streams: /health, /metrics and one-shot
# /v1/generate calls on a replica whose streams are all running.
HTTP_HEADROOM = 4


@dataclass(frozen=True)
class EngineSpec:
    """A picklable recipe for the engine each replica builds (``spec()`` -> Engine).

    preset: model shapes (``ModelConfig.preset``) when no ``model_dir`` is given; the
        weights are then random (seeded) unless ``checkpoint`` is given, and with
        ``random_pipeline`` a tiny random text encoder and VAE are attached (prompts and
        decoded frames without downloads).
    model_dir: a Wan2.1-T2V model directory (``Engine.from_pretrained``, with ``height``
        / ``width``, the latent frame size); ``checkpoint`` (and ``lora``) are laid over
        its DiT weights.
    checkpoint_key / lora_alpha / encoder: as ``Engine``'s options of those names.
    memory / runtime: the engine's MemoryConfig and RuntimeConfig (``runtime.device``
        "cuda" is the replica's own GPU: Ray gives each replica the GPUs it asked for).
    seed: the engine's seed (random weights, default noise seed).
    """

    preset: str = "tiny"
    model_dir: str | None = None
    checkpoint: str | None = None
    checkpoint_key: str | None = None
    lora: str | None = None
    lora_alpha: float | None = None
    encoder: str | None = None
    height: int | None = None
    width: int | None = None
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    random_pipeline: bool = True
    seed: int = 0

    def __call__(self):
        from ..engine import Engine

        common = dict(checkpoint=self.checkpoint, checkpoint_key=self.checkpoint_key, lora=self.lora,
                      lora_alpha=self.lora_alpha, encoder=self.encoder, seed=self.seed)
        if self.model_dir is not None:
            return Engine.from_pretrained(self.model_dir, memory=self.memory, runtime=self.runtime,
                                          height=self.height, width=self.width, **common)
        if self.height is not None or self.width is not None:
            raise ValueError("EngineSpec: height/width set the latent size of a model_dir model; presets have "
                             "their own")
        engine = Engine(self.preset, memory=self.memory, runtime=self.runtime, **common)
        if self.random_pipeline:
            engine.attach_random_pipeline(seed=self.seed)
        return engine

    @property
    def device_type(self) -> str:
        return torch.device(self.runtime.device).type


class _ReplicaHeaders:
    """ASGI middleware: adds fixed headers to every HTTP response and WebSocket handshake."""

    def __init__(self, app, headers: list[tuple[bytes, bytes]]) -> None:
        self.app, self.headers = app, headers

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] in ("http.response.start", "websocket.accept"):
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


@serve.ingress()
class StreamReplica:
    """One replica: an engine, its AsyncEngine, and the streaming server's app over them.

    The app's lifespan (run by Serve on the replica's event loop) starts the AsyncEngine's
    worker, and closes it (every stream cancelled, every page freed) when the replica
    stops."""

    async def __init__(self, engine_factory: Callable[[], Any], limits: dict, cpus: float) -> None:
        engine = engine_factory()
        if engine.device.type == "cpu":
            torch.set_num_threads(max(1, int(cpus)))   # replicas on one host do not fight for cores
        self.async_engine = AsyncEngine(engine, **limits)
        context = serve.get_replica_context()
        self.replica_id = context.replica_id.unique_id
        self.pid = os.getpid()

    def __serve_build_asgi_app__(self):
        app = create_app(self.async_engine, close_on_shutdown=True)
        app.add_middleware(_ReplicaHeaders, headers=[(REPLICA_HEADER.encode(), self.replica_id.encode()),
                                                     (REPLICA_PID_HEADER.encode(), str(self.pid).encode())])
        return app


def build_app(engine_factory: Callable[[], Any], replicas: int = 2, gpus_per_replica: float | None = None,
              cpus_per_replica: float = 1, max_streams: int = 16, max_batch: int = 8, queue_blocks: int = 4,
              max_waiting: int = 64, http_headroom: int = HTTP_HEADROOM, name: str = "lrag-engine"):
    """The Serve application: ``replicas`` copies of :class:`StreamReplica`.

    engine_factory: a picklable zero-argument callable returning an Engine, called once in
        each replica's process (an :class:`EngineSpec`, a module-level function, a
        ``functools.partial``).
    gpus_per_replica: GPUs each replica reserves (default: 1 when ``engine_factory`` is an
        EngineSpec on CUDA, else 0). cpus_per_replica: CPUs each reserves (on a CPU
        engine also its torch threads).
    max_streams / max_batch / queue_blocks / max_waiting: each replica's AsyncEngine limits.
    http_headroom: ongoing requests a replica takes beyond ``max_streams``.
    """
    for label, value in (("replicas", replicas), ("max_streams", max_streams)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be an int >= 1, got {value!r}")
    if isinstance(http_headroom, bool) or not isinstance(http_headroom, int) or http_headroom < 0:
        raise ValueError(f"http_headroom must be an int >= 0, got {http_headroom!r}")
    if not callable(engine_factory):
        raise TypeError(f"engine_factory must be a callable returning an Engine, got {type(engine_factory).__name__}")
    if gpus_per_replica is None:
        gpus_per_replica = 1 if getattr(engine_factory, "device_type", None) == "cuda" else 0
    for label, value in (("gpus_per_replica", gpus_per_replica), ("cpus_per_replica", cpus_per_replica)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            raise ValueError(f"{label} must be a number >= 0, got {value!r}")
    limits = dict(max_streams=max_streams, max_batch=max_batch, queue_blocks=queue_blocks, max_waiting=max_waiting)
    actor_options = {"num_cpus": cpus_per_replica}
    if gpus_per_replica:
        actor_options["num_gpus"] = gpus_per_replica
    deployment = serve.deployment(StreamReplica, name=name, num_replicas=replicas,
                                  ray_actor_options=actor_options,
                                  max_ongoing_requests=max_streams + http_headroom)
    return deployment.bind(engine_factory, limits, cpus_per_replica)


def run(app, host: str = "127.0.0.1", port: int = 8000, name: str = "lrag-engine", blocking: bool = False,
        address: str | None = None) -> str:
    """Starts Serve's HTTP proxy on ``host:port`` and deploys ``app`` at ``/``; returns the
    base URL once every replica is up, or with ``blocking`` serves until interrupted.

    address: the Ray cluster to join when this process is not connected yet ("auto": the
        cluster ``ray start`` runs on this machine; None: that one or the ``RAY_ADDRESS``
        environment variable, else a new local Ray instance)."""
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(app, name=name, route_prefix="/", blocking=blocking)
    return f"http://{host}:{port}"

