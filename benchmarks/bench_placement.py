"""#15 Placement over nodes: what one placement decision costs on a cluster of 16 nodes × 8 GPUs,
against the same decision on one box of 8 GPUs, in the same run, interleaved (medians).

The decision is ``ControlPlane.plan()`` — what ``start_engine`` runs before it books anything: size the
model, read the (fake) inventory, the registry's bookings, choose (node, GPUs) — for a 16 GiB model on
one GPU and on 4 GPUs of one node. Both inventories are 80 GiB GPUs with 0-20 GiB used by others and
about two engines booked per GPU (placed by the same path: 256 on the cluster, 16 on the box, one in
eight with tensor parallel 2). The choice alone (``placement.choose_gpus`` on the views) is reported
too. Goal: a decision on 16 × 8 under 50 ms.

    .venv/bin/python -m benchmarks.bench_placement [--quick] [--out benchmarks/results/issue15-placement]

also part of ``python -m benchmarks.run`` (``--only placement``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_placement.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from sage_nb.controlplane import ControlPlane  # noqa: E402
from sage_nb.controlplane.gpus.placement import choose_gpus  # noqa: E402
from sage_nb.controlplane.requests import LaunchRequest  # noqa: E402

from .common import Figure, Settings, interleave, median, per_call  # noqa: E402

GPUS_PER_NODE, NODES = 8, 16


def model_dir(root: Path, name: str, weights_gib: int) -> str:
    """A sized model directory: a Llama config.json and a sparse weight file (sizing reads sizes only)."""
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "hidden_size": 4096, "max_position_embeddings": 8192, "torch_dtype": "bfloat16"}))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(weights_gib * 2**30)
    return str(path)


def inventory(nodes: int, rng: random.Random) -> list[dict]:
    """``nodes`` × 8 GPUs of 80 GiB with 0-20 GiB used by others; a node per GPU when more than one."""
    gpus = []
    for n in range(nodes):
        for g in range(GPUS_PER_NODE):
            gpu = {"name": "NVIDIA H100 80GB HBM3", "total_mib": 81920, "used_mib": rng.randrange(0, 20480, 512),
                   "uuid": f"GPU-bench-{n}-{g}"}
            if nodes > 1:
                gpu["node"] = f"{rng.getrandbits(224):056x}"[:56] if g == 0 else gpus[-1]["node"]
            gpus.append(gpu)
    return gpus


def control_plane(root: Path, nodes: int, models: dict[str, str], rng: random.Random) -> ControlPlane:
    """A control plane over the fake inventory with about two engines booked per GPU, placed as
    ``start_engine`` would place them (recorded ``starting``, never launched)."""
    cp = ControlPlane(state_dir=root / f"state-{nodes}", fake_gpus=inventory(nodes, rng), monitor=False,
                      use_nvml=False, port_range=(30000, 39999))
    for i in range(2 * nodes * GPUS_PER_NODE):
        req = LaunchRequest(model=models["small"] if i % 3 else models["mid"], name=f"e{i}",
                            tensor_parallel_size=2 if i % 8 == 7 else 1, max_model_len=4096)
        cp._book(req, cp._size(req))
    return cp


def run(s: Settings) -> dict:
    root = s.workdir / "placement"
    rng = random.Random(15)
    models = {"small": model_dir(root, "small-4g", 4), "mid": model_dir(root, "mid-8g", 8),
              "big": model_dir(root, "big-16g", 16)}
    box, cluster = control_plane(root, 1, models, rng), control_plane(root, NODES, models, rng)
    try:
        return measure(s, box, cluster, models["big"])
    finally:
        box.close()
        cluster.close()


def measure(s: Settings, box: ControlPlane, cluster: ControlPlane, model: str) -> dict:
    n = s.pick(60, 15)
    cases, plans = {}, {}
    for where, cp in (("box", box), ("cluster", cluster)):
        for tp in (1, 4):
            plan = plans[f"{where} tp{tp}"] = cp.plan(model, tensor_parallel_size=tp)
            cases[f"plan {where} tp{tp}"] = _plan_case(cp, model, tp, plan["max_model_len"], n)
            cases[f"choose {where} tp{tp}"] = _choice_case(cp, plan["booked_mib"] // tp, tp, n * 10)
    cycles = interleave(s.cycles, cases)
    shown = ("gpu_ids", "node", "booked_mib", "max_model_len")
    raw = {"cycles_s": cycles, "median_s": {k: median(v) for k, v in cycles.items()},
           "plans": {k: {f: v[f] for f in shown} for k, v in plans.items()},
           "engines_booked": {"box": len(box.engines()), "cluster": len(cluster.engines())}}
    return {"figures": figures(raw), "raw": raw}


def _plan_case(cp: ControlPlane, model: str, tp: int, length: int, n: int):
    return lambda: per_call(lambda: cp.plan(model, tensor_parallel_size=tp, max_model_len=length), n)


def _choice_case(cp: ControlPlane, need: int, tp: int, n: int):
    with cp.registry.snapshot() as txn:
        views = cp._views(txn)
    return lambda: per_call(lambda: choose_gpus(views, need, tp), n)


def figures(raw: dict) -> list[Figure]:
    m = {k: v * 1000 for k, v in raw["median_s"].items()}  # ms
    booked = raw["engines_booked"]
    figs = []
    for tp in (1, 4):
        value = m[f"plan cluster tp{tp}"]
        figs.append(Figure(f"ControlPlane.plan(), 16 GiB model on {tp} GPU(s), {NODES} nodes × {GPUS_PER_NODE} GPUs "
                           f"({booked['cluster']} engines booked)", value, m[f"plan box tp{tp}"], "ms", "ratio",
                           f"the same plan() on 1 box × {GPUS_PER_NODE} GPUs ({booked['box']} engines booked)",
                           "value < 50 ms", value < 50))
    for tp in (1, 4):
        figs.append(Figure(f"placement.choose_gpus alone, {tp} GPU(s), {NODES} × {GPUS_PER_NODE} GPUs",
                           m[f"choose cluster tp{tp}"] * 1000, m[f"choose box tp{tp}"] * 1000, "µs", "ratio",
                           f"the same choice over 1 × {GPUS_PER_NODE} GPUs"))
    return figs


def main(argv: list[str] | None = None) -> int:
    from .report import markdown
    from .run import _load, _mem_gib

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_placement", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls and cycles")
    ap.add_argument("--cycles", type=int, help="interleaved cycles (default 5; quick: 2)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue15-placement",
                    help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sage-bench-placement-"))
    s = Settings(quick=args.quick, cycles=args.cycles or (2 if args.quick else 5), workdir=work)
    t0 = time.time()
    command = "python -m benchmarks.bench_placement " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "quick" if args.quick else "full",
            "cycles": s.cycles, "python": sys.version.split()[0], "load_before": _load(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_mem_gib()} GiB RAM, "
                       f"{platform.system()} {platform.release()}"}
    try:
        res = run(s)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.time() - t0, 1)
    meta.update(total_s=res["seconds"], load_after=_load())
    for f in res["figures"]:
        print(f"{f.name}: {f.value:.4g} {f.unit} vs {f.baseline:.4g} -> x{f.compared:.3g} "
              f"{'' if f.met is None else ('met' if f.met else 'MISSED')}")
    res["figures"] = [f.to_json() for f in res["figures"]]
    results = {"placement": res}
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    md.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    title = "# sage_nb: placement over nodes (issue 15)"
    md.write_text(markdown(meta, results).replace("# sage_nb benchmarks", title, 1))
    print(f"wrote {md} and {js}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
