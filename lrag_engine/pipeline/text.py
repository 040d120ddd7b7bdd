"""Prompts -> text embeddings ``[B, text_len, text_dim]`` with Wan 2.1's UMT5 encoder.

    encoder = TextEncoder.from_original("Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth",
                                        "Wan2.1-T2V-1.3B/google/umt5-xxl", device="cuda")
    encoder = TextEncoder.from_diffusers("Wan2.1-T2V-1.3B-Diffusers", device="cuda")
    encoder = TextEncoder.random(seed=0)            # tiny, offline: matches the "tiny" preset
    text = encoder.encode(["a red fox in the snow", "a city at night"])   # [2, 512, 4096]
    result = engine.generate(num_frames=48, text=text)

Wan encodes a prompt by tokenizing it padded and truncated to ``text_len`` (512) tokens
(the UMT5 ``</s>`` included), running the encoder under the attention mask, and keeping only
the real tokens; its DiT then zero-pads them back to ``text_len``. :meth:`TextEncoder.encode`
returns that zero-padded tensor directly: prompts of different lengths need one common
length to share a batch, and lrag_engine's DiT pads any ``[B, L<=text_len, text_dim]`` input
with zeros to ``text_len``, so the padded tensor and the per-prompt trimmed embeddings give
the DiT the same input.

transformers (and sentencepiece, for the real UMT5 tokenizer) are optional dependencies:
they are imported only when an encoder is built (``pip install -e ".[pipeline]"``).
"""
from __future__ import annotations

import functools
import html
import json
import os
import re
from collections import OrderedDict
from typing import TYPE_CHECKING

import torch

from ..safe_load import load_tensor_file

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, UMT5EncoderModel

WAN_TEXT_LEN = 512
# Wan's T5RelativeEmbedding default; the checkpoint does not store it.
_MAX_DISTANCE = 128
_LIST_LIMIT = 6
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Original Wan T5 name -> transformers UMT5EncoderModel name, outside the blocks.
# The token embedding is tied: UMT5EncoderModel holds it as shared and encoder.embed_tokens.
_TOP_LEVEL = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}
# Inside block i: Wan ``blocks.{i}.<name>`` -> ``encoder.block.{i}.<name>``. UMT5 gives every
# block its own relative position bias (Wan: shared_pos=False). Wan's FFN computes
# fc2(fc1(x) * gelu(gate(x))) and UMT5's wo(gelu(wi_0(x)) * wi_1(x)): gate is wi_0, fc1 is wi_1.
_PER_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    **{f"attn.{p}.weight": f"layer.0.SelfAttention.{p}.weight" for p in "qkvo"},
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
# The inverse maps, for messages that name missing tensors in the checkpoint's own naming.
_TOP_LEVEL_TO_WAN = {umt5: wan for wan, names in _TOP_LEVEL.items() for umt5 in names}
_PER_BLOCK_TO_WAN = {umt5: wan for wan, umt5 in _PER_BLOCK.items()}
_UMT5_BLOCK_KEY = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


class TextEncoderError(ValueError):
    """A text-encoder checkpoint or folder that cannot be loaded; the message names what is wrong."""


def _require_transformers():
    try:
        import transformers
    except ImportError as exc:
        raise ImportError("the text encoder (lrag_engine.pipeline.text) needs transformers and sentencepiece, "
                          "which are optional: pip install -e \".[pipeline]\"") from exc
    return transformers


def _short(names) -> str:
    names = sorted(names)
    more = f", ... ({len(names) - _LIST_LIMIT} more)" if len(names) > _LIST_LIMIT else ""
    return "[" + ", ".join(names[:_LIST_LIMIT]) + more + "]"


@functools.cache
def _fix_text():
    try:
        import ftfy
        return ftfy.fix_text
    except ImportError:
        return None


