"""Reading tensor files without running code from them: the one loader of the package.

Every file the package reads (model and LoRA checkpoints, encoder checkpoints and
training-resume files, text embeddings, corpus shards) goes through
:func:`load_tensor_file`. ``.safetensors`` files hold only tensors; everything else is
read with ``torch.load(weights_only=True)``, which rebuilds tensors and plain containers
(dict, list, tuple, str, numbers, None) and refuses any other pickled object, since
unpickling one can run arbitrary code (a ``__reduce__`` payload).

Every failure (a directory, an empty file, random bytes, a truncated archive, a refused
pickle, a broken safetensors header) raises :class:`TensorFileError` (a ValueError) whose
message names the file and says what is wrong; a missing file raises FileNotFoundError.
"""
from __future__ import annotations

import os
import pickle
import re

import torch

# torch names the refused object in these phrases of its weights-only unpickler errors.
_REFUSED_PATTERNS = (
    re.compile(r"GLOBAL (\S+) was not an allowed global"),
    re.compile(r"unsupported GLOBAL (\S+) whose module"),
    re.compile(r"(Can only create new object for nn\.Parameter.*)"),
    re.compile(r"(Can only build Tensor, Parameter, OrderedDict.*)"),
    re.compile(r"(Trying to call reduce for unrecognized function.*)"),
)
_MMAP_UNSUPPORTED = "mmap can only be used with files saved with"
_ZIP_MAGIC = b"PK\x03\x04"


class TensorFileError(ValueError):
    """A file that cannot be read safely; the message names the file and the problem."""


def _check_path(path: str, what: str, error: type[ValueError]) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if os.path.isdir(path):
        raise error(f"{what} {path!r} is a directory, not a file")
    if os.path.getsize(path) == 0:
        raise error(f"{what} {path!r} is empty (0 bytes)")


def _refused_object(message: str) -> str | None:
    """What torch's weights-only unpickler refused, or None when the data is simply not a pickle."""
    for pattern in _REFUSED_PATTERNS:
        match = pattern.search(message)
        if match:
            return match.group(1).split(". Please use")[0]
    return None


def _is_zip(path: str) -> bool:
    with open(path, "rb") as handle:
        return handle.read(4) == _ZIP_MAGIC


def _load_error(path: str, what: str, exc: Exception, error: type[ValueError]) -> ValueError:
    message = str(exc)
    refused = _refused_object(message) if isinstance(exc, pickle.UnpicklingError) else None
    if refused is not None:
        return error(f"{what} {path!r} holds objects other than tensors and plain containers (dict, list, "
                     f"tuple, str, numbers) and was refused for safety: unpickling it could run code from "
                     f"the file (refused object: {refused})")
    detail = message.rsplit("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].strip()
    # torch appends advice paragraphs; the first sentence says what failed.
    detail = f"{type(exc).__name__}: {detail.splitlines()[0].split('. ')[0]}" if detail else type(exc).__name__
    if _is_zip(path):
        return error(f"{what} {path!r} is a truncated or corrupt torch zip archive ({detail})")
    return error(f"{what} {path!r} is not a readable torch file: corrupt, truncated, or not written by "
                 f"torch.save ({detail})")


def _torch_load(path: str, what: str, mmap: bool, error: type[ValueError]):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except RuntimeError as exc:
        if mmap and _MMAP_UNSUPPORTED in str(exc):
            # Legacy (non-zip) torch.save files cannot be memory-mapped.
            return _torch_load(path, what, False, error)
        raise _load_error(path, what, exc, error) from None
    except Exception as exc:  # torch raises many types for corrupt files
        raise _load_error(path, what, exc, error) from None


def _safetensors_load(path: str, what: str, error: type[ValueError]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    try:
        return load_file(path, device="cpu")
    except Exception as exc:  # SafetensorError, OSError, ValueError
        raise error(f"{what} {path!r} is not a readable safetensors file: {exc}") from None


def load_tensor_file(path: str | os.PathLike, what: str = "file", mmap: bool = False,
                     error: type[ValueError] = TensorFileError):
    """The content of a ``.safetensors`` file (a dict of CPU tensors) or of a ``torch.save``
    file (tensors in plain containers), read without executing pickled code.

    what: how messages name the file ("encoder checkpoint", "text embedding file", ...).
    mmap: memory-map a zip-format torch file, so its tensors are read only when used
        (legacy torch files fall back to a normal read).
    error: the ValueError subclass raised for unreadable files (default TensorFileError).
    """
    path = os.fspath(path)
    _check_path(path, what, error)
    if path.lower().endswith(".safetensors"):
        return _safetensors_load(path, what, error)
    return _torch_load(path, what, mmap, error)


def read_safetensors_shapes(path: str | os.PathLike, what: str = "file",
                            error: type[ValueError] = TensorFileError) -> dict[str, torch.Size]:
    """Tensor name -> shape of a ``.safetensors`` file, from its header alone (no data is read)."""
    from safetensors import safe_open
    path = os.fspath(path)
    _check_path(path, what, error)
    try:
        with safe_open(path, framework="pt") as handle:
            return {name: torch.Size(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except Exception as exc:  # SafetensorError, OSError, ValueError
        raise error(f"{what} {path!r} is not a readable safetensors file: {exc}") from None
