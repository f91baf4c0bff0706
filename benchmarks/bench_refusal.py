"""#4 Refusal: ``start_engine`` of a 70B Llama (config.json only, no weights) on a fake 2×24 GB box
raises ``Conflict`` at once, against vLLM, which fails only after a full start (the raw launch
time of the tiny model measured in #3 of this run, or measured here when #3 did not run).
The same on this machine without GPUs (the host-memory check: it needs more than the machine has),
and the README's ``Qwen/Qwen2.5-7B-Instruct`` offline (``HF_HUB_OFFLINE``: not on this machine)."""

from __future__ import annotations

import json
import time

from sage_nb.controlplane import BadRequest, Conflict, ControlPlane

from .common import Figure, Settings, median

LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "intermediate_size": 28672, "num_hidden_layers": 80, "num_attention_heads": 64,
             "num_key_value_heads": 8, "max_position_embeddings": 4096, "vocab_size": 32000,
             "torch_dtype": "bfloat16"}
BOX = [{"name": "NVIDIA GeForce RTX 4090", "total_mib": 24564, "used_mib": 1024, "uuid": f"GPU-bench-{i}"}
       for i in range(2)]


def refusals(s: Settings, model: str, error: type, state: str, **settings) -> tuple[list[float], str]:
    """Times of ``start_engine(model)`` refused with ``error``, and the refusal's message."""
    cp = ControlPlane(state_dir=s.workdir / "refusal" / state, monitor=False, use_nvml=False, **settings)
    times, message = [], ""
    try:
        for _ in range(s.pick(20, 5)):
            t0 = time.perf_counter()
            try:
                cp.start_engine(model, name="refused")
            except error as e:
                times.append(time.perf_counter() - t0)
                message = e.message
            else:
                raise AssertionError(f"{model} was not refused ({state})")
        left = cp.engines()
    finally:
        cp.close()
    if left:
        raise AssertionError(f"a refused launch left records: {left}")
    return times, message


def run(s: Settings) -> dict:
    model = s.workdir / "refusal" / "llama-70b"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(LLAMA_70B))
    times, message = refusals(s, str(model), Conflict, "gpu", fake_gpus=BOX)
    cpu_times, cpu_message = refusals(s, str(model), Conflict, "cpu")
    offline_times, offline_message = refusals(s, "Qwen/Qwen2.5-7B-Instruct", BadRequest, "offline",
                                              engine_env={"HF_HUB_OFFLINE": "1"})
    launch = s.shared.get("raw_launch_s")
    source = "raw vLLM launch of the tiny model until /health (#3, this run)"
    if launch is None:
        from .bench_engines import raw_launch_once

        launch, source = raw_launch_once(s), "raw vLLM launch of the tiny model until /health (measured here)"
    refusal_ms = median(times) * 1000
    figs = [Figure("start_engine refusal (70B on 2 × 24 GB)", refusal_ms, launch * 1000, "ms", "ratio", source,
                   "value < 100 ms", refusal_ms < 100, note=f"the refusal says: {message[:300]}")]
    for what, sample, said in (("70B on this machine without GPUs: host memory", cpu_times, cpu_message),
                               ("Qwen2.5-7B offline, without GPUs: not on this machine", offline_times,
                                offline_message)):
        ms = median(sample) * 1000
        figs.append(Figure(f"start_engine refusal ({what})", ms, launch * 1000, "ms", "ratio", source,
                           "value < 100 ms", ms < 100, note=f"the refusal says: {said[:300]}"))
    return {"figures": figs, "raw": {"refusal_s": times, "cpu_refusal_s": cpu_times, "offline_refusal_s": offline_times,
                                     "baseline_launch_s": launch, "message": message, "cpu_message": cpu_message,
                                     "offline_message": offline_message}}
