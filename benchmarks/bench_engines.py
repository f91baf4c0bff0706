"""Real CPU vLLM engines: #3 launch overhead (raw ``python -m vllm...`` until /health against
``ControlPlane.start_engine`` until ready, interleaved), then #2 chat and embeddings direct against
through the gateway, #7b embedding throughput, and #5 rediscovery of 2 real engines."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time

from sage_nb.controlplane import ControlPlane
from sage_nb.testing.tinymodel import default_models_dir, make_tiny_llama, minilm_path

from .common import (
    API_SERVER,
    REGISTRY_ENV,
    Figure,
    Settings,
    free_port,
    interleave,
    kill_group,
    median,
    ms,
    spawn,
    wait_healthy,
)
from .httpclient import Target, chat_body, latencies, throughput
from .jserver import BASE, TOKEN, JServer

MAX_LEN = 2048
BATCH = 16  # inputs per embeddings request in the throughput figure


def tiny_model() -> str:
    return str(make_tiny_llama(default_models_dir() / "tiny-llama"))


def raw_launch_once(s: Settings) -> float:
    """Seconds from ``python -m vllm.entrypoints.openai.api_server`` until /health answers 200."""
    port = free_port()
    cmd = [sys.executable, "-m", API_SERVER, "--model", tiny_model(), "--host", "127.0.0.1", "--port", str(port),
           "--served-model-name", "tiny-raw", "--max-model-len", str(MAX_LEN)]
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_API_KEY": "raw-key",
           REGISTRY_ENV: str(s.workdir / "no-registry")}  # no sage_nb of anyone adopts it
    t0 = time.perf_counter()
    proc = spawn(cmd, env, s.workdir / "engines" / f"raw-{port}.log")
    try:
        wait_healthy(port, timeout=900, interval=0.1)
        return time.perf_counter() - t0
    finally:
        kill_group(proc, grace=15)


def run(s: Settings) -> dict:
    selected = s.shared.get("selected", ["launch", "engines"])
    state = s.workdir / "engines" / "state"
    cp = ControlPlane(state_dir=state, port_range=(19700, 19799), use_nvml=False, fake_gpus=None)
    parts: dict = {}
    try:
        tiny = None
        if "launch" in selected:
            parts["launch"], tiny = launch(s, cp, keep="engines" in selected)
        if "engines" in selected:
            tiny = tiny or cp.start_engine(tiny_model(), name="tiny", max_model_len=MAX_LEN)
            emb = cp.start_engine(str(minilm_path()), kind="embedding", name="minilm")
            parts["engines"] = through_gateway(s, cp, tiny, emb, state)
    finally:
        for e in cp.engines():
            if e["state"] in ("starting", "ready", "stopping"):
                try:
                    cp.stop_engine(e["id"])
                except Exception as err:  # noqa: BLE001 - report, keep cleaning up
                    print(f"could not stop engine {e['name']}: {err}", file=sys.stderr)
        cp.prune()
        cp.close()
    return {"parts": parts}


def launch(s: Settings, cp: ControlPlane, keep: bool) -> tuple[dict, dict | None]:
    n = s.pick(2, 1)
    raw, managed, kept = [], [], None
    # warm-up, not measured: the first launch of a run reads torch and vLLM from a cold page cache,
    # and whichever side went first paid for it (cycle 1 starts with cp: 35.1 s vs 31.4 s raw, while
    # cycle 2 measured 30.05 s vs 30.23 s)
    raw_launch_once(s)
    for c in range(n):
        order = ["raw", "cp"] if (n - 1 - c) % 2 == 0 else ["cp", "raw"]  # the last cycle ends with cp
        for what in order:
            if what == "raw":
                raw.append(raw_launch_once(s))
                continue
            t0 = time.perf_counter()
            engine = cp.start_engine(tiny_model(), name="tiny", max_model_len=MAX_LEN)
            managed.append(time.perf_counter() - t0)
            if keep and c == n - 1:
                kept = engine
            else:
                cp.stop_engine(engine["id"])
                cp.prune()
    s.shared["raw_launch_s"] = median(raw)
    fig = Figure("ControlPlane.start_engine until ready (tiny Llama)", median(managed), median(raw), "s", "ratio",
                 "raw python -m vllm... until /health", "ratio <= 1.05", median(managed) / median(raw) <= 1.05)
    return {"figures": [fig], "raw": {"raw_launch_s": raw, "start_engine_s": managed}}, kept


def through_gateway(s: Settings, cp: ControlPlane, tiny: dict, emb: dict, state) -> dict:
    root = s.workdir / "engines"
    server = JServer(root / "server", state)
    server.start()
    try:
        server.wait_backends({"tiny", "minilm"}, timeout=120)
        gw = {"Authorization": f"token {TOKEN}"}

        def targets(engine: dict) -> list[Target]:
            key = {"Authorization": f"Bearer {cp.api_key(engine['id'])}"}
            return [Target("direct", "127.0.0.1", engine["port"], "/v1", key),
                    Target("sage_nb", "127.0.0.1", server.port, f"{BASE}sage_nb/v1", gw)]

        chat = chat_body("tiny", temperature=0, ignore_eos=True)  # always 8 tokens
        one = json.dumps({"model": "minilm", "input": "how do plants make food?"}).encode()
        batch = json.dumps({"model": "minilm", "input": [f"sentence number {i} about plants and light"
                                                         for i in range(BATCH)]}).encode()
        n_chat, n_emb, seconds = s.pick(20, 5), s.pick(30, 10), s.pick(4.0, 2.0)
        cases = {}
        for t in targets(tiny):
            cases[f"chat {t.name}"] = lambda t=t: ms(median(asyncio.run(latencies(t, "chat/completions", chat,
                                                                                  n_chat, warmup=3))))
        for t in targets(emb):
            cases[f"embed {t.name}"] = lambda t=t: ms(median(asyncio.run(latencies(t, "embeddings", one, n_emb,
                                                                                   warmup=3))))
            cases[f"embed rate {t.name}"] = lambda t=t: BATCH * asyncio.run(
                throughput(t, "embeddings", batch, 4, seconds))
        cycles = interleave(s.cycles, cases)
    finally:
        server.stop()
    m = {k: median(v) for k, v in cycles.items()}
    figs = [Figure("chat completion (8 tokens), c=1, through the gateway", m["chat sage_nb"], m["chat direct"], "ms",
                   "ratio", "direct to the engine"),
            Figure("embeddings (1 input), c=1, through the gateway", m["embed sage_nb"], m["embed direct"], "ms",
                   "ratio", "direct to the engine"),
            Figure(f"embedding throughput ({BATCH} inputs a request, c=4), through the gateway",
                   m["embed rate sage_nb"], m["embed rate direct"], "inputs/s", "ratio", "direct to the engine")]
    redis = rediscover_real(s, root, state)
    figs.append(Figure("rediscovery: server start until 2 real engines are backends", redis["engines"],
                       redis["empty"], "s", "diff", "server start until backends answers (no engines)",
                       "value <= 2 s", redis["engines"] <= 2.0))
    return {"figures": figs, "raw": {"cycles": cycles, "rediscovery_s": redis}}


def rediscover_real(s: Settings, root, state) -> dict:
    def restart(empty: bool) -> float:
        server = JServer(root / "server", root / "empty-state" if empty else state)
        server.start()
        try:
            return server.wait_up() if empty else server.wait_backends({"tiny", "minilm"})
        finally:
            server.stop()

    cycles = interleave(s.cycles, {"empty": lambda: restart(True), "engines": lambda: restart(False)})
    return {k: median(v) for k, v in cycles.items()} | {"cycles": cycles}
