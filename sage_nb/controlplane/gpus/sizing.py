"""Model sizing: how much GPU memory an engine needs, from ``config.json`` and weight files.

need per GPU = weights / tp + KV cache(max_model_len) / tp + overhead, where the
KV cache per token is ``layers × kv_heads × head_dim × 2 (K and V) × dtype bytes``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import BadRequest
from . import hubmeta

MIB = 1024 * 1024
OVERHEAD_MIB = 1024          # activations, CUDA graphs, sampler buffers
CUDA_CONTEXT_MIB = 512       # the engine's CUDA context, taken before vLLM's own free-memory check
BLOCK = 16                   # vLLM's KV block size: max_model_len is rounded down to it
MIN_MODEL_LEN = 256

DTYPE_BYTES = {"float16": 2, "half": 2, "bfloat16": 2, "float32": 4, "float": 4,
               "fp8": 1, "float8": 1, "int8": 1}
HF_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class ModelSpec:
    """What sizing needs to know of a model."""

    source: str                 # local directory it was read from
    weights_bytes: int
    weights_dtype_bytes: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int | None
    architectures: list[str]
    hidden_size: int = 0
    intermediate_size: int = 0
    num_heads: int = 0
    lora_mib: int = 0           # the LoRA slots an engine started with --lora preallocates (with_lora)

    def dtype_bytes(self, dtype: str | None) -> int:
        """Bytes per value the engine computes in (vLLM's ``auto`` runs fp32 models in fp16)."""
        if dtype and dtype != "auto":
            return DTYPE_BYTES.get(dtype, 2)
        return min(self.weights_dtype_bytes, 2)

    def kv_bytes_per_token(self, dtype: str | None = None) -> int:
        return self.num_layers * self.num_kv_heads * self.head_dim * 2 * self.dtype_bytes(dtype)

    def weights_mib(self, dtype: str | None = None) -> int:
        """The weights in MiB as the engine holds them, its LoRA slots included."""
        scale = self.dtype_bytes(dtype) / self.weights_dtype_bytes
        return int(self.weights_bytes * scale) // MIB + 1 + self.lora_mib

    def with_lora(self, max_loras: int, max_rank: int, dtype: str | None = None) -> ModelSpec:
        """This spec for an engine started with ``--enable-lora``: vLLM preallocates, for each of
        ``max_loras`` slots and every layer, A (rank × in) and B (out × rank) for the attention
        projections (q, k, v, o) and the MLP's (gate, up, down) at ``max_rank``."""
        hidden, heads = self.hidden_size, self.num_heads or 1
        inter = self.intermediate_size or 4 * hidden
        q, kv = heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_rank = (hidden + q) * 2 + (hidden + kv) * 2 + (hidden + inter) * 2 + (inter + hidden)
        total = self.num_layers * per_rank * max_rank * max_loras * self.dtype_bytes(dtype)
        return dataclasses.replace(self, lora_mib=-(-total // MIB))

    def need_mib(self, max_model_len: int, tp: int = 1, dtype: str | None = None) -> int:
        """MiB needed on each of ``tp`` GPUs, CUDA context included."""
        kv_mib = self.kv_bytes_per_token(dtype) * max_model_len / MIB
        return int((self.weights_mib(dtype) + kv_mib) / tp) + OVERHEAD_MIB + CUDA_CONTEXT_MIB

    def max_len_fitting(self, available_mib: int, tp: int = 1, dtype: str | None = None) -> int:
        """The largest ``max_model_len`` (a multiple of the block size) that fits, or 0."""
        budget_mib = (available_mib - OVERHEAD_MIB - CUDA_CONTEXT_MIB) * tp - self.weights_mib(dtype)
        if budget_mib <= 0:
            return 0
        tokens = int(budget_mib * MIB // self.kv_bytes_per_token(dtype))
        tokens = tokens // BLOCK * BLOCK
        if self.max_position_embeddings:
            tokens = min(tokens, self.max_position_embeddings)
        return tokens


def validate_model_name(model: str) -> None:
    """Refuse what is neither an existing directory nor a Hugging Face model id."""
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("model is required: a local model directory or a Hugging Face model id")
    path = Path(model).expanduser()
    looks_like_path = model.startswith(("/", "./", "../", "~")) or model.count("/") > 1
    if path.is_dir():
        return
    if looks_like_path or path.exists():
        raise BadRequest(f"model path {model!r} does not exist or is not a directory")
    if not HF_ID.match(model):
        raise BadRequest(f"model {model!r} is neither an existing directory nor a valid "
                         "Hugging Face model id (org/name)")


def hub_cache(env: Mapping[str, str] | None = None) -> str:
    """The Hugging Face hub cache of an environment (``HF_HUB_CACHE``, else ``HF_HOME/hub``)."""
    env = os.environ if env is None else env
    return env.get("HF_HUB_CACHE") or os.path.join(
        env.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "hub")


def local_model_dir(model: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The local directory of ``model``: the path itself, or its snapshot in the Hugging Face cache
    of ``env`` (the engine's environment; default: this process's)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if not HF_ID.match(model) or "/" not in model:
        return None
    repo = Path(hub_cache(env)) / ("models--" + model.replace("/", "--"))
    ref = repo / "refs" / "main"
    if ref.is_file():
        snap = repo / "snapshots" / ref.read_text().strip()
        if (snap / "config.json").exists():
            return snap
    snaps = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
    return snaps[-1].parent if snaps else None


def _text_config(config: dict) -> dict:
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            return {**config, **config[key]}
    return config


def spec_from_config(config: dict, weights_bytes: int, source: str) -> ModelSpec:
    """Build a :class:`ModelSpec` from a parsed ``config.json``."""
    cfg = _text_config(config)
    try:
        layers = int(cfg.get("num_hidden_layers") or cfg["n_layer"])
        heads = int(cfg.get("num_attention_heads") or cfg["n_head"])
        hidden = int(cfg.get("hidden_size") or cfg["n_embd"])
    except (KeyError, TypeError, ValueError):
        raise BadRequest(f"{source}/config.json lacks num_hidden_layers, num_attention_heads "
                         "or hidden_size; cannot size the model") from None
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float16").replace("torch.", "")
    if not weights_bytes:  # no weight files: estimate parameters from the shape
        vocab = int(cfg.get("vocab_size") or 32000)
        inter = int(cfg.get("intermediate_size") or 4 * hidden)
        params = layers * (4 * hidden * hidden + 3 * hidden * inter) + 2 * vocab * hidden
        weights_bytes = params * DTYPE_BYTES.get(dtype, 2)
    mpe = cfg.get("max_position_embeddings") or cfg.get("n_positions")
    return ModelSpec(source=source, weights_bytes=weights_bytes,
                     weights_dtype_bytes=DTYPE_BYTES.get(dtype, 2), num_layers=layers,
                     num_kv_heads=kv_heads, head_dim=head_dim,
                     max_position_embeddings=int(mpe) if mpe else None,
                     architectures=list(cfg.get("architectures") or []), hidden_size=hidden,
                     intermediate_size=int(cfg.get("intermediate_size") or 4 * hidden), num_heads=heads)


def inspect_model(model: str, env: Mapping[str, str] | None = None) -> ModelSpec | None:
    """Size a model found on this machine; ``None`` when it is not available locally."""
    directory = local_model_dir(model, env)
    if directory is None or not (directory / "config.json").is_file():
        return None
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BadRequest(f"cannot read {directory}/config.json: {e}") from None
    files = [p for p in directory.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file()]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    weights = sum(p.stat().st_size for p in (safetensors or files))
    spec = spec_from_config(config, weights, str(directory))
    limit = _sentence_transformers_limit(directory)
    if limit and (spec.max_position_embeddings is None or limit < spec.max_position_embeddings):
        spec.max_position_embeddings = limit  # vLLM derives its max_model_len from it too
    return spec


def _sentence_transformers_limit(directory: Path) -> int | None:
    """``max_seq_length`` of a sentence-transformers model (MiniLM: 256, below its 512 positions)."""
    try:
        value = json.loads((directory / "sentence_bert_config.json").read_text()).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


def inspect_hub_model(model: str, env: Mapping[str, str] | None = None, timeout: float = 20.0) -> ModelSpec:
    """Size a model that is not on this machine from the hub's metadata (its ``config.json`` and
    file sizes), asking the hub ``env`` (the engine's environment) names; :class:`BadRequest`
    saying why when it cannot (offline, unreachable, gated, no such model: :mod:`.hubmeta`)."""
    env = os.environ if env is None else env
    if not HF_ID.match(model):
        raise BadRequest(f"cannot size model {model!r}: it is neither a local directory nor a Hugging Face id")
    config, sizes = hubmeta.fetch(model, env, hub_cache(env), timeout)
    top = {k: v for k, v in sizes.items() if "/" not in k}  # as vLLM loads them (not original/...)
    weights = sum(v for k, v in top.items() if k.endswith(".safetensors")) or sum(
        v for k, v in top.items() if k.endswith(WEIGHT_SUFFIXES))
    return spec_from_config(config, weights, model)
