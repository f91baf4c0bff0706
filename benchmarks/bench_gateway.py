"""#1 Gateway overhead: one fast stub upstream reached directly, through sage_nb's gateway, a bare
tornado proxy, vLLM's Rust router and the LiteLLM proxy, with the same keep-alive client, interleaved
cycles."""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys

from . import litellm_proxy, vllm_router
from .common import (
    ROOT,
    Figure,
    Settings,
    free_port,
    http_get,
    kill_group,
    median,
    ms,
    percentile,
    spawn,
    start_stub,
    wait_healthy,
    wait_until,
)
from .httpclient import Target, chat_body, latencies, stream_timings, throughput
from .jserver import BASE, TOKEN, JServer

SERVED = "fast"
STREAM_PARTS, STREAM_GAP_MS = 4, 2  # chunks per stream, and ms between them


def run(s: Settings) -> dict:
    work = s.workdir / "gateway"
    state = (work / "state").resolve()
    key = secrets.token_urlsafe(16)
    stub_port, procs, server = free_port(), [], None
    raw: dict = {"skipped": {}}
    try:
        procs.append(start_stub(stub_port, SERVED, work / "stub.log", key=key,
                                registry=str(state / "registry.sqlite3"),
                                env={"STUB_STREAM_PARTS": str(STREAM_PARTS),
                                     "STUB_STREAM_GAP_MS": str(STREAM_GAP_MS)}))
        wait_healthy(stub_port)
        server = JServer(work / "server", state)
        server.start()
        server.wait_backends({SERVED})  # adopted by discovery
        bare_port = free_port()
        procs.append(spawn([sys.executable, "-m", "benchmarks.tornado_proxy", str(bare_port), str(stub_port), key],
                           {**os.environ, "PYTHONPATH": str(ROOT)}, work / "bare" / "proxy.log"))
        wait_healthy(bare_port)
        targets = [Target("direct", "127.0.0.1", stub_port, "/v1", {"Authorization": f"Bearer {key}"}),
                   Target("sage_nb", "127.0.0.1", server.port, f"{BASE}sage_nb/v1",
                          {"Authorization": f"token {TOKEN}"}),
                   Target("bare tornado", "127.0.0.1", bare_port, "/v1", {})]
        # the router passes the client's key through to the stub; LiteLLM checks its own master key
        _add_peer(targets, procs, raw, "vllm-router", vllm_router.ensure, work / "vllm-router-install.log",
                  lambda port: vllm_router.start(port, stub_port, key, work / "vllm-router"),
                  vllm_router.ready, 60, work / "vllm-router" / "router.log", key)
        _add_peer(targets, procs, raw, "litellm", litellm_proxy.ensure, work / "litellm-install.log",
                  lambda port: litellm_proxy.start(port, stub_port, key, SERVED, work / "litellm"),
                  lambda port: http_get(f"http://127.0.0.1:{port}/health/liveliness")[0] == 200, 180,
                  work / "litellm" / "litellm.log", litellm_proxy.KEY)
        raw.update(_run_async(_measure(s, targets)))
    finally:
        if server:
            server.stop()
        for p in procs:
            kill_group(p)
    return {"figures": figures(raw), "raw": raw}


def _add_peer(targets: list[Target], procs: list, raw: dict, name: str, ensure, install_log, start, ready,
              timeout: float, log, client_key: str) -> None:
    """Install (first use), start and await a peer gateway in its side venv and add it to ``targets``;
    when it cannot install or start, ``raw["skipped"][name]`` says why and the run goes on without it."""
    try:
        ok, why = ensure(install_log)
        if ok:
            port = free_port()
            proc = start(port)
            procs.append(proc)
            wait_until(lambda: proc.poll() is not None or ready(port), timeout, 0.1, f"{name} up")
            if proc.poll() is not None:
                ok, why = False, f"{name} exited with status {proc.returncode} (log: {log})"
            else:
                targets.append(Target(name, "127.0.0.1", port, "/v1", {"Authorization": f"Bearer {client_key}"}))
    except (OSError, subprocess.SubprocessError, TimeoutError) as e:
        ok, why = False, f"{name} did not start: {e} (log: {log})"
    if not ok:
        raw["skipped"][name] = why


