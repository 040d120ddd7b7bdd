"""Training loop of the retrieval encoder: reconstruction + Window Temporal Delta + smoothing.

Outputs under ``out_dir``:
    last.pt           training state: public ``{"config", "model"}`` plus optimizer,
                      step, rng, train_config and loss history (resumable; loads as an encoder).
                      All of it is tensors and plain containers, so it reads back with
                      ``torch.load(weights_only=True)``.
    encoder.pt        public-format checkpoint of the final weights
    history.json      per-step train losses and per-validation losses
    loss_curves.png   those curves, titled by run and by whether the delta loss is weighted
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from .checkpoint import CheckpointError, load_state_into, read_checkpoint, save_checkpoint
from .corpus import LatentCorpus
from .losses import encoder_loss
from .model import EncoderConfig, RetrievalEncoder

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


@dataclass
class TrainConfig:
    """Optimisation settings.

    chunk_stride: frames between the starts of consecutive training chunks.
    val_fraction: share of videos held out (of frames, when the corpus has one video).
    val_max_chunks: validation chunks evaluated (non-overlapping, fixed order).
    amp: bf16 autocast on CUDA; the CPU always runs float32.
    """

    steps: int = 2000
    batch_size: int = 8
    lr: float = 3e-4
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    chunk_stride: int = 1
    val_fraction: float = 0.1
    val_every: int = 100
    val_max_chunks: int = 64
    checkpoint_every: int = 200
    seed: int = 0
    device: str = "cpu"
    amp: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "chunk_stride", "val_every", "val_max_chunks", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("lr", "grad_clip"):
            if not isinstance(getattr(self, name), (int, float)) or not getattr(self, name) > 0:
                raise ValueError(f"TrainConfig.{name} must be > 0, got {getattr(self, name)!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay!r}")
        if not isinstance(self.val_fraction, (int, float)) or not 0 <= self.val_fraction < 1:
            raise ValueError(f"TrainConfig.val_fraction must be in [0, 1), got {self.val_fraction!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"TrainConfig.seed must be an integer, got {self.seed!r}")
        try:
            torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"TrainConfig.device {self.device!r} is not a torch device") from None


def _coerce(value, default, where: str):
    # YAML 1.1 reads "1e-4" as a string; numbers are coerced by the field's default type.
    if isinstance(default, bool):
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        return value
    if isinstance(default, float) and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} must be a number, got {value!r}") from None
    return value


def load_configs(path: str | os.PathLike | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> tuple[EncoderConfig, TrainConfig]:
    """Read a YAML file with ``model:`` and ``train:`` sections, then apply ``key=value`` overrides.

    A key is ``model.<field>``, ``train.<field>`` or a bare field name that exists
    in exactly one section. Unknown sections or fields are errors.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"training config {str(path)!r} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"training config {str(path)!r} must be a mapping with 'model' and 'train' sections")
    extra = sorted(set(raw) - {"model", "train"})
    if extra:
        raise ValueError(f"training config {str(path)!r}: unknown sections {extra}; use 'model' and 'train'")
    sections = {"model": EncoderConfig, "train": TrainConfig}
    defaults = {name: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)}
                for name, cls in sections.items()}
    values = {name: {} for name in sections}
    for name in sections:
        section = raw.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"training config {str(path)!r}: section {name!r} must be a mapping")
        for key, value in section.items():
            if key not in defaults[name]:
                raise ValueError(f"training config {str(path)!r}: unknown {name} field {key!r}; "
                                 f"allowed: {sorted(defaults[name])}")
            values[name][key] = _coerce(value, defaults[name][key], f"{name}.{key}")
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if "." in key:
            section, field = key.split(".", 1)
            if section not in sections or field not in defaults[section]:
                raise ValueError(f"override {item!r}: unknown field {key!r}")
        else:
            owners = [name for name in sections if key in defaults[name]]
            if len(owners) != 1:
                allowed = sorted(f"{s}.{f}" for s in sections for f in defaults[s])
                raise ValueError(f"override {item!r}: unknown field {key!r}; allowed: {allowed}")
            section, field = owners[0], key
        values[section][field] = _coerce(yaml.safe_load(text), defaults[section][field], key)
    return EncoderConfig(**values["model"]), TrainConfig(**values["train"])


