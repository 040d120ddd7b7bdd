"""Retrieval encoder/decoder of SPEC section 5.

Module names and their order inside every ``nn.Sequential`` are part of the
public checkpoint format (``ae_latent_mem.pt`` stores ``{"config", "model"}``).
Each stack is ONE flat ``nn.Sequential``, so stage ``i`` of the encoder owns
entries ``4i .. 4i+3`` and stage ``i`` of the decoder entries ``5i .. 5i+4``.
The state-dict keys of the default config are, for example::

    encoder.conv_stack.{4i}.weight              strided Conv2d 3x3 of stage i
    encoder.conv_stack.{4i+1}.weight            GroupNorm of stage i ({4i+2} is the SiLU)
    encoder.conv_stack.{4i+3}.block.{0,2,3,5}   ResBlock (GN, -, Conv, GN, -, Conv)
    encoder.final_norm.0.weight                 GroupNorm before pooling
    encoder.fc.weight                           Linear(hidden[-1], latent_dim)
    decoder.fc.0.weight                         Linear(latent_dim, hidden[-1]*h_b*w_b)
    decoder.upsample_stack.{5i+1}.weight        Conv2d 3x3 after the x2 upsample {5i} of stage i
    decoder.upsample_stack.{5i+2}.weight        GroupNorm of stage i ({5i+3} is the SiLU)
    decoder.upsample_stack.{5i+4}.block.{...}   ResBlock of stage i
    decoder.final.1.weight                      Conv2d(hidden[0], in_channels) after the upsample final.0

Files written by earlier versions of this package nest one ``nn.Sequential`` per
stage (``encoder.conv_stack.{s}.{j}``, ``decoder.upsample_stack.{s}.{j}``);
:func:`lrag_engine.encoder.checkpoint.flatten_nested_keys` converts their keys.

Layer count: the encoder has ``len(hidden_dims)`` stride-2 convolutions. The
decoder upsamples once per transition between consecutive reversed widths
(``len(hidden_dims) - 1`` stages in ``upsample_stack``) plus once in ``final``,
so it upsamples exactly as often as the encoder downsamples. Each stride-2
convolution (kernel 3, padding 1) maps a side ``n`` to ``ceil(n / 2)``; the
decoder therefore reaches ``h_b * 2**len(hidden_dims) >= spatial_h`` and crops
the bottom/right excess (60x104 -> 8x13 bottleneck -> 64x104 -> crop 60x104).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

_GROUP_CHOICES = (32, 16, 8, 4, 1)
# Fields of the public reference's training config that say nothing about the weights
# (plus every ``wandb_*`` field).
PUBLIC_TRAINING_FIELDS = frozenset({
    "config", "tag", "gpu", "data_dir", "val_split", "num_workers", "data_percentage", "batch_size", "lr",
    "weight_decay", "epochs", "grad_clip", "use_amp", "log_dir", "log_every", "save_every", "resume",
    "disable_wandb", "seed",
})


def _positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"EncoderConfig.{name} must be a positive integer, got {value!r}")


@dataclass
class EncoderConfig:
    """Shapes and loss weights of the retrieval encoder (SPEC section 5).

    in_channels, spatial_h, spatial_w: latent frame shape ``[C, H, W]``.
    latent_dim: embedding size D.
    hidden_dims: channel width of each stride-2 stage.
    delta_margin: hinge margin m of the Window Temporal Delta loss, in [-1, 1].
    delta_weight: weight of that loss (>= 0; 0 disables it).
    delta_window: largest frame offset w of that loss.
    smooth_weight: weight of the trajectory smoothing loss (>= 0).
    seq_len: frames per training chunk L.
    """

    in_channels: int = 16
    spatial_h: int = 60
    spatial_w: int = 104
    latent_dim: int = 1024
    hidden_dims: tuple[int, ...] = (64, 128, 256)
    delta_margin: float = 0.85
    delta_weight: float = 1.0
    delta_window: int = 3
    smooth_weight: float = 1.0
    seq_len: int = 8

    def __post_init__(self) -> None:
        for name in ("in_channels", "spatial_h", "spatial_w", "latent_dim", "delta_window", "seq_len"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.hidden_dims, (str, bytes)) or not hasattr(self.hidden_dims, "__iter__"):
            raise ValueError(f"EncoderConfig.hidden_dims must be a sequence of positive integers, "
                             f"got {self.hidden_dims!r}")
        self.hidden_dims = tuple(self.hidden_dims)
        if not self.hidden_dims:
            raise ValueError("EncoderConfig.hidden_dims must hold at least one width, got ()")
        for width in self.hidden_dims:
            if not isinstance(width, int) or isinstance(width, bool) or width <= 0:
                raise ValueError(f"EncoderConfig.hidden_dims entries must be positive integers, "
                                 f"got {self.hidden_dims!r}")
        for name in ("delta_margin", "delta_weight", "smooth_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"EncoderConfig.{name} must be a number, got {value!r}")
            setattr(self, name, float(value))
        if not -1.0 <= self.delta_margin <= 1.0:
            raise ValueError(f"EncoderConfig.delta_margin is a cosine margin and must lie in [-1, 1], "
                             f"got {self.delta_margin}")
        for name in ("delta_weight", "smooth_weight"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"EncoderConfig.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def bottleneck_size(self) -> tuple[int, int]:
        """(h_b, w_b): map size after the stride-2 convolutions."""
        h, w = self.spatial_h, self.spatial_w
        for _ in self.hidden_dims:
            h, w = (h - 1) // 2 + 1, (w - 1) // 2 + 1
        return h, w

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["hidden_dims"] = list(self.hidden_dims)
        return out

    @classmethod
    def from_dict(cls, values: dict) -> "EncoderConfig":
        """Build from a checkpoint's ``config`` dict.

        The training fields of the public reference's config (:data:`PUBLIC_TRAINING_FIELDS`
        and ``wandb_*``: lr, epochs, seed, ...) are ignored silently; any other unknown key is
        ignored with a warning, since it may describe an architecture variant this model
        does not build.
        """
        if not isinstance(values, dict):
            raise ValueError(f"encoder config must be a dict, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(k for k in set(values) - known - PUBLIC_TRAINING_FIELDS if not str(k).startswith("wandb_"))
        if extra:
            warnings.warn(f"EncoderConfig: ignoring unknown config keys {extra}", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in known})


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the first of 32, 16, 8, 4, 1 groups that divides ``channels``."""
    groups = next(g for g in _GROUP_CHOICES if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ResBlock(nn.Module):
    """``x + block(x)`` with block = [GN, SiLU, Conv3x3, GN, SiLU, Conv3x3]; ``[N, ch, h, w]``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.block = nn.Sequential(
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            group_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


class Encoder(nn.Module):
    """Latent frames ``[N, C, H, W]`` -> raw embeddings ``[N, latent_dim]``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = config.in_channels
        for width in config.hidden_dims:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1), group_norm(width), nn.SiLU(), ResBlock(width)]
            prev = width
        self.conv_stack = nn.Sequential(*layers)
        self.final_norm = nn.Sequential(group_norm(prev), nn.SiLU())
        self.fc = nn.Linear(prev, config.latent_dim)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        h = self.final_norm(self.conv_stack(frames))
        return self.fc(h.mean(dim=(2, 3)))