def clean_prompt(prompt: str) -> str:
    """Wan's prompt cleaning: fix mojibake (with ftfy when installed, as Wan and diffusers do),
    unescape HTML twice, collapse whitespace runs to one space, strip."""
    fix = _fix_text()
    if fix is not None:
        prompt = fix(prompt)
    prompt = html.unescape(html.unescape(prompt)).strip()
    return re.sub(r"\s+", " ", prompt).strip()


def original_to_umt5(state: dict[str, torch.Tensor], what: str = "text encoder checkpoint"
                     ) -> dict[str, torch.Tensor]:
    """Rename a state dict in the public Wan T5 naming (``blocks.{i}.attn.q.weight``, ...) to
    transformers' ``UMT5EncoderModel`` names (``encoder.block.{i}.layer.0.SelfAttention.q.weight``,
    ...). Same tensors, no copy; a key of neither naming raises TextEncoderError."""
    if "pos_embedding.embedding.weight" in state:
        raise TextEncoderError(f"{what} has one position bias shared by all blocks (top-level "
                               "'pos_embedding.embedding.weight'): it is a T5 encoder, not the UMT5 one of Wan 2.1")
    renamed, unknown = {}, []
    for key, value in state.items():
        match = _BLOCK_KEY.match(key)
        if key in _TOP_LEVEL:
            renamed.update({name: value for name in _TOP_LEVEL[key]})
        elif match and match[2] in _PER_BLOCK:
            renamed[f"encoder.block.{match[1]}.{_PER_BLOCK[match[2]]}"] = value
        else:
            unknown.append(key)
    if unknown:
        raise TextEncoderError(f"{what} has keys that are not in the Wan UMT5 encoder naming: {_short(unknown)}")
    return renamed


def _wan_name(umt5_key: str) -> str:
    """The Wan name of a UMT5EncoderModel key."""
    match = _UMT5_BLOCK_KEY.match(umt5_key)
    if match and match[2] in _PER_BLOCK_TO_WAN:
        return f"blocks.{match[1]}.{_PER_BLOCK_TO_WAN[match[2]]}"
    return _TOP_LEVEL_TO_WAN.get(umt5_key, umt5_key)


def umt5_config_from_original(state: dict[str, torch.Tensor], what: str = "text encoder checkpoint"):
    """The ``UMT5Config`` of a Wan-named encoder state dict, read from its tensor shapes."""
    transformers = _require_transformers()
    needed = ("token_embedding.weight", "blocks.0.attn.q.weight", "blocks.0.ffn.fc1.weight",
              "blocks.0.pos_embedding.embedding.weight")
    absent = [k for k in needed if k not in state]
    if absent:
        raise TextEncoderError(f"{what} lacks {_short(absent)}, needed to read the encoder's sizes: "
                               "it is not a Wan UMT5 encoder state dict")
    vocab, dim = state["token_embedding.weight"].shape
    inner = state["blocks.0.attn.q.weight"].shape[0]
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    layers = 1 + max(int(m[1]) for m in map(_BLOCK_KEY.match, state) if m)
    return transformers.UMT5Config(
        vocab_size=vocab, d_model=dim, d_kv=inner // heads, d_ff=state["blocks.0.ffn.fc1.weight"].shape[0],
        num_layers=layers, num_heads=heads, relative_attention_num_buckets=buckets,
        relative_attention_max_distance=_MAX_DISTANCE, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=1e-6, is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)


