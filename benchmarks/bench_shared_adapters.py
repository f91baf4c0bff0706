"""Issue 24 on the box: 8 users, each with their own LoRA fine-tune of one base model, served as 8 adapters
on one shared base engine (``--lora --max-loras 8``) against 8 private engines with one adapter each.

Both set-ups go through the real control plane (placement, sizing with the LoRA slots vLLM preallocates,
the ledger, the adapter keeper's checks and loads) on a fake 2 x 24 GB L4 inventory, with stand-in engines
(the memory booked is what is compared; a stand-in takes none). The model is sized like Llama-3.2-1B
(a sparse weight file), 4k context, rank-16 adapters of every linear layer in bf16 (peft's files, zero
weights). Reported: GPU MiB booked, engines, and the adapters' files (what a user's server sends).

    .venv/bin/python -m benchmarks.bench_shared_adapters [--users 8] [--out benchmarks/results/issue24-shared]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402
from safetensors.numpy import save_file  # noqa: E402

from .bench_box import LLAMA_1B, model_dir  # noqa: E402
from .common import Figure  # noqa: E402
from .report import write_results  # noqa: E402

L4 = [{"name": "NVIDIA L4", "total_mib": 24576, "used_mib": 0, "uuid": f"GPU-l4-{i}"} for i in range(2)]
STUB = str(Path(__file__).resolve().parent.parent / "sage_nb" / "testing" / "stub_engine")
RANK = 16


def adapter(path: Path, rank: int = RANK) -> Path:
    """A rank-``rank`` LoRA of every linear layer of the Llama-1B-sized model, in bf16 as peft saves it."""
    c = LLAMA_1B
    hidden, inter, head = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * head, c["num_key_value_heads"] * head
    shapes = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
              "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
              "mlp.down_proj": (hidden, inter)}
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "bias": "none",
        "target_modules": sorted(m.split(".")[1] for m in shapes)}))
    tensors = {}
    for layer in range(c["num_hidden_layers"]):
        for module, (out, inp) in shapes.items():
            name = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{name}.lora_A.weight"] = np.zeros((rank, inp), np.float16)  # bf16's size
            tensors[f"{name}.lora_B.weight"] = np.zeros((out, rank), np.float16)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


def booked(cp, names: set[str]) -> int:
    return sum(e["booked_mib"] or 0 for e in cp.engines() if e["name"] in names)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_shared_adapters",
                                 description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue24-shared")
    args = ap.parse_args(argv)
    from sage_nb.controlplane import ControlPlane

    work = Path(tempfile.mkdtemp(prefix="sage-bench-shared-adapters-"))
    t0 = time.time()
    meta = {"command": "python -m benchmarks.bench_shared_adapters", "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "mode": "full", "cycles": f"{args.users} users", "python": sys.version.split()[0],
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"}
    model = model_dir(work)
    users = [f"user{i}" for i in range(1, args.users + 1)]
    files = {u: adapter(work / "adapters" / u) for u in users}
    file_mib = sum(f.stat().st_size for f in files[users[0]].iterdir()) / 2**20
    raw: dict = {"adapter_files_mib": round(file_mib, 2)}
    cp = ControlPlane(state_dir=work / "state", fake_gpus=L4, engine_env={"PYTHONPATH": STUB}, health_interval=0.2,
                      port_range=(18700, 18799), adopt_unrecorded=False)
    try:
        shared = cp.start_engine(model, name="shared", max_model_len=4096, timeout=60, lora=True,
                                 max_loras=args.users, max_lora_rank=RANK)
        load_s = []
        for u in users:
            t = time.perf_counter()
            cp.load_adapter(f"{u}-ft", str(files[u]), "shared", owner=u)
            load_s.append(time.perf_counter() - t)
        raw["shared"] = {"booked_mib": booked(cp, {"shared"}), "gpus": shared["gpu_ids"],
                         "adapters": len(cp.adapters()), "load_s": [round(x, 4) for x in load_s]}
        cp.stop_engine("shared")
        for u in users:
            cp.start_engine(model, name=f"private-{u}", max_model_len=4096, timeout=60, lora=True, max_loras=1,
                            max_lora_rank=RANK, adapters={f"{u}-ft": str(files[u])})
        private = {f"private-{u}" for u in users}
        raw["private"] = {"booked_mib": booked(cp, private),
                          "engines": [{k: e[k] for k in ("name", "gpu_ids", "booked_mib")}
                                      for e in cp.engines() if e["name"] in private]}
    finally:
        cp.stop_all()
        cp.close()
        shutil.rmtree(work, ignore_errors=True)
    meta.update(total_s=round(time.time() - t0, 1), load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    figs = [Figure(f"GPU MiB booked for {args.users} users' own rank-{RANK} fine-tunes of a Llama-3.2-1B-sized "
                   "model, 4k context (fake 2 x L4)", raw["shared"]["booked_mib"], raw["private"]["booked_mib"],
                   "MiB", baseline_name=f"{args.users} private engines with --lora, one adapter each",
                   note=f"one shared engine with --lora --max-loras {args.users}; each user's adapter files: "
                        f"{file_mib:.1f} MiB")]
    for fig in figs:
        print(f"   {fig.name}: {fig.value} vs {fig.baseline} MiB -> {fig.compared:.3f}x", flush=True)
    write_results(args.out, meta, "24. users' adapters on one shared engine", figs, raw,
                  "users' LoRA adapters on one shared engine (issue 24)")
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