class Decoder(nn.Module):
    """Raw embeddings ``[N, latent_dim]`` -> reconstructed frames ``[N, C, H, W]``."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.out_h, self.out_w = config.spatial_h, config.spatial_w
        self.h_b, self.w_b = config.bottleneck_size
        widths = tuple(reversed(config.hidden_dims))
        self.fc = nn.Sequential(nn.Linear(config.latent_dim, widths[0] * self.h_b * self.w_b), nn.SiLU())
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, c_out, 3, padding=1),
                       group_norm(c_out), nn.SiLU(), ResBlock(c_out)]
        self.upsample_stack = nn.Sequential(*layers)
        self.final = nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"),
                                   nn.Conv2d(widths[-1], config.in_channels, 3, padding=1))
        self.bottleneck_channels = widths[0]

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(z.shape[0], self.bottleneck_channels, self.h_b, self.w_b)
        out = self.final(self.upsample_stack(h))
        return out[:, :, :self.out_h, :self.out_w]


class RetrievalEncoder(nn.Module):
    """Encoder + decoder; ``encode`` is what retrieval uses, ``forward`` serves training."""

    def __init__(self, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def _check_frames(self, frames: torch.Tensor) -> None:
        if frames.dim() != 4 or frames.shape[1] != self.config.in_channels:
            raise ValueError(f"frames must be [N, {self.config.in_channels}, H, W], got {tuple(frames.shape)}")

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> raw (un-normalised) embeddings ``[N, D]``."""
        self._check_frames(frames)
        return self.encoder(frames)

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, C, H, W]`` -> (embeddings ``[N, D]``, reconstruction ``[N, C, H, W]``)."""
        self._check_frames(frames)
        if frames.shape[2:] != (self.config.spatial_h, self.config.spatial_w):
            raise ValueError(f"training frames must be {self.config.spatial_h}x{self.config.spatial_w} "
                             f"(EncoderConfig.spatial_h/w), got {tuple(frames.shape[2:])}")
        z = self.encoder(frames)
        return z, self.decoder(z)