def _split(latents: torch.Tensor, seq_len: int, val_fraction: float, seed: int):
    """Videos ``[V, T, C, H, W]`` -> (train videos, val videos): lists of ``[T_i, C, H, W]``."""
    num_videos, num_frames = latents.shape[:2]
    if num_frames < seq_len:
        raise ValueError(f"corpus videos have {num_frames} frames, fewer than seq_len={seq_len}")
    if val_fraction == 0:
        return list(latents), []
    if num_videos >= 2:
        order = torch.randperm(num_videos, generator=torch.Generator().manual_seed(seed)).tolist()
        n_val = min(num_videos - 1, max(1, round(num_videos * val_fraction)))
        return [latents[i] for i in order[n_val:]], [latents[i] for i in order[:n_val]]
    n_val = max(seq_len, round(num_frames * val_fraction))
    if num_frames - n_val < seq_len:
        raise ValueError(f"a single video of {num_frames} frames cannot give both a training and a validation "
                         f"chunk of seq_len={seq_len}; add videos or set val_fraction=0")
    return [latents[0, :num_frames - n_val]], [latents[0, num_frames - n_val:]]


def _chunks(videos: list[torch.Tensor], seq_len: int, stride: int) -> list[tuple[int, int]]:
    return [(v, s) for v, video in enumerate(videos) for s in range(0, video.shape[0] - seq_len + 1, stride)]


def _gather(videos, chunks, seq_len: int, device) -> torch.Tensor:
    return torch.stack([videos[v][s:s + seq_len] for v, s in chunks]).to(device)


def _loss(model: RetrievalEncoder, batch: torch.Tensor, use_amp: bool):
    b, l = batch.shape[:2]
    with torch.autocast(device_type=batch.device.type, dtype=torch.bfloat16, enabled=use_amp):
        z, recon = model(batch.flatten(0, 1))
    return encoder_loss(batch, recon.view_as(batch), z.view(b, l, -1), model.config)