def _byte_tokenizer():
    """A byte-level tokenizer built in code (no download): ids 0/1/2 are <pad>/</s>/<unk> as in
    UMT5, then one id per byte; ``</s>`` ends every sequence, as UMT5's tokenizer does."""
    transformers = _require_transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    specials = ["<pad>", "</s>", "<unk>"]
    # sorted: alphabet() comes from a set, in an order that changes between calls.
    vocab = {tok: i for i, tok in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")


class TextEncoder:
    """UMT5 encoder + tokenizer: prompts -> ``[B, text_len, text_dim]`` embeddings, zero after
    each prompt's real tokens, in ``dtype`` on ``device``.

    Embeddings are cached per (cleaned) prompt in an LRU of ``cache_size`` entries (0: no cache),
    so a prompt timeline that returns to a prompt does not run the encoder again.
    Build one with :meth:`from_original`, :meth:`from_diffusers` or :meth:`random`.
    """

    def __init__(self, model: UMT5EncoderModel, tokenizer: PreTrainedTokenizerBase, text_len: int = WAN_TEXT_LEN,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16, cache_size: int = 64):
        if not isinstance(text_len, int) or text_len < 1:
            raise ValueError(f"text_len must be an int >= 1, got {text_len!r}")
        if not isinstance(cache_size, int) or cache_size < 0:
            raise ValueError(f"cache_size must be an int >= 0, got {cache_size!r}")
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; the encoder needs one to pad prompts to text_len")
        self.device, self.dtype = torch.device(device), dtype
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.text_dim = model.config.d_model
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @classmethod
    def from_original(cls, pth_path: str | os.PathLike, tokenizer_dir: str | os.PathLike, *,
                      text_len: int = WAN_TEXT_LEN, device: torch.device | str = "cpu",
                      dtype: torch.dtype = torch.bfloat16, cache_size: int = 64) -> TextEncoder:
        """From Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` (the public Wan T5 naming) and the
        ``google/umt5-xxl`` tokenizer folder shipped beside it. Sizes come from the tensor shapes."""
        transformers = _require_transformers()
        what = f"text encoder checkpoint {os.fspath(pth_path)!r}"
        tokenizer = _load_tokenizer(tokenizer_dir, "tokenizer folder")
        state = load_tensor_file(pth_path, what="text encoder checkpoint", mmap=True, error=TextEncoderError)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise TextEncoderError(f"{what} does not hold a flat state dict of tensors")
        config = umt5_config_from_original(state, what)
        renamed = original_to_umt5(state, what)
        with torch.device("meta"):
            model = transformers.UMT5EncoderModel(config)
        missing = sorted(set(model.state_dict()) - set(renamed))
        if missing:
            raise TextEncoderError(f"{what} lacks keys of a {config.num_layers}-block UMT5 encoder (in Wan naming: "
                                   f"{_short(_wan_name(k) for k in missing)})")
        try:
            model.load_state_dict(renamed, strict=True, assign=True)
        except RuntimeError as exc:  # size mismatches between blocks
            raise TextEncoderError(f"{what} has tensors of inconsistent shapes: {exc}") from None
        model.set_input_embeddings(model.shared)  # re-tie: one embedding table, not two
        return cls(model, tokenizer, text_len=text_len, device=device, dtype=dtype, cache_size=cache_size)

    @classmethod
    def from_diffusers(cls, folder: str | os.PathLike, *, text_len: int = WAN_TEXT_LEN,
                       device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                       cache_size: int = 64) -> TextEncoder:
        """From a diffusers Wan pipeline folder: its ``text_encoder/`` (a UMT5EncoderModel) and
        ``tokenizer/`` subfolders, read locally (never downloaded)."""
        transformers = _require_transformers()
        folder = os.fspath(folder)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"diffusers pipeline folder {folder!r} does not exist")
        encoder_dir = os.path.join(folder, "text_encoder")
        config_path = os.path.join(encoder_dir, "config.json")
        if not os.path.isfile(config_path):
            raise FileNotFoundError(f"{folder!r} has no text_encoder/config.json: not a diffusers pipeline folder "
                                    "with a text encoder (expected text_encoder/ and tokenizer/)")
        with open(config_path) as handle:
            model_type = json.load(handle).get("model_type")
        if model_type != "umt5":
            raise TextEncoderError(f"{config_path!r} describes a {model_type!r} model, not the 'umt5' encoder of Wan")
        tokenizer = _load_tokenizer(os.path.join(folder, "tokenizer"), "diffusers tokenizer folder")
        try:
            model = transformers.UMT5EncoderModel.from_pretrained(encoder_dir, local_files_only=True, dtype=dtype)
        except OSError as exc:
            raise TextEncoderError(f"cannot load the text encoder from {encoder_dir!r}: {exc}") from None
        return cls(model, tokenizer, text_len=text_len, device=device, dtype=dtype, cache_size=cache_size)

    @classmethod
    def random(cls, seed: int = 0, *, text_dim: int = 32, text_len: int = 16, num_layers: int = 2,
               num_heads: int = 4, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               cache_size: int = 64) -> TextEncoder:
        """A tiny random UMT5 with a byte-level tokenizer, built offline; the defaults match the
        ``"tiny"`` model preset (text_dim 32, text_len 16). Same seed, same weights."""
        transformers = _require_transformers()
        if text_dim % num_heads:
            raise ValueError(f"text_dim ({text_dim}) must be a multiple of num_heads ({num_heads})")
        tokenizer = _byte_tokenizer()
        config = transformers.UMT5Config(
            vocab_size=len(tokenizer), d_model=text_dim, d_kv=text_dim // num_heads, d_ff=2 * text_dim,
            num_layers=num_layers, num_heads=num_heads, feed_forward_proj="gated-gelu", dropout_rate=0.0,
            is_encoder_decoder=False, pad_token_id=0, eos_token_id=1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = transformers.UMT5EncoderModel(config)
        return cls(model, tokenizer, text_len=text_len, device=device, dtype=dtype, cache_size=cache_size)

    def encode(self, prompts: str | list[str]) -> torch.Tensor:
        """Prompt(s) -> ``[B, text_len, text_dim]`` (B = 1 for a str): the encoder's last hidden
        states of the first ``n_i`` tokens of prompt i (its real tokens, ``</s>`` included,
        at most ``text_len``), zeros after them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError("prompts must be a str or a non-empty list of str")
        bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
        if bad:
            raise TypeError(f"prompts must be str, got {bad[0]}")
        texts = [clean_prompt(p) for p in prompts]
        fresh = self._run([t for t in dict.fromkeys(texts) if t not in self._cache])
        rows = [fresh[t] if t in fresh else self._lookup(t) for t in texts]
        out = torch.zeros(len(rows), self.text_len, self.text_dim, device=self.device, dtype=self.dtype)
        for i, row in enumerate(rows):
            out[i, :row.shape[0]] = row
        return out

    def token_lengths(self, prompts: str | list[str]) -> list[int]:
        """The real token count of each prompt (``</s>`` included, at most ``text_len``): the rows
        of :meth:`encode` that are not zero padding."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        ids = self.tokenizer([clean_prompt(p) for p in prompts], truncation=True, max_length=self.text_len)
        return [len(row) for row in ids["input_ids"]]

    def clear_cache(self) -> None:
        self._cache.clear()

    def _lookup(self, text: str) -> torch.Tensor:
        self._cache.move_to_end(text)
        return self._cache[text]

    @torch.no_grad()
    def _run(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Encode prompts the cache lacks: text -> its real-token embeddings [n_i, text_dim]."""
        if not texts:
            return {}
        batch = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.text_len,
                               return_attention_mask=True, return_tensors="pt")
        mask = batch["attention_mask"].to(self.device)
        hidden = self.model(input_ids=batch["input_ids"].to(self.device), attention_mask=mask).last_hidden_state
        lengths = mask.sum(dim=1).tolist()
        # clone: a cached row must not keep the whole [B, text_len, text_dim] batch alive.
        rows = {t: hidden[i, :n].clone() for i, (t, n) in enumerate(zip(texts, lengths))}
        if self.cache_size:
            for text, row in rows.items():
                self._cache[text] = row
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return rows


def _load_tokenizer(path: str | os.PathLike, what: str):
    transformers = _require_transformers()
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    try:
        return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise TextEncoderError(f"cannot load a tokenizer from {what} {path!r}: {exc}") from None

