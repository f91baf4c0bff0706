"""What a LoRA adapter on disk is, and whether an engine can take it: every check sage_nb can make
before vLLM is called.

vLLM reads ``adapter_config.json`` through its ``PEFTHelper`` (rank, bias, DoRA, ``modules_to_save``)
and the weights from ``adapter_model.safetensors``; when the adapter's module names do not match the
model's it *silently* answers with the base model (vLLM #34186). So the adapter's tensors are checked
against the base model's own: each ``…<module>.lora_A/B.weight`` must name a weight of the model, with
the shapes that weight's LoRA would have. Both are read from the safetensors headers (the format's
8-byte length and JSON table), so no tensor is loaded and no torch is needed.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import BadRequest
from ..requests import LORA_RANKS

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors",)
PREFIX = "base_model.model."  # peft's prefix before the model's own module path
PART = {"lora_A": 0, "lora_B": 1}


@dataclass
class AdapterFiles:
    """An adapter directory as peft saved it."""

    path: str
    rank: int
    base: str | None  # the base model its config names (informative: the tensors are what is checked)
    modules: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # module -> {"lora_A": shape, ...}

    def to_model(self) -> dict:
        return {"path": self.path, "rank": self.rank, "base": self.base, "modules": len(self.modules)}


def safetensors_shapes(path: Path) -> dict[str, list[int]]:
    """Each tensor's shape from a ``.safetensors`` file's header (no data read)."""
    try:
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            if size > 100 * 1024 * 1024:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
    except (OSError, ValueError, struct.error) as e:
        raise BadRequest(f"{path} is not a readable safetensors file: {e}") from None
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)}


def read_adapter(path: str) -> AdapterFiles:
    """Read and check an adapter directory; :class:`BadRequest` saying what is wrong with it."""
    if not isinstance(path, str) or not path.strip():
        raise BadRequest("an adapter path is required: the directory peft's save_pretrained wrote")
    where = Path(path).expanduser()
    try:
        found = where.is_dir()
    except OSError as e:  # a folder of another user's: PermissionError
        raise BadRequest(f"cannot read adapter path {path!r}: {e.strerror or e}") from None
    if not found:
        raise BadRequest(f"adapter path {path!r} is not a directory on this machine")
    where = where.resolve()
    try:
        config = json.loads((where / CONFIG).read_text())
    except FileNotFoundError:
        raise BadRequest(f"{where} has no {CONFIG}: not a LoRA adapter saved by peft "
                         "(model.save_pretrained(path) writes it)") from None
    except (OSError, ValueError) as e:
        raise BadRequest(f"cannot read {where / CONFIG}: {e}") from None
    if not isinstance(config, dict):
        raise BadRequest(f"{where / CONFIG} is not a JSON object")
    kind = config.get("peft_type", "LORA")
    if str(kind).upper() != "LORA":
        raise BadRequest(f"{where} is a {kind} adapter; vLLM serves LoRA adapters only")
    unsupported = _unsupported(config)
    if unsupported:
        raise BadRequest(f"adapter {where} uses {unsupported}, which vLLM does not support: "
                         "train it again without (peft's LoraConfig defaults)")
    weights = next((where / w for w in WEIGHTS if (where / w).is_file()), None)
    if weights is None:
        raise BadRequest(f"{where} has no adapter_model.safetensors (save it with peft's default "
                         "safe_serialization=True)")
    modules: dict[str, dict[str, list[int]]] = {}
    for key, shape in safetensors_shapes(weights).items():
        module, part = _module_of(key)
        if module is None or len(shape) != 2:
            raise BadRequest(f"adapter {where}: tensor {key!r} is not a LoRA A or B matrix; "
                             "vLLM takes LoRA matrices only")
        modules.setdefault(module, {})[part] = shape
    if not modules:
        raise BadRequest(f"adapter {where} holds no LoRA weights")
    ranks = {shapes["lora_A"][0] for shapes in modules.values() if "lora_A" in shapes}
    rank = max(ranks) if ranks else int(config.get("r") or 0)
    return AdapterFiles(str(where), rank, config.get("base_model_name_or_path"), modules)


def _unsupported(config: dict) -> str | None:
    if config.get("bias", "none") != "none":
        return f"bias={config['bias']!r} (vLLM takes bias='none' only)"
    if config.get("use_dora"):
        return "DoRA (use_dora=True)"
    if config.get("modules_to_save"):
        return f"modules_to_save={config['modules_to_save']!r}"
    return None


def _module_of(key: str) -> tuple[str | None, str]:
    """``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`` →
    (``model.layers.0.self_attn.q_proj``, ``lora_A``)."""
    parts = key.split(".")
    if len(parts) < 3 or parts[-1] != "weight" or parts[-2] not in PART:
        return None, ""
    module = ".".join(parts[:-2])
    return (module[len(PREFIX):] if module.startswith(PREFIX) else module), parts[-2]


def model_weights(model_dir: str) -> dict[str, list[int]] | None:
    """The base model's weight shapes by name, from its safetensors headers (``None``: not a local
    model with safetensors weights, so only the rank can be checked)."""
    where = Path(model_dir)
    files = sorted(where.glob("*.safetensors")) if where.is_dir() else []
    if not files:
        return None
    shapes: dict[str, list[int]] = {}
    try:
        for f in files:
            shapes.update(safetensors_shapes(f))
    except BadRequest:  # not weights sage_nb can read: vLLM will say what it thinks of them
        return None
    return shapes


def check_fits(adapter: AdapterFiles, engine_name: str, max_rank: int,
               weights: dict[str, list[int]] | None) -> None:
    """:class:`BadRequest` when an engine with ``max_rank`` and base ``weights`` cannot apply the adapter."""
    if adapter.rank > max_rank:
        raise BadRequest(f"adapter {adapter.path} has rank {adapter.rank}, above engine {engine_name!r}'s "
                         f"max_lora_rank {max_rank}: start an engine with --max-lora-rank {_rank_for(adapter.rank)}")
    if weights is None:
        return
    for module, shapes in sorted(adapter.modules.items()):
        base = weights.get(module + ".weight")
        if base is None:
            raise BadRequest(f"adapter {adapter.path} was not made for engine {engine_name!r}'s model: it adapts "
                             f"{module!r}, which the model does not have (vLLM would answer with the base model "
                             "without a word)")
        out_features, in_features = base[0], base[-1]
        a, b = shapes.get("lora_A"), shapes.get("lora_B")
        if (a and a[1] != in_features) or (b and b[0] != out_features):
            raise BadRequest(f"adapter {adapter.path} was made for another model than engine {engine_name!r}'s: "
                             f"its {module} maps {a[1] if a else '?'} -> {b[0] if b else '?'} features, the "
                             f"model's {in_features} -> {out_features}")


def _rank_for(rank: int) -> int:
    return next((r for r in LORA_RANKS if r >= rank), LORA_RANKS[-1])
