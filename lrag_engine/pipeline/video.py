"""Frames to and from files: an mp4 writer fed block by block, video and image readers.

    with Mp4Writer("out.mp4", fps=16) as writer:
        for block in blocks:
            writer.append(decoder.decode_block(block))   # uint8 [T, H, W, 3] or [1, T, H, W, 3]
    frames = read_video("start.mp4")                       # uint8 [T, H, W, 3]
    image = read_image("start.png")                        # uint8 [H, W, 3]

The writer encodes H.264 in yuv420p (what players expect) through PyAV, an optional
dependency imported on first use. yuv420p needs an even width and height: an odd size
is padded by repeating the last row / column (``Mp4Writer.padded_size`` says so).
The file appears whole or not at all: frames go to a hidden temporary file beside
``path`` that replaces ``path`` on a successful ``close()``; an error inside the ``with``
block, ``abort()``, or a writer dropped without closing removes it.
"""
from __future__ import annotations

import os
import tempfile
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

_INSTALL_HINT = 'writing and reading mp4 needs PyAV: pip install -e ".[pipeline]"'
CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
# x264's constant-quality setting; 18 is visually lossless for most content.
DEFAULT_CRF = 18


def _av():
    try:
        import av
    except ImportError as exc:
        raise ImportError(f"{_INSTALL_HINT} ({exc})") from None
    return av


def _as_frames(frames) -> np.ndarray:
    """uint8 [T, H, W, 3] or [1, T, H, W, 3] (tensor or array) -> numpy [T, H, W, 3]."""
    if isinstance(frames, torch.Tensor):
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        frames = frames.detach().cpu().numpy()
    frames = np.asarray(frames)
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise ValueError(f"an mp4 holds one video: frames [B, T, H, W, 3] need B == 1, got B = {frames.shape[0]}")
        frames = frames[0]
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] or [1, T, H, W, 3], got {tuple(frames.shape)}")
    return frames


class Mp4Writer:
    """Appends uint8 RGB frames to an H.264 mp4 at ``path`` (see the module docstring).

    fps: frames per second (Wan 2.1 generates 16). crf: x264 quality, 0 (lossless) to 51.
    """

    def __init__(self, path: str | os.PathLike, fps: int = 16, crf: int = DEFAULT_CRF) -> None:
        if fps <= 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 0 <= crf <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self.path = Path(path)
        self.fps, self.crf = fps, crf
        self.frames_written = 0
        self.size: tuple[int, int] | None = None          # (H, W) of the appended frames
        self.padded_size: tuple[int, int] | None = None   # (H, W) in the file
        self._av = _av()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".partial")
        os.close(handle)
        self._tmp = Path(tmp)
        self._container = self._av.open(str(self._tmp), mode="w", format="mp4")
        self._stream = None

    def _open_stream(self, height: int, width: int) -> None:
        self.size = (height, width)
        self.padded_size = (height + height % 2, width + width % 2)
        stream = self._container.add_stream(CODEC, rate=Fraction(self.fps))
        stream.height, stream.width = self.padded_size
        stream.pix_fmt = PIXEL_FORMAT
        stream.options = {"crf": str(self.crf)}
        self._stream = stream

    def append(self, frames) -> None:
        """Add frames, uint8 [T, H, W, 3] or [1, T, H, W, 3], of the same size as the first."""
        if self._container is None:
            raise ValueError(f"Mp4Writer for {str(self.path)!r} is closed")
        frames = _as_frames(frames)
        height, width = frames.shape[1:3]
        if self._stream is None:
            self._open_stream(height, width)
        elif (height, width) != self.size:
            raise ValueError(f"frames are {height}x{width}, the video is {self.size[0]}x{self.size[1]}")
        pad_h, pad_w = self.padded_size[0] - height, self.padded_size[1] - width
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for image in frames:
            frame = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            self._container.mux(self._stream.encode(frame))
        self.frames_written += len(frames)

    def close(self) -> Path:
        """Flush the encoder and put the finished file at ``path``; returns ``path``."""
        if self._container is None:
            return self.path
        if self._stream is None:
            self.abort()
            raise ValueError(f"no frames were appended: {str(self.path)!r} not written")
        try:
            self._container.mux(self._stream.encode(None))
            self._container.close()
        except BaseException:
            self.abort()
            raise
        self._container = None
        # mkstemp made the file private (0600); a finished video gets the usual mode
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self._tmp, 0o666 & ~umask)
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        """Drop what was written; ``path`` is left as it was."""
        container, self._container = self._container, None
        if container is not None:
            try:
                container.close()
            except Exception:  # a broken encoder state; the file goes away anyway
                pass
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_container", None) is not None:
            self.abort()


def read_video(path: str | os.PathLike) -> torch.Tensor:
    """All frames of the first video stream of ``path`` as uint8 RGB [T, H, W, 3]."""
    av = _av()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"video {path!r} does not exist")
    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise ValueError(f"{path!r} has no video stream")
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    except av.FFmpegError as exc:
        raise ValueError(f"{path!r} is not a readable video: {exc}") from None
    if not frames:
        raise ValueError(f"video {path!r} has no frames")
    return torch.from_numpy(np.stack(frames))


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """An image file (PNG, JPEG, ...) as uint8 RGB [H, W, 3]."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise ImportError(f'reading images needs Pillow: pip install -e ".[pipeline]" ({exc})') from None
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path!r} does not exist")
    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("RGB"))
    except UnidentifiedImageError:
        raise ValueError(f"{path!r} is not a readable image") from None
    return torch.from_numpy(array.copy())