def _run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _measure(s: Settings, targets: list[Target]) -> dict:
    n_lat = s.pick(2000, 400)
    n_stream = s.pick(150, 40)
    seconds = s.pick(3.0, 1.5)
    body, sbody = chat_body(SERVED), chat_body(SERVED, stream=True)
    out = {t.name: {"p50": [], "p99": [], "rps": [], "ttfc": [], "delay": [], "gap": []} for t in targets}
    for t in targets:  # warm every path (connection pools, first-request costs)
        await latencies(t, "chat/completions", body, 50, warmup=0)
        await stream_timings(t, sbody, 5, warmup=0)
    for cycle in range(s.cycles):
        order = targets[cycle % len(targets):] + targets[:cycle % len(targets)]
        for t in order:
            # LiteLLM is ~50x slower: fewer samples keep the run short (p99 from >= 100)
            n = n_lat if t.name != "litellm" else max(100, n_lat // 10)
            lat = await latencies(t, "chat/completions", body, n)
            out[t.name]["p50"].append(ms(median(lat)))
            out[t.name]["p99"].append(ms(percentile(lat, 99)))
        for t in order:
            out[t.name]["rps"].append(await throughput(t, "chat/completions", body, 32, seconds))
        for t in order:
            streams = await stream_timings(t, sbody, n_stream if t.name != "litellm" else n_stream // 2)
            for key, values in streams.items():
                out[t.name][key].append(ms(median(values)))
    return {"cycles": out, "medians": {name: {k: median(v) for k, v in m.items()} for name, m in out.items()}}


def figures(raw: dict) -> list[Figure]:
    m = raw.get("medians", {})
    d = m.get("direct")
    if not d:
        return []
    figs = []
    # the project's goals (docs/design.md), judged here; the looser and stretch bars are in the labels
    goals = {"sage_nb": {"p50": ("<= +0.5 ms", 0.5), "p99": ("<= +1 ms (looser bar: +2 ms)", 1.0),
                         "ttfc": ("<= +0.7 ms", 0.7), "rps": (">= 0.2x (stretch: 0.8x)", 0.2)}}
    for name in ("sage_nb", "bare tornado", "vllm-router", "litellm"):
        g = m.get(name)
        if not g:
            continue
        goal = goals.get(name, {})
        for key, label in (("p50", "added p50 latency, c=1"), ("p99", "added p99 latency, c=1"),
                           ("ttfc", "added time to first chunk (stream)"),
                           ("delay", "added mean delay of a chunk (stream)"),
                           ("gap", "added largest inter-chunk gap (stream)")):
            text, limit = goal.get(key, ("", None))
            figs.append(Figure(f"{name}: {label}", g[key], d[key], "ms", "diff", "direct", text,
                               None if limit is None else g[key] - d[key] <= limit))
        text, limit = goal.get("rps", ("", None))
        figs.append(Figure(f"{name}: throughput at c=32", g["rps"], d["rps"], "req/s", "ratio", "direct", text,
                           None if limit is None else g["rps"] / d["rps"] >= limit))
    for ref, label in (("litellm", "LiteLLM"), ("bare tornado", "the bare tornado proxy"),
                       ("vllm-router", "vLLM's router")):
        if "sage_nb" in m and ref in m:
            for key in ("p50", "p99", "ttfc"):
                figs.append(Figure(f"sage_nb's added {key} as a fraction of {label}'s", m["sage_nb"][key] - d[key],
                                   m[ref][key] - d[key], "ms", "ratio", f"{label}'s added {key}"))
            figs.append(Figure(f"sage_nb's c=32 throughput vs {label}'s", m["sage_nb"]["rps"], m[ref]["rps"],
                               "req/s", "ratio", label))
    return figs
