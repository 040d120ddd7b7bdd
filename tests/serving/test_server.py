"""The streaming server, run for real: uvicorn on a free loopback port (in a thread; the
CLI in a subprocess), driven by a real ``websockets`` client and plain HTTP. Streamed
latents are compared with the same requests through a plain Scheduler on a second
engine with the same weights; frames (JPEG, mp4) with that engine's decoded frames."""
from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch

uvicorn = pytest.importorskip("uvicorn", reason='the server needs uvicorn: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='the server needs FastAPI: pip install -e ".[serve]"')
ws_client = pytest.importorskip("websockets.sync.client", reason="the websockets client is not installed")
from websockets.exceptions import ConnectionClosed  # noqa: E402

from lrag_engine.serving.async_engine import AsyncEngine  # noqa: E402
from lrag_engine.serving.scheduler import StreamRequest  # noqa: E402
from lrag_engine.serving.server import create_app  # noqa: E402
from lrag_engine.testing import assert_close  # noqa: E402

from serving_helpers import run_scheduler, wait_until  # noqa: E402

TIMEOUT = 120


@pytest.fixture(scope="module")
def server(engine):
    ae = AsyncEngine(engine, max_streams=4, max_batch=4, queue_blocks=2)
    srv = uvicorn.Server(uvicorn.Config(create_app(ae), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started or not thread.is_alive(), TIMEOUT, "the server to start")
    assert srv.started, "uvicorn did not start"
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield SimpleNamespace(http=f"http://127.0.0.1:{port}", ws=f"ws://127.0.0.1:{port}/v1/stream", ae=ae)
    srv.should_exit = True
    thread.join(TIMEOUT)
    assert not ae.worker_alive   # the app closed the engine on shutdown


def get_json(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def post(url: str, body) -> tuple[int, str, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read()


def pool_pages(server) -> int:
    return (get_json(server.http + "/metrics")[1]["memory"] or {}).get("pages_used", 0)


def receive(ws, blocks: list, others: list, stop=None) -> dict | None:
    """Read messages: blocks (their JSON and binary payloads) into ``blocks``, others into
    ``others``; returns the end message, or None once ``stop(blocks)`` holds."""
    while True:
        message = ws.recv(timeout=TIMEOUT)
        assert isinstance(message, str), "a binary message where a JSON one was due"
        data = json.loads(message)
        if data["type"] == "block":
            count = data["num_images"] if data["format"] == "jpeg" else 1
            payloads = [ws.recv(timeout=TIMEOUT) for _ in range(count)]
            assert all(isinstance(p, bytes) for p in payloads)
            blocks.append((data, payloads))
            if stop is not None and stop(blocks):
                return None
        elif data["type"] == "end":
            return data
        else:
            others.append(data)


def expect_closed(ws, code: int) -> None:
    with pytest.raises(ConnectionClosed):
        ws.recv(timeout=TIMEOUT)
    assert ws.close_code == code


def latents_of(data: dict, payload: bytes) -> torch.Tensor:
    assert data["dtype"] == "float32"
    return torch.from_numpy(np.frombuffer(payload, dtype="<f4").reshape(data["shape"]).copy())


def test_stream_latents_in_order(server, reference_engine):
    request = {"prompt": "a red fox", "num_frames": 8, "seed": 21, "request_id": "ws-latents"}
    blocks, others = [], []
    with ws_client.connect(server.ws) as ws:
        ws.send(json.dumps({**request, "format": "latents"}))
        end = receive(ws, blocks, others)
        expect_closed(ws, 1000)
    assert end == {"type": "end", "request_id": "ws-latents", "status": "finished", "blocks": 8, "error": None}
    assert others == []
    (ref, _), = run_scheduler(reference_engine, [StreamRequest.from_dict(request)])
    assert [d["block"] for d, _ in blocks] == list(range(8))
    assert [d["frames"] for d, _ in blocks] == [[i, i + 1] for i in range(8)]
    assert [d["final"] for d, _ in blocks] == [False] * 7 + [True]
    for (data, (payload,)), expected in zip(blocks, ref, strict=True):
        assert data["request_id"] == "ws-latents" and data["format"] == "latents"
        assert data["log"] == expected.log
        assert_close(latents_of(data, payload), expected.latents, name=f"block {data['block']}")


def test_stream_jpeg(server, reference_engine):
    from PIL import Image

    request = {"num_frames": 3, "seed": 22}
    blocks = []
    with ws_client.connect(server.ws) as ws:
        ws.send(json.dumps({**request, "format": "jpeg", "jpeg_quality": 95}))
        end = receive(ws, blocks, [])
    assert end["status"] == "finished" and end["blocks"] == 3
    (ref, _), = run_scheduler(reference_engine, [StreamRequest(**request, output="frames")])
    assert [d["num_images"] for d, _ in blocks] == [1, 4, 4]          # 4F - 3 frames first, then 4F
    for (data, payloads), expected in zip(blocks, ref, strict=True):
        assert (data["height"], data["width"]) == tuple(expected.frames_rgb.shape[1:3])
        assert all(p[:2] == b"\xff\xd8" for p in payloads)           # JPEG start-of-image
        images = np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in payloads])
        # The reference frames through Pillow's JPEG at the same quality: the same image
        # gives the same JPEG (the random VAE's frames are noise, so JPEG itself is lossy here).
        references = []
        for frame in expected.frames_rgb.numpy():
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=95)
            references.append(np.asarray(Image.open(buffer).convert("RGB")))
        error = np.abs(images.astype(np.float64) - np.stack(references).astype(np.float64))
        assert error.mean() < 0.5, f"block {data['block']}: mean error {error.mean():.2f} levels"


def test_prompt_switch_and_bad_messages_on_the_socket(server, reference_engine):
    """A switch sent after block 1 is acknowledged and applies from one block k > 1 on (the
    stream equals the request with prompt_timeline {k: new}); bad messages during the
    stream get an error naming the problem while the stream goes on to its end."""
    request = {"prompt": "a red fox", "num_frames": 12, "seed": 23}
    new = "the fox jumps into a river"
    blocks, others = [], []
    with ws_client.connect(server.ws) as ws:
        ws.send(json.dumps(request))
        receive(ws, blocks, others, stop=lambda b: len(b) == 2)
        ws.send(json.dumps({"type": "switch", "prompt": new}))
        ws.send(json.dumps({"type": "switch", "prompt": ""}))
        ws.send(json.dumps({"type": "switch", "prompt": "x", "recache": True}))
        ws.send(json.dumps({"type": "pause"}))
        ws.send("{not json")
        end = receive(ws, blocks, others)
        expect_closed(ws, 1000)
    assert end["status"] == "finished" and end["blocks"] == 12
    assert [d["block"] for d, _ in blocks] == list(range(12))
    request_id = blocks[0][0]["request_id"]
    assert others[0] == {"type": "switched", "request_id": request_id, "prompt": new}
    errors = [o["message"] for o in others[1:]]
    assert [o["type"] for o in others[1:]] == ["error"] * 4
    assert "prompt" in errors[0] and "recache" in errors[1] and "'pause'" in errors[2] and "JSON" in errors[3]

    got = [latents_of(d, p) for d, (p,) in blocks]
    (plain, _), = run_scheduler(reference_engine, [StreamRequest.from_dict(request)])
    k = next((i for i, (a, b) in enumerate(zip(got, plain)) if not torch.allclose(a, b.latents, atol=1e-4)), None)
    assert k is not None and k >= 2, f"the switch sent after block 1 applied at block {k}"
    (switched, _), = run_scheduler(reference_engine, [StreamRequest.from_dict({**request,
                                                                               "prompt_timeline": {str(k): new}})])
    for i, (a, b) in enumerate(zip(got, switched, strict=True)):
        assert_close(a, b.latents, name=f"block {i} (switch at {k})")


def test_cancel_on_the_socket(server):
    baseline = pool_pages(server)
    blocks = []
    with ws_client.connect(server.ws) as ws:
        ws.send(json.dumps({"seed": 24}))                               # endless
        receive(ws, blocks, [], stop=lambda b: len(b) == 8)
        assert pool_pages(server) > baseline
        ws.send(json.dumps({"type": "cancel"}))
        end = receive(ws, blocks, [])
        expect_closed(ws, 1000)
    assert end["status"] == "cancelled" and end["blocks"] >= 8
    assert [d["block"] for d, _ in blocks] == list(range(len(blocks)))
    status, metrics = get_json(server.http + "/metrics")
    assert metrics["active_streams"] == 0 and metrics["queues"] == {}
    assert pool_pages(server) == baseline


@pytest.mark.parametrize("first, field, code", [
    pytest.param({"num_frames": 3, "top_kk": 1}, "top_kk", 1008, id="unknown-field"),
    pytest.param({"num_frames": 3, "format": "png"}, "format", 1008, id="format"),
    pytest.param({"num_frames": 3, "top_k": 99}, "top_k", 1008, id="top_k-over-engine"),
    pytest.param({"num_frames": 3, "jpeg_quality": 0, "format": "jpeg"}, "jpeg_quality", 1008, id="quality"),
    pytest.param({"num_frames": 3, "output": "frames"}, "output", 1008, id="output"),
    pytest.param("[1, 2]", "JSON object", 1008, id="not-an-object"),
    pytest.param("{num_frames: 3", "JSON", 1008, id="bad-json"),
])
def test_bad_request(server, first, field, code):
    with ws_client.connect(server.ws) as ws:
        ws.send(first if isinstance(first, str) else json.dumps(first))
        data = json.loads(ws.recv(timeout=TIMEOUT))
        expect_closed(ws, code)
    assert data["type"] == "error" and field in data["message"], data
    assert field in ws.close_reason or len(ws.close_reason.encode()) >= 120
    assert get_json(server.http + "/health") == (200, {"status": "ok"})


def test_client_drop_cancels_the_stream(server):
    baseline = pool_pages(server)
    cancelled = get_json(server.http + "/metrics")[1]["cancelled"]
    with ws_client.connect(server.ws) as ws:
        ws.send(json.dumps({"seed": 25}))
        receive(ws, [], [], stop=lambda b: len(b) == 8)
        assert pool_pages(server) > baseline
        ws.socket.shutdown(socket.SHUT_RDWR)   # gone without a close frame
        ws.socket.close()

    def gone():
        metrics = get_json(server.http + "/metrics")[1]
        return metrics["active_streams"] == 0 and metrics["cancelled"] == cancelled + 1
    wait_until(gone, TIMEOUT, "the dropped client's stream to be cancelled")
    assert pool_pages(server) == baseline


def test_health_and_metrics(server):
    assert get_json(server.http + "/health") == (200, {"status": "ok"})
    status, metrics = get_json(server.http + "/metrics")
    assert status == 200
    for key in ("active_streams", "waiting", "blocks_per_second", "queue_depth", "queues", "paused", "memory",
                "blocks", "finished", "cancelled", "failed", "refused", "worker_alive"):
        assert key in metrics, key
    assert set(metrics["memory_by_tier"]) == {"gpu", "host"}
    assert metrics["memory_by_tier"]["gpu"]["pages_used"] == (metrics["memory"] or {}).get("gpu_pages_used", 0)


def test_generate_mp4(server, reference_engine, tmp_path):
    import av

    from lrag_engine.pipeline.video import Mp4Writer, read_video

    request = {"prompt": "a red fox", "num_frames": 3, "seed": 26}
    status, kind, body = post(server.http + "/v1/generate", {**request, "fps": 8})
    assert status == 200 and kind == "video/mp4", body[:200]
    path = tmp_path / "out.mp4"
    path.write_bytes(body)
    frames = read_video(path)
    (ref, _), = run_scheduler(reference_engine, [StreamRequest(**request, output="frames")])
    expected = torch.cat([b.frames_rgb for b in ref])
    assert frames.shape == expected.shape == (9, 64, 96, 3)
    # The reference frames through the same encoder settings: the same frames give the same
    # video (the random VAE's frames are noise, so H.264 itself is lossy here).
    with Mp4Writer(tmp_path / "reference.mp4", fps=8) as writer:
        writer.append(expected)
    error = (frames.double() - read_video(tmp_path / "reference.mp4").double()).abs().mean().item()
    assert error < 0.5, f"mean error {error:.2f} levels"
    with av.open(str(path)) as container:
        assert container.streams.video[0].average_rate == 8

    for body, status, field in [({"num_frames": 3, "seed": "x"}, 400, "seed"), ({"seed": 1}, 400, "num_frames"),
                                ({"num_frames": 3, "fps": 0}, 400, "fps"), (b"{", 400, "JSON"),
                                ({"num_frames": 3, "top_k": 99}, 400, "top_k")]:
        got, kind, text = post(server.http + "/v1/generate", body)
        message = json.loads(text)["message"]
        assert (got, kind) == (status, "application/json") and field in message, (body, got, message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serve(tmp_path):
    """``lrag-engine serve`` in a subprocess: says its weights are random, answers /health
    and a stream, and stops cleanly on SIGINT."""
    port = _free_port()
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "lrag_engine.cli", "serve", "--port", str(port),
                                 "--window", "6", "--top-k", "2", "--recency-guard", "1", "--frames-per-block", "1",
                                 "--log-level", "warning"], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        def up():
            assert proc.poll() is None, log.read_text()
            try:
                return get_json(f"http://127.0.0.1:{port}/health") == (200, {"status": "ok"})
            except OSError:
                return False
        wait_until(up, TIMEOUT, "lrag-engine serve to answer /health")
        blocks = []
        with ws_client.connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
            ws.send(json.dumps({"prompt": "a red fox", "num_frames": 2, "format": "jpeg"}))
            end = receive(ws, blocks, [])
        assert end["status"] == "finished" and [d["num_images"] for d, _ in blocks] == [1, 4]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = log.read_text()
    assert proc.returncode == 0, text
    assert "random" in text and f"ws://127.0.0.1:{port}/v1/stream" in text