def _rng_state(gen: torch.Generator) -> dict:
    state = {"data": gen.get_state(), "torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_rng(state: dict, gen: torch.Generator) -> None:
    gen.set_state(state["data"])
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def loss_plot_titles(config: EncoderConfig, run: str | None = None) -> dict[str, str]:
    """Titles of the loss-curve figure (``"figure"``: the run and whether the delta loss is
    weighted) and of its subplots (``"total"``, ``"recon"``, ``"delta"``, ``"smooth"``).

    A term with weight 0 is still computed and logged but is not part of the total; its
    title says so.
    """
    def term(name: str, weight: float) -> str:
        return f"{name} (weight {weight:g})" if weight > 0 else f"{name} (weight 0: logged, not optimised)"

    delta = (f"delta loss weighted {config.delta_weight:g}" if config.delta_weight > 0
             else "delta loss not optimised (weight 0)")
    return {"figure": f"{run or 'encoder training'}: {delta}",
            "total": f"total = recon + {config.delta_weight:g}*delta + {config.smooth_weight:g}*smooth",
            "recon": "recon (MSE, weight 1)",
            "delta": term("delta", config.delta_weight),
            "smooth": term("smooth", config.smooth_weight)}


def plot_history(history: dict, path: str | os.PathLike, config: EncoderConfig,
                 title: str | None = None) -> dict[str, str]:
    """Write the train (per step) and validation loss curves as a PNG, titled by
    :func:`loss_plot_titles` for the run ``title``; returns the titles as drawn."""
    # Figure + Agg canvas directly: no pyplot, so no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    titles = loss_plot_titles(config, title)
    fig = Figure(figsize=(10, 6))
    FigureCanvasAgg(fig)
    drawn = {"figure": fig.suptitle(titles["figure"]).get_text()}
    for i, term in enumerate(("total", "recon", "delta", "smooth")):
        ax = fig.add_subplot(2, 2, i + 1)
        if history["train"]:
            ax.plot([r["step"] for r in history["train"]], [r[term] for r in history["train"]],
                    label="train", linewidth=0.8)
        if history["val"]:
            ax.plot([r["step"] for r in history["val"]], [r[term] for r in history["val"]],
                    "o-", label="val", markersize=3)
        ax.set_title(titles[term])
        ax.set_xlabel("step")
        ax.legend()
        drawn[term] = ax.get_title()
    fig.tight_layout()
    fig.savefig(str(path), dpi=80)
    return drawn


@torch.no_grad()
def _validate(model, videos, chunks, seq_len, device, use_amp) -> dict[str, float]:
    model.eval()
    sums = {"total": 0.0, "recon": 0.0, "delta": 0.0, "smooth": 0.0}
    for start in range(0, len(chunks), 16):
        part = chunks[start:start + 16]
        terms = _loss(model, _gather(videos, part, seq_len, device), use_amp).as_floats()
        for key in sums:
            sums[key] += terms[key] * len(part)
    model.train()
    return {key: value / len(chunks) for key, value in sums.items()}


@dataclass
class TrainResult:
    model: RetrievalEncoder
    history: dict
    out_dir: Path


def train_encoder(model_config: EncoderConfig, train_config: TrainConfig, corpus: LatentCorpus | torch.Tensor,
                  out_dir: str | os.PathLike, resume: str | os.PathLike | None = None,
                  progress: bool = True, run_name: str | None = None) -> TrainResult:
    """Train on ``corpus`` (a ``LatentCorpus`` or latents ``[V, T, C, H, W]``) and write ``out_dir``.

    ``resume`` names a ``last.pt`` from an earlier run with the same model config;
    training continues from its step with its optimizer and data-order state.
    Without ``resume``, an existing ``out_dir/last.pt`` is an error rather than
    being overwritten. ``run_name`` titles the loss curves (default: the folder name).
    """
    latents = corpus.latents if isinstance(corpus, LatentCorpus) else corpus
    frame_shape = (model_config.in_channels, model_config.spatial_h, model_config.spatial_w)
    if latents.dim() != 5 or tuple(latents.shape[2:]) != frame_shape:
        raise ValueError(f"corpus frames are {tuple(latents.shape[2:])} but the encoder config expects "
                         f"[C, H, W] = {list(frame_shape)} (in_channels, spatial_h, spatial_w)")
    out_dir = Path(out_dir)
    last_path = out_dir / "last.pt"
    if resume is None and last_path.exists():
        raise ValueError(f"{str(last_path)!r} exists: pass it as resume to continue, or use another out_dir")
    out_dir.mkdir(parents=True, exist_ok=True)

    device = torch.device(train_config.device)
    use_amp = train_config.amp and device.type == "cuda"
    seq_len = model_config.seq_len
    train_videos, val_videos = _split(latents, seq_len, train_config.val_fraction, train_config.seed)
    train_chunks = _chunks(train_videos, seq_len, train_config.chunk_stride)
    val_chunks = _chunks(val_videos, seq_len, seq_len)[:train_config.val_max_chunks]

    torch.manual_seed(train_config.seed)
    model = RetrievalEncoder(model_config).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay)
    gen = torch.Generator().manual_seed(train_config.seed)
    history = {"train": [], "val": []}
    step = 0
    if resume is not None:
        state = read_checkpoint(resume)
        if "optimizer" not in state or "step" not in state:
            raise CheckpointError(f"{str(resume)!r} is an encoder checkpoint without training state "
                                  "(optimizer/step); resume needs a last.pt written by train-encoder")
        if EncoderConfig.from_dict(state["config"]) != model_config:
            raise CheckpointError(f"{str(resume)!r} was trained with encoder config {state['config']}, "
                                  f"not {model_config.to_dict()}")
        if state.get("train_config", {}).get("lr") != train_config.lr:
            warnings.warn(f"resuming with lr={train_config.lr}; the checkpoint used "
                          f"{state.get('train_config', {}).get('lr')}", stacklevel=2)
        load_state_into(model, state["model"], source=str(resume))
        optimizer.load_state_dict(state["optimizer"])
        for group in optimizer.param_groups:
            group["lr"], group["weight_decay"] = train_config.lr, train_config.weight_decay
        step, history = int(state["step"]), state["history"]
        _restore_rng(state["rng"], gen)

    def save_state() -> None:
        save_checkpoint(last_path, model, optimizer=optimizer.state_dict(), step=step, rng=_rng_state(gen),
                        train_config=dataclasses.asdict(train_config), history=history)
        (out_dir / "history.json").write_text(json.dumps(history))
        plot_history(history, out_dir / "loss_curves.png", model_config, run_name or out_dir.name)

    model.train()
    bar = tqdm(total=train_config.steps, initial=step, disable=not progress, desc="train-encoder")
    while step < train_config.steps:
        picks = torch.randint(len(train_chunks), (train_config.batch_size,), generator=gen).tolist()
        batch = _gather(train_videos, [train_chunks[i] for i in picks], seq_len, device)
        terms = _loss(model, batch, use_amp)
        optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        step += 1
        history["train"].append({"step": step, **terms.as_floats()})
        bar.update(1)
        bar.set_postfix(loss=f"{history['train'][-1]['total']:.4f}")
        last = step == train_config.steps
        if val_chunks and (step % train_config.val_every == 0 or last):
            history["val"].append({"step": step, **_validate(model, val_videos, val_chunks, seq_len,
                                                             device, use_amp)})
        if step % train_config.checkpoint_every == 0 or last:
            save_state()
    bar.close()
    if not last_path.exists():
        save_state()
    save_checkpoint(out_dir / "encoder.pt", model)
    return TrainResult(model=model.eval(), history=history, out_dir=out_dir)
