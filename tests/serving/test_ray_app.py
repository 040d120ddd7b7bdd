"""Ray Serve with two local replicas (one process each) on the CPU: streams spread over both,
each stream's blocks equal the same request run alone through a plain Scheduler in this
process, prompt switches and cancels reach the replica that holds the stream, and every
replica's pages are back when its streams are gone."""
from __future__ import annotations

import asyncio
import json
import os
import socket
import time
import urllib.request

import pytest
import torch

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install -e '.[ray]')")
serve = pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install -e '.[ray]')")
websockets_client = pytest.importorskip("websockets.asyncio.client", reason="the websockets client is not installed")

from lrag_engine.config import MemoryConfig, RuntimeConfig  # noqa: E402
from lrag_engine.serving import Scheduler, StreamBlock, StreamRequest  # noqa: E402
from lrag_engine.serving.ray_app import (REPLICA_HEADER, REPLICA_PID_HEADER, EngineSpec,  # noqa: E402
                                         build_app, run)
from lrag_engine.testing import assert_close  # noqa: E402

MEMORY = MemoryConfig(top_k=2, window=6, recency_guard=1, frames_per_block=1, max_history_frames=8)
SPEC = EngineSpec(preset="tiny", memory=MEMORY, runtime=RuntimeConfig(device="cpu", dtype="float32"), seed=3)
APP_NAME = "lrag-engine-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    """One Ray instance and one Serve app (two replicas) for the whole module."""
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        port = _free_port()
        # max_streams 6: one replica could admit all six streams, so a stream the test holds
        # open never keeps another from starting, wherever Serve routes it.
        url = run(build_app(SPEC, replicas=2, cpus_per_replica=1, max_streams=6, max_batch=4, queue_blocks=1,
                            name=APP_NAME), port=port, name=APP_NAME)
        yield url
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def solo_engine():
    return SPEC()   # same seed: the replicas' weights, text encoder and noise rule


def solo_blocks(engine, request: dict, blocks: int) -> list[torch.Tensor]:
    """The first ``blocks`` latents [F, C, H, W] of ``request`` run alone on a plain Scheduler."""
    scheduler = Scheduler(engine, max_streams=1, max_batch=1)
    try:
        request_id = scheduler.submit(StreamRequest.from_dict(dict(request)))
        out = []
        while len(out) < blocks and scheduler.has_work():
            out += [item.latents for item in scheduler.step() if isinstance(item, StreamBlock)]
        scheduler.cancel(request_id)
        return out[:blocks]
    finally:
        scheduler.close()


class Client:
    """One stream over one socket: its replica, the blocks it received, the acks and the end."""

    def __init__(self, url: str, request: dict) -> None:
        self.url = url.replace("http://", "ws://") + "/v1/stream"
        self.request = request
        self.replica = self.pid = None
        self.blocks: list[tuple[int, torch.Tensor]] = []
        self.messages: list[dict] = []
        self.end: dict | None = None
        self.switched_after: int | None = None
        self.first_block = asyncio.Event()

    async def run(self, go: asyncio.Event, switch_after=None, cancel_after=None, drop_after=None) -> "Client":
        async with websockets_client.connect(self.url, max_size=None) as ws:
            self.replica = ws.response.headers[REPLICA_HEADER]
            self.pid = int(ws.response.headers[REPLICA_PID_HEADER])
            await ws.send(json.dumps(self.request))
            while True:
                message = json.loads(await ws.recv())
                self.messages.append(message)
                if message["type"] == "end":
                    self.end = message
                    return self
                if message["type"] != "block":
                    continue
                assert message["request_id"] == self.request["request_id"]
                data = await ws.recv()
                latents = torch.frombuffer(bytearray(data), dtype=torch.float32).reshape(message["shape"])
                self.blocks.append((message["block"], latents))
                count = len(self.blocks)
                if count == 1:
                    self.first_block.set()
                    await go.wait()   # hold the stream open until every stream has a replica
                if count == switch_after:
                    self.switched_after = count
                    await ws.send(json.dumps({"type": "switch", "prompt": "a lighthouse in a storm"}))
                if count == cancel_after:
                    await ws.send(json.dumps({"type": "cancel"}))
                if count == drop_after:
                    return self   # leaves the socket without a cancel


async def _drive(url: str) -> dict[str, Client]:
    base = dict(format="latents")
    plan = [   # (name, request, actions); the two endless streams open first and hold their replicas
        ("endless-cancel", dict(base, request_id="endless-cancel", seed=11, prompt="a fox in snow"),
         dict(cancel_after=5)),
        ("endless-drop", dict(base, request_id="endless-drop", seed=12, prompt="waves on rocks"),
         dict(drop_after=3)),
        ("timeline", dict(base, request_id="timeline", seed=13, num_frames=9, prompt="a night market",
                          prompt_timeline={"4": "a balloon over hills"}), {}),
        ("live-switch", dict(base, request_id="live-switch", seed=14, num_frames=10, prompt="rain on a window"),
         dict(switch_after=3)),
        ("top-k-1", dict(base, request_id="top-k-1", seed=15, num_frames=8, prompt="a paper boat", top_k=1), {}),
        ("plain", dict(base, request_id="plain", seed=16, num_frames=7), {}),
    ]
    go = asyncio.Event()
    clients, tasks = {}, []
    for name, request, actions in plan:
        client = Client(url, request)
        clients[name] = client
        tasks.append(asyncio.create_task(client.run(go, **actions)))
        await asyncio.wait_for(client.first_block.wait(), 60)   # it holds a place on its replica now
    go.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 120)
    return clients


def _metrics_by_replica(url: str, replicas: set[str], timeout: float = 60.0) -> dict[str, dict]:
    """GET /metrics until each replica answered with no stream left (or the timeout)."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            seen[response.headers[REPLICA_HEADER]] = json.loads(response.read())
        if set(seen) >= replicas and all(m["active_streams"] == 0 and m["waiting"] == 0 and
                                         m["memory_by_tier"]["gpu"]["pages_used"] == 0 for m in seen.values()):
            break
        time.sleep(0.05)
    return seen


