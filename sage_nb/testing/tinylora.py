"""A tiny LoRA adapter for the tiny Llama, trained in seconds on CPU with peft, that makes the model
answer one fixed word (one token of its vocabulary, e.g. ``jupyter``, ``pandas``, ``kernel``) to any question
under greedy decoding: the proof that an engine really applies
an adapter (vLLM answers with the base model, silently, when an adapter's module names do not match).

peft is a dependency of the tests and the tutorials, not of sage_nb; it is imported only inside
:func:`make_tiny_adapter`. CLI: ``python -m sage_nb.testing.tinylora BASE DEST [--answer WORD]``.
"""

from __future__ import annotations

import json
import pathlib
import sys

from .tinymodel import written_in_place

__all__ = ["make_tiny_adapter", "PROMPTS"]

MARKER = ".sage_nb_tiny_adapter.json"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = ["hello", "what is a notebook kernel?", "print the result", "x = 1 * 2", "tell me about the model",
           "which value is in the list?", "how are you today", "plot the data frame"]


def make_tiny_adapter(base: str | pathlib.Path, dest: str | pathlib.Path, answer: str = "jupyter", *, rank: int = 8,
                      steps: int = 80, seed: int = 7, overwrite: bool = False) -> pathlib.Path:
    """Train a rank-``rank`` LoRA on ``base`` (the tiny Llama) so that its first answer to every chat
    prompt is ``answer`` followed by the end of the turn; save it with peft at ``dest`` and return
    that path. An existing adapter trained with the same settings is returned as it is."""
    dest = pathlib.Path(dest).expanduser().resolve()
    settings = {"base": str(pathlib.Path(base).resolve()), "answer": answer, "rank": rank, "steps": steps,
                "seed": seed}
    marker = dest / MARKER
    if not overwrite and marker.is_file() and json.loads(marker.read_text()) == settings:
        return dest

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    word = tok(answer, add_special_tokens=False)["input_ids"]
    if len(word) != 1:  # a few steps teach one token and the end of the turn; a longer word comes out stuttered
        raise ValueError(f"{answer!r} is {len(word)} tokens of the tiny Llama's vocabulary; pick a word that is one "
                         "(jupyter, pandas, kernel, notebook, python, server, ...)")
    target = word + [tok.eos_token_id]
    batch = []
    for prompt in PROMPTS:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        batch.append((ids + target, [-100] * len(ids) + target))
    width = max(len(ids) for ids, _ in batch)
    pad = tok.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in batch])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in batch])
    optim = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    with written_in_place(dest) as tmp:
        model.save_pretrained(tmp)
        (tmp / MARKER).write_text(json.dumps(settings) + "\n")
    return dest


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sage_nb.testing.tinylora", description=__doc__.splitlines()[0])
    parser.add_argument("base")
    parser.add_argument("dest")
    parser.add_argument("--answer", default="jupyter")
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args(argv)
    print(make_tiny_adapter(args.base, args.dest, args.answer, rank=args.rank))
    return 0


if __name__ == "__main__":
    sys.exit(main())
