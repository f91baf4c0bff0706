"""LoRA adapter directories for tests: made by hand in the layout peft writes (zero weights, any shapes and
settings, for the checks), or trained with peft on the tiny Llama (``sage_nb.testing.tinylora``)."""

from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import save_file

TARGETS = {"self_attn.q_proj": (128, 128), "self_attn.v_proj": (128, 128), "mlp.down_proj": (128, 256)}


def fake_adapter(path, rank=8, modules=TARGETS, layers=2, prefix="base_model.model.model.layers", **config):
    """An adapter directory as peft writes it, with zero weights of the tiny Llama's shapes."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 16, "bias": "none", "base_model_name_or_path": "tiny",
        "target_modules": sorted({m.split(".")[-1] for m in modules}), **config}))
    tensors = {}
    for layer in range(layers):
        for module, (out, inp) in modules.items():
            tensors[f"{prefix}.{layer}.{module}.lora_A.weight"] = np.zeros((rank, inp), np.float32)
            tensors[f"{prefix}.{layer}.{module}.lora_B.weight"] = np.zeros((out, rank), np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path