def test_streams_spread_over_two_replicas_and_equal_solo_runs(cluster, solo_engine):
    clients = asyncio.run(_drive(cluster))

    replicas = {c.replica for c in clients.values()}
    pids = {c.pid for c in clients.values()}
    assert len(replicas) == 2 and len(pids) == 2 and os.getpid() not in pids

    for name, client in clients.items():
        request = {k: v for k, v in client.request.items() if k != "format"}
        indices = [b for b, _ in client.blocks]
        assert indices == list(range(len(indices))), name
        if name == "live-switch":
            # The switch applies at a block boundary after the blocks the client had: the
            # stream equals the solo run switched before some block k > switched_after.
            got = [latents for _, latents in client.blocks]
            assert client.end["status"] == "finished" and len(got) == 10
            assert any(m["type"] == "switched" and m["request_id"] == "live-switch" for m in client.messages)
            errors = {}
            for k in range(client.switched_after, 10):
                switched = solo_blocks(solo_engine, dict(request, prompt_timeline={k: "a lighthouse in a storm"}), 10)
                errors[k] = [round((a - b).abs().max().item(), 7) for a, b in zip(got, switched)]
            matches = [k for k, errs in errors.items() if max(errs) <= 1e-5]
            assert matches, f"no solo run switched at a block boundary matches the stream: errors by block {errors}"
            plain = solo_blocks(solo_engine, request, 10)
            assert not all(torch.allclose(a, b, atol=1e-5, rtol=1e-5) for a, b in zip(got, plain)), \
                "the switch did not reach the stream"
            continue
        expected = solo_blocks(solo_engine, request, len(client.blocks))
        assert len(expected) == len(client.blocks)
        for (block, got), want in zip(client.blocks, expected):
            assert_close(got, want, name=f"{name} block {block}")
        if name == "endless-cancel":
            assert client.end["status"] == "cancelled" and client.end["blocks"] >= 5
            assert client.end["blocks"] == len(client.blocks)
        elif name == "endless-drop":
            assert client.end is None and len(client.blocks) == 3
        else:
            assert client.end["status"] == "finished" and client.end["blocks"] == request["num_frames"]
            assert [m["final"] for m in client.messages if m["type"] == "block"][-1] is True

    # Every replica answered with no stream running and no history page held: the cancel,
    # the dropped socket and the finished streams all freed their pages where they lived.
    metrics = _metrics_by_replica(cluster, replicas)
    assert set(metrics) == replicas
    for replica, m in metrics.items():
        assert m["active_streams"] == 0 and m["waiting"] == 0, (replica, m)
        assert m["memory_by_tier"]["gpu"]["pages_used"] == 0, (replica, m["memory_by_tier"])
    assert sum(m["blocks_delivered"] for m in metrics.values()) >= sum(len(c.blocks) for c in clients.values())


def test_build_app_refuses_bad_arguments():
    with pytest.raises(ValueError, match="replicas"):
        build_app(SPEC, replicas=0)
    with pytest.raises(ValueError, match="gpus_per_replica"):
        build_app(SPEC, gpus_per_replica=-1)
    with pytest.raises(TypeError, match="engine_factory"):
        build_app("tiny")
    assert EngineSpec(runtime=RuntimeConfig(device="cpu")).device_type == "cpu"


def test_cli_serve_replicas_builds_the_ray_app(monkeypatch, capsys):
    """`lrag-engine serve --replicas N` hands Ray Serve an EngineSpec built from the same
    options as the one-process server (run is replaced: no cluster starts here)."""
    from lrag_engine import cli
    from lrag_engine.serving import ray_app

    seen = {}
    monkeypatch.setattr(ray_app, "build_app", lambda spec, **kw: seen.update(spec=spec, **kw) or "app")
    monkeypatch.setattr(ray_app, "run", lambda app, **kw: seen.update(app=app, run=kw))
    assert cli.main(["serve", "--replicas", "2", "--port", "8123", "--top-k", "2", "--window", "6",
                     "--recency-guard", "1", "--frames-per-block", "1", "--max-history-frames", "8",
                     "--max-batch", "3", "--device", "cpu", "--seed", "4"]) == 0
    spec = seen["spec"]
    assert seen["replicas"] == 2 and seen["max_batch"] == 3 and seen["app"] == "app"
    assert seen["run"] == {"host": "127.0.0.1", "port": 8123, "address": None, "blocking": True}
    assert spec.memory.top_k == 2 and spec.memory.max_history_frames == 8 and spec.seed == 4
    assert spec.random_pipeline and spec.model_dir is None and spec.runtime.device == "cpu"
    engine = spec()                  # what each replica builds
    assert engine.memory.window == 6 and engine.text_encoder is not None
    assert "2 Ray Serve replica(s)" in capsys.readouterr().out
    assert cli.main(["serve", "--replicas", "1", "--port", "0"]) == 2
    assert "--port 0" in capsys.readouterr().err
