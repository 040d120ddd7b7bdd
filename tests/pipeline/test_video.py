"""The mp4 writer (block by block, odd sizes, atomic) and the video / image readers."""
import numpy as np
import pytest
import torch

pytest.importorskip("av")

from lrag_engine.pipeline.video import Mp4Writer, read_image, read_video  # noqa: E402


def _smooth_video(t, h, w, seed=0):
    """uint8 [T, H, W, 3] gradients that move: content a lossy codec keeps close."""
    g = torch.Generator().manual_seed(seed)
    ys = torch.linspace(0, 1, h).view(1, h, 1, 1)
    xs = torch.linspace(0, 1, w).view(1, 1, w, 1)
    ts = torch.arange(t).view(t, 1, 1, 1) / max(t, 1)
    phase = torch.rand(1, 1, 1, 3, generator=g) * 6
    video = 0.5 + 0.4 * torch.sin(2 * ys + 1.5 * xs + 3 * ts + phase)
    return (video * 255).round().to(torch.uint8)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_written_block_by_block_and_read_back(tmp_path):
    video = _smooth_video(21, 32, 48)
    path = tmp_path / "out.mp4"
    with Mp4Writer(path, fps=16) as writer:
        writer.append(video[:9])                  # [T, H, W, 3]
        writer.append(video[None, 9:17])          # [1, T, H, W, 3]
        writer.append(video[17:].numpy())         # numpy
    assert _files(tmp_path) == ["out.mp4"]
    back = read_video(path)
    assert back.shape == video.shape and back.dtype == torch.uint8
    err = (back.float() - video.float()).abs()
    # yuv420p halves the chroma resolution: colour gradients come back a few levels off.
    assert err.mean() < 6 and err.max() < 48, (err.mean().item(), err.max().item())
    import av
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert stream.average_rate == 16


def test_odd_sizes_are_padded_by_edge_repeat(tmp_path):
    video = _smooth_video(5, 17, 23)
    with Mp4Writer(tmp_path / "odd.mp4") as writer:
        writer.append(video)
    assert writer.size == (17, 23) and writer.padded_size == (18, 24)
    back = read_video(tmp_path / "odd.mp4")
    assert back.shape == (5, 18, 24, 3)
    assert (back[:, :17, :23].float() - video.float()).abs().mean() < 8


def test_error_inside_the_block_leaves_no_file(tmp_path):
    path = tmp_path / "out.mp4"
    path.write_bytes(b"previous run")
    with pytest.raises(RuntimeError, match="engine failed"):
        with Mp4Writer(path) as writer:
            writer.append(_smooth_video(5, 16, 16))
            raise RuntimeError("engine failed")
    assert _files(tmp_path) == ["out.mp4"] and path.read_bytes() == b"previous run"


def test_bad_frames_abort_and_refuse(tmp_path):
    path = tmp_path / "out.mp4"
    with pytest.raises(ValueError, match="the video is 16x16"):
        with Mp4Writer(path) as writer:
            writer.append(_smooth_video(2, 16, 16))
            writer.append(_smooth_video(2, 16, 24))
    assert _files(tmp_path) == []
    writer = Mp4Writer(path)
    with pytest.raises(ValueError, match="uint8"):
        writer.append(torch.zeros(1, 16, 16, 3))
    with pytest.raises(ValueError, match="B == 1"):
        writer.append(torch.zeros(2, 1, 16, 16, 3, dtype=torch.uint8))
    with pytest.raises(ValueError, match="no frames"):
        writer.close()
    assert _files(tmp_path) == []


def test_dropped_writer_leaves_no_temporary_file(tmp_path):
    writer = Mp4Writer(tmp_path / "out.mp4")
    writer.append(_smooth_video(3, 16, 16))
    del writer
    assert _files(tmp_path) == []


def test_read_image_and_missing_files(tmp_path):
    from PIL import Image
    image = _smooth_video(1, 12, 20)[0]
    Image.fromarray(image.numpy()).save(tmp_path / "start.png")
    Image.fromarray(np.full((4, 6), 7, dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    assert torch.equal(read_image(tmp_path / "start.png"), image)
    gray = read_image(tmp_path / "gray.png")
    assert gray.shape == (4, 6, 3) and (gray == 7).all()
    (tmp_path / "junk.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError, match="not a readable video"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(ValueError, match="not a readable image"):
        read_image(tmp_path / "junk.mp4")
    with pytest.raises(FileNotFoundError):
        read_video(tmp_path / "missing.mp4")


def test_missing_pyav_names_the_extra(monkeypatch, tmp_path):
    import sys
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match='pip install -e ".\\[pipeline\\]"'):
        Mp4Writer(tmp_path / "out.mp4")
    assert list(tmp_path.iterdir()) == []
