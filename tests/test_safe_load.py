"""No file the package reads can run pickled code, and every unreadable file gives an error naming it.

Each entry point gets a file whose unpickling would create a marker file (checked to really
do so with ``torch.load(weights_only=False)``, so no test passes vacuously); the package must
refuse it with a message naming the file, and the marker must not appear.
"""
import json
import os
import pathlib
import pickle
import re
import zipfile

import pytest
import torch
from safetensors.torch import save_file

from lrag_engine import Engine, ModelConfig
from lrag_engine.cli import read_text_embedding
from lrag_engine.encoder.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from lrag_engine.encoder.collect import load_text_embeddings
from lrag_engine.encoder.corpus import CorpusError, CorpusWriter, LatentCorpus
from lrag_engine.encoder.model import EncoderConfig, RetrievalEncoder
from lrag_engine.encoder.train import TrainConfig, train_encoder
from lrag_engine.models.checkpoint import read_state_dict, save_checkpoint as save_wan
from lrag_engine.safe_load import TensorFileError, load_tensor_file, read_safetensors_shapes

TINY = ModelConfig.preset("tiny")
REFUSED = "holds objects other than tensors and plain containers .* was refused for safety"


class Payload:
    """Unpickling this object runs ``Path(marker).touch()``: the marker appears when pickled code runs."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def _write_malicious(path: pathlib.Path, marker: pathlib.Path, fmt: str, wrap=lambda p: {"model": p}) -> None:
    """A file holding ``wrap(Payload)``; fmt "zip" / "legacy" (torch.save) or "pickle" (pickle protocol 2)."""
    obj = wrap(Payload(marker))
    staging = path.with_name(path.name + ".staging.pt")   # torch.load reads *.safetensors as safetensors
    if fmt == "pickle":
        staging.write_bytes(pickle.dumps(obj, protocol=2))
    else:
        torch.save(obj, staging, _use_new_zipfile_serialization=fmt == "zip")
    # Control: the payload really runs when the file is unpickled without restrictions.
    try:
        torch.load(staging, weights_only=False)
    except Exception:  # a raw pickle is not a torch file: torch fails after running the payload
        pass
    assert marker.exists(), "control failed: the payload did not run with weights_only=False"
    marker.unlink()
    os.replace(staging, path)


def _random_bytes(seed: int, n: int = 333) -> bytes:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).numpy().tobytes()


def _name(path) -> str:
    return re.escape(repr(str(path)))


# ------------------------------------------------------------------ the loader itself
def _good_zip(path):
    torch.save({"a": torch.randn(64)}, path)
    return path


def _make_bad(kind: str, tmp_path: pathlib.Path, seed: int) -> tuple[pathlib.Path, str]:
    """(bad file, regex its error must match besides the file name)."""
    if kind == "directory":
        path = tmp_path / "weights.pt"
        path.mkdir()
        return path, "is a directory"
    if kind == "empty":
        path = tmp_path / "weights.pt"
        path.write_bytes(b"")
        return path, r"is empty \(0 bytes\)"
    if kind == "random":
        path = tmp_path / "weights.pt"
        path.write_bytes(_random_bytes(seed))
        return path, "not a readable torch file"
    if kind == "truncated-zip":
        data = _good_zip(tmp_path / "good.pt").read_bytes()
        path = tmp_path / "weights.pt"
        path.write_bytes(data[:len(data) // 2])
        return path, "truncated or corrupt torch zip archive"
    if kind == "truncated-legacy":
        torch.save({"a": torch.randn(64)}, tmp_path / "good.pt", _use_new_zipfile_serialization=False)
        data = (tmp_path / "good.pt").read_bytes()
        path = tmp_path / "weights.pt"
        path.write_bytes(data[:len(data) // 2])
        return path, "truncated"
    if kind == "refused":
        path = tmp_path / "weights.pt"
        _write_malicious(path, tmp_path / "marker", "zip")
        return path, REFUSED
    if kind == "safetensors-random":
        path = tmp_path / "weights.safetensors"
        path.write_bytes(_random_bytes(seed))
        return path, "not a readable safetensors file"
    if kind == "safetensors-empty":
        path = tmp_path / "weights.safetensors"
        path.write_bytes(b"")
        return path, r"is empty \(0 bytes\)"
    if kind == "safetensors-truncated":
        save_file({"a": torch.randn(64)}, str(tmp_path / "good.safetensors"))
        data = (tmp_path / "good.safetensors").read_bytes()
        path = tmp_path / "weights.safetensors"
        path.write_bytes(data[:-40])
        return path, "not a readable safetensors file"
    if kind == "safetensors-holding-a-pickle":
        path = tmp_path / "weights.safetensors"
        _write_malicious(path, tmp_path / "marker", "zip")
        return path, "not a readable safetensors file"
    raise AssertionError(kind)


BAD_KINDS = ["directory", "empty", "random", "truncated-zip", "truncated-legacy", "refused", "safetensors-random",
             "safetensors-empty", "safetensors-truncated", "safetensors-holding-a-pickle"]


@pytest.mark.parametrize("kind", BAD_KINDS)
@pytest.mark.parametrize("mmap", [False, True], ids=["read", "mmap"])
def test_every_failure_is_a_value_error_naming_the_file(tmp_path, kind, mmap):
    path, problem = _make_bad(kind, tmp_path, seed=len(kind))
    with pytest.raises(TensorFileError, match=_name(path) + ".*" + problem):
        load_tensor_file(path, "test file", mmap=mmap)
    assert issubclass(TensorFileError, ValueError)
    assert not (tmp_path / "marker").exists()


def test_missing_file_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_tensor_file(tmp_path / "nope.pt")


@pytest.mark.parametrize("kind", ["safetensors-random", "safetensors-empty", "safetensors-truncated", "directory"])
def test_safetensors_header_errors_name_the_file(tmp_path, kind):
    path, _ = _make_bad(kind, tmp_path, seed=7)
    with pytest.raises(TensorFileError, match=_name(path)):
        read_safetensors_shapes(path)


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_refused_pickle_in_every_torch_format(tmp_path, fmt):
    path = tmp_path / "evil.pt"
    _write_malicious(path, tmp_path / "marker", fmt)
    with pytest.raises(TensorFileError, match=_name(path) + ".*" + REFUSED):
        load_tensor_file(path)
    assert not (tmp_path / "marker").exists()


def test_plain_data_round_trips(tmp_path):
    gen = torch.Generator().manual_seed(3)
    value = {"t": torch.randn(3, 5, generator=gen), "l": [1, 2.5, "x", None], "tup": (True, 7),
             "nested": {"opt": {"state": {0: {"exp_avg": torch.randn(4, generator=gen)}}}}}
    torch.save(value, tmp_path / "plain.pt")
    for mmap in (False, True):
        got = load_tensor_file(tmp_path / "plain.pt", mmap=mmap)
        assert torch.equal(got["t"], value["t"]) and got["l"] == value["l"] and got["tup"] == value["tup"]
        assert torch.equal(got["nested"]["opt"]["state"][0]["exp_avg"], value["nested"]["opt"]["state"][0]["exp_avg"])
    assert zipfile.is_zipfile(tmp_path / "plain.pt")


# --------------------------------------------------------- every entry point of the package
def _wan_checkpoint(path):
    save_wan(Engine(TINY).model, path)
    return path


SMALL_ENCODER = EncoderConfig(in_channels=4, spatial_h=8, spatial_w=8, latent_dim=8, hidden_dims=(8,), seq_len=4)


def _resume(tmp_path, path):
    latents = torch.randn(2, 8, 4, 8, 8)
    train_encoder(SMALL_ENCODER, TrainConfig(steps=1, batch_size=1, val_fraction=0.0), latents, tmp_path / "run",
                  resume=path, progress=False)


def _corpus_shard(tmp_path, path):
    """A corpus whose manifest lists ``path`` (a file in the corpus directory) as shard 0."""
    root = path.parent
    CorpusWriter(root, (2, 3, 4), 5, {"source": "test"})
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"] = [{"index": 0, "file": path.name, "videos": 1}]
    (root / "manifest.json").write_text(json.dumps(manifest))
    LatentCorpus(root)


ENTRY_POINTS = {
    # name: (call(tmp_path, bad_file), file name, payload wrapping, error type)
    "engine-checkpoint": (lambda tmp, p: Engine(TINY, checkpoint=p), "model.pt",
                          lambda x: {"generator": {"blocks.0.ffn.0.weight": x}}, ValueError),
    "engine-lora": (lambda tmp, p: Engine(TINY, checkpoint=_wan_checkpoint(tmp / "ok.pt"), lora=p), "lora.pt",
                    lambda x: {"generator_lora": {"blocks.0.ffn.0.lora_A.weight": x}}, ValueError),
    "engine-encoder": (lambda tmp, p: Engine(TINY, encoder=p), "encoder.pt",
                       lambda x: {"config": {}, "model": {"w": x}}, CheckpointError),
    "load-checkpoint": (lambda tmp, p: load_checkpoint(p), "encoder.pt",
                        lambda x: {"config": x, "model": {}}, CheckpointError),
    "train-resume": (_resume, "last.pt", lambda x: {"config": {}, "model": {}, "optimizer": x, "step": 1},
                     CheckpointError),
    "cli-text-embedding": (lambda tmp, p: read_text_embedding(p), "text.pt", lambda x: x, ValueError),
    "collect-text-embeddings": (lambda tmp, p: load_text_embeddings(p), "text.pt", lambda x: [x], ValueError),
    "collect-text-embedding-dir": (lambda tmp, p: load_text_embeddings(p.parent), "b.pt", lambda x: [x], ValueError),
}


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_malicious_file_runs_nothing_at_any_entry_point(tmp_path, entry, fmt):
    call, name, wrap, error = ENTRY_POINTS[entry]
    folder = tmp_path / "files"
    folder.mkdir()
    path = folder / name
    marker = tmp_path / "marker"
    _write_malicious(path, marker, fmt, wrap)
    with pytest.raises(error) as info:
        call(tmp_path, path)
    assert not marker.exists(), f"{entry}: the pickled payload ran"
    assert re.search(_name(path) + ".*" + REFUSED, str(info.value)), str(info.value)


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
@pytest.mark.parametrize("kind", ["random", "empty", "truncated-zip"])
def test_unreadable_file_is_named_at_any_entry_point(tmp_path, entry, kind):
    call, name, _, error = ENTRY_POINTS[entry]
    bad, problem = _make_bad(kind, tmp_path, seed=len(entry))
    folder = tmp_path / "files"
    folder.mkdir()
    path = folder / name
    os.replace(bad, path)
    with pytest.raises(error, match=_name(path) + ".*" + problem):
        call(tmp_path, path)


@pytest.mark.parametrize("kind", ["safetensors-random", "safetensors-empty", "safetensors-holding-a-pickle"])
def test_bad_safetensors_model_and_text_files_are_named(tmp_path, kind):
    path, problem = _make_bad(kind, tmp_path, seed=11)
    for call in (lambda: Engine(TINY, checkpoint=path), lambda: read_text_embedding(path),
                 lambda: read_state_dict(path)):
        with pytest.raises(ValueError, match=_name(path) + ".*" + problem):
            call()
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize("fmt", ["zip", "legacy", "pickle"])
def test_malicious_corpus_shard_runs_nothing(tmp_path, fmt):
    marker = tmp_path / "marker"
    root = tmp_path / "corpus"
    root.mkdir()
    shard = root / "shard_00000.safetensors"
    _write_malicious(shard, marker, fmt, wrap=lambda x: {"latents": x})
    with pytest.raises(CorpusError, match=_name(shard) + ".*not a readable safetensors file"):
        _corpus_shard(tmp_path, shard)
    renamed = root / "shard_00000.pt"
    _write_malicious(renamed, marker, fmt, wrap=lambda x: {"latents": x})
    with pytest.raises(CorpusError, match=_name(renamed) + ".*not a .safetensors file"):
        _corpus_shard(tmp_path, renamed)
    assert not marker.exists()


def test_training_resume_file_is_plain_data(tmp_path):
    """Everything train_encoder writes (optimizer, rng states, history, train_config) loads with weights_only."""
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 8, 4, 8, 8, generator=gen)
    train_encoder(SMALL_ENCODER, TrainConfig(steps=2, batch_size=1, val_fraction=0.5, val_every=1), latents,
                  tmp_path, progress=False)
    state = torch.load(tmp_path / "last.pt", weights_only=True)
    assert {"config", "model", "optimizer", "step", "rng", "train_config", "history"} <= set(state)
    assert state["step"] == 2 and state["train_config"]["steps"] == 2
    resumed = train_encoder(SMALL_ENCODER, TrainConfig(steps=3, batch_size=1, val_fraction=0.5, val_every=1),
                            latents, tmp_path, resume=tmp_path / "last.pt", progress=False)
    assert [r["step"] for r in resumed.history["train"]] == [1, 2, 3]
    save_checkpoint(tmp_path / "enc.pt", RetrievalEncoder(SMALL_ENCODER))
    assert load_checkpoint(tmp_path / "enc.pt").config == SMALL_ENCODER

