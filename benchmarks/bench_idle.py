"""Issue 12, idle engines: what a request for an idle engine costs beyond the engine's own wake.

(a) ``unloaded`` — real vLLM (CPU), the tiny Llama. Measured: the engine, created through a real
    ``jupyter server``'s REST API, unloaded (``POST .../sleep {"mode": "unload"}``); then the time from
    sending a streamed chat to the server's gateway until its first token (the gateway relaunches the
    engine and holds the request until it is ready). Baseline, same run, alternating: a cold
    ``ControlPlane.start_engine(tiny, wait=True)`` of the same model with the same flags, then the same
    streamed chat straight to the engine with its key; the time from the start call to the first
    token. Goal: unloaded / cold <= 1.05. Before either case no engine of the run is alive (the server's
    is unloaded) and the machine has been quiet for 1 s (waits up to 60 s for other users' work).
(b) ``sleeping`` — the stub engine emulating vLLM's sleep mode (``STUB_WAKE_MS``) on a fake GPU
    inventory (``--SageNBApp.fake_gpus``, ``--SageNBApp.sleep_mode=on``). Measured: one chat through the
    gateway to the engine while it sleeps (put to sleep through REST, untimed). Baseline: one chat
    through the gateway to the same engine awake, plus the engine's own wake time, measured on a
    separate stub of the same kind (``POST /sleep``, then ``POST /wake_up`` timed, with its key).
    Goal: the gateway adds <= 5 ms beyond the wake (median; p90 reported).

    .venv/bin/python -m benchmarks.bench_idle [--rounds 3] [--stub-rounds 20] [--only unloaded|sleeping]
                                              [--out benchmarks/results/issue12-idle] [--keep]

Writes ``OUT.md`` and ``OUT.json`` side by side; not part of ``benchmarks.run`` (the vLLM part is
~7 engine starts, 4-6 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_idle.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import (  # noqa: E402
    STUB_ENGINE,
    Figure,
    free_port,
    kill_group,
    median,
    ms,
    percentile,
    wait_healthy,
)
from .idle_support import (  # noqa: E402
    WAKE_MS,
    Rest,
    cmdline,
    first_token,
    quiet,
    request,
    start_sleepy_stub,
    stop_leftovers,
    stub_model_dir,
)
from .jserver import BASE, JServer  # noqa: E402
from .report import markdown  # noqa: E402

MAX_LEN = 2048  # both paths: the same model, the same flags
TINY = "tiny"
SLEEPY = "sleepy"
BOX = [{"name": "NVIDIA A100-SXM4-80GB", "total_mib": 81920, "used_mib": 0, "uuid": "GPU-bench-0"}]
CHAT_PATH = f"{BASE}sage_nb/v1/chat/completions"
UNLOADED_TITLE = "12a. Unloaded engine: request to first token (real vLLM, CPU)"
SLEEPING_TITLE = "12b. Sleeping engine: one chat through the gateway (stub, fake GPU)"


# --------------------------------------------------------------------------- (a) unloaded
def run_unloaded(work: Path, rounds: int) -> dict:
    from sage_nb.controlplane import ControlPlane

    from .bench_engines import tiny_model

    tiny = tiny_model()
    raw: dict = {"rounds": rounds, "cold": [], "unloaded": [], "cmdlines": {}}
    # the baseline's control plane: its own registry (only it watches its engine, as only the server
    # watches the server's), the server's defaults for everything else
    cp = ControlPlane(state_dir=work / "cold-state", port_range=(19400, 19499), use_nvml=False, fake_gpus=None,
                      adopt_unrecorded=False)
    server = JServer(work / "server", work / "state", ("--SageNBApp.adopt_unrecorded=False",))
    try:
        server.start()
        server.wait_up(120)
        rest = Rest(server)
        # created through the REST API; its first start also warms the page cache (torch, vLLM)
        e = rest.call("POST", "engines", {"model": tiny, "name": TINY, "max_model_len": MAX_LEN, "keep_alive": -1})
        engine_id = e["id"]
        e = rest.wait_state(engine_id, {"ready"}, 600, 0.25)
        raw["cmdlines"]["server"] = cmdline(e["pid"], e["port"])
        first_token(server.port, CHAT_PATH, rest.headers, TINY)  # the engine's first request, unmeasured

        def settle() -> dict:
            """Before either case: the server's engine unloaded (no engine of this run alive), and the
            machine quiet (up to ``QUIET_WAIT_S`` for other users' work to pass)."""
            if rest.engine(engine_id)["state"] != "unloaded":
                rest.call("POST", f"engines/{engine_id}/sleep", {"mode": "unload"})
                rest.wait_state(engine_id, {"unloaded"}, 60)
            return quiet()

        def cold() -> dict:
            before = settle()
            t0, w0 = time.perf_counter(), time.time()
            engine = cp.start_engine(tiny, name=TINY, max_model_len=MAX_LEN, wait=True)
            t_ready = time.perf_counter()
            if engine["state"] != "ready":
                raise RuntimeError(f"cold start: {engine['state']} {engine.get('error')}")
            raw["cmdlines"].setdefault("cold", cmdline(engine["pid"], engine["port"]))
            ft = first_token(engine["port"], "/v1/chat/completions",
                             {"Authorization": f"Bearer {cp.api_key(engine['id'])}"}, TINY)
            cp.stop_engine(engine["id"])
            cp.prune()  # the same name next round
            return {"total_s": ft["token"] - t0, "to_ready_s": engine["ready_at"] - w0,
                    "ready_to_token_s": ft["token"] - t0 - (engine["ready_at"] - w0),
                    "start_returned_s": t_ready - t0, "chunk_s": ft["chunk"] - t0, **before,
                    "load_after": os.getloadavg()[0]}

        def unloaded() -> dict:
            before = settle()
            w0 = time.time()
            ft = first_token(server.port, CHAT_PATH, rest.headers, TINY)
            e = rest.engine(engine_id)
            if e["state"] != "ready":
                raise RuntimeError(f"after the chat the engine is {e['state']}")
            raw["cmdlines"]["server-relaunched"] = cmdline(e["pid"], e["port"])
            return {"total_s": ft["token"] - ft["sent"], "to_ready_s": e["ready_at"] - w0,
                    "ready_to_token_s": ft["token"] - ft["sent"] - (e["ready_at"] - w0),
                    "chunk_s": ft["chunk"] - ft["sent"], **before, "load_after": os.getloadavg()[0]}

        cases = {"cold": cold, "unloaded": unloaded}
        for r in range(rounds):
            order = list(cases) if r % 2 == 0 else list(reversed(cases))
            for name in order:
                result = cases[name]()
                raw[name].append(result)
                print(f"   round {r + 1} {name}: {result['total_s']:.2f} s to the first token "
                      f"(ready after {result['to_ready_s']:.2f} s; waited {result['quiet_wait_s']:.0f} s for "
                      f"a quiet machine, others' CPU {result['others_cpu']:.0f}%)", flush=True)
    finally:
        server.stop()
        cp.stop_all()
        cp.close()
        stop_leftovers(work / "state")
    return {"figures": unloaded_figures(raw), "raw": raw}


def unloaded_figures(raw: dict) -> list[Figure]:
    cold, idle = raw["cold"], raw["unloaded"]
    if not cold or not idle:
        return []
    m = {name: {k: median([r[k] for r in runs]) for k in runs[0]}
         for name, runs in (("cold", cold), ("unloaded", idle))}
    lines = raw["cmdlines"]
    same = bool(lines.get("cold")) and lines.get("cold") == lines.get("server") == lines.get("server-relaunched")
    return [
        Figure("request to first token, unloaded engine (chat through the gateway)", m["unloaded"]["total_s"],
               m["cold"]["total_s"], "s", "ratio", "cold start_engine + chat direct", "<= 1.05x",
               m["unloaded"]["total_s"] / m["cold"]["total_s"] <= 1.05,
               note=f"medians of {len(idle)} / {len(cold)} rounds; per round (same round, unloaded / cold) "
                    f"{_paired(idle, cold)}x; unloaded "
                    f"{_seconds(idle)} s, cold {_seconds(cold)} s; engine command lines "
                    f"{'identical but the port' if same else 'DIFFER (see the json)'}"),
        Figure("of which: until the engine was ready", m["unloaded"]["to_ready_s"], m["cold"]["to_ready_s"], "s",
               "diff", "cold: start call to ready_at"),
        Figure("of which: ready to first token", m["unloaded"]["ready_to_token_s"], m["cold"]["ready_to_token_s"],
               "s", "diff", "cold: ready_at to first token",
               note="from the engine's ready_at (its supervisor's monitor saw it ready) to the first token: "
                    "the wait_ready poll (0.25 s) of start_engine or of the gateway's wake, then the chat (through "
                    f"the gateway, or direct); machine load (1 min) after the rounds: unloaded "
                    f"{_loads(idle)}, cold {_loads(cold)}; waited for a quiet machine before them: unloaded "
                    f"{_waits(idle)} s, cold {_waits(cold)} s"),
    ]


def _seconds(runs: list[dict]) -> str:
    return ", ".join(f"{r['total_s']:.2f}" for r in runs)


def _paired(idle: list[dict], cold: list[dict]) -> str:
    return ", ".join(f"{u['total_s'] / c['total_s']:.3f}" for u, c in zip(idle, cold, strict=False))


def _loads(runs: list[dict]) -> str:
    return ", ".join(f"{r['load_after']:.1f}" for r in runs)


def _waits(runs: list[dict]) -> str:
    return ", ".join(f"{r['quiet_wait_s']:.0f}" for r in runs)


def run_sleeping(work: Path, rounds: int) -> dict:
    import secrets

    raw: dict = {"rounds": rounds, "awake_ms": [], "sleeping_ms": [], "wake_ms": [], "server_wake_ms": [],
                 "cp_wake_ms": [], "probe_ms": []}
    args = ("--SageNBApp.adopt_unrecorded=False", f"--SageNBApp.fake_gpus={json.dumps(BOX)}",
            "--SageNBApp.sleep_mode=on",
            f"--SageNBApp.engine_env={json.dumps({'PYTHONPATH': STUB_ENGINE, 'STUB_WAKE_MS': str(WAKE_MS)})}")
    server = JServer(work / "stub-server", work / "stub-state", args)
    cp = None  # where the time goes: the control plane's part of a wake, timed in this process
    key, stub_port = secrets.token_urlsafe(16), free_port()
    stub = start_sleepy_stub(stub_port, key, work / "stub-direct" / "stub.log")
    try:
        server.start()
        server.wait_up(60)
        wait_healthy(stub_port)
        rest = Rest(server)
        e = rest.call("POST", "engines", {"model": stub_model_dir(work), "name": SLEEPY, "keep_alive": -1})
        engine_id = e["id"]
        e = rest.wait_state(engine_id, {"ready"}, 60)
        if not e.get("sleep_mode"):
            raise RuntimeError(f"the engine was not launched with sleep mode: {e}")
        from sage_nb.controlplane import ControlPlane
        from sage_nb.controlplane.engines import probes

        cp = ControlPlane(state_dir=work / "stub-state", monitor=False, adopt_unrecorded=False, fake_gpus=BOX,
                          use_nvml=False, sleep_mode="on")
        gw = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        direct = http.client.HTTPConnection("127.0.0.1", stub_port, timeout=60)
        auth = {"Authorization": f"Bearer {key}"}
        chat = {"model": SLEEPY, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}

        def gateway_chat() -> float:
            t0 = time.perf_counter()
            status, body = request(server.port, "POST", CHAT_PATH, rest.headers, chat, conn=gw)
            dt = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"gateway chat: {status} {body[:300]!r}")
            return dt

        def direct_wake() -> float:
            status, body = request(stub_port, "POST", "/sleep?level=1", auth, conn=direct)
            if status != 200:
                raise RuntimeError(f"stub /sleep: {status} {body[:200]!r}")
            t0 = time.perf_counter()
            status, body = request(stub_port, "POST", "/wake_up", auth, conn=direct)
            dt = time.perf_counter() - t0
            if status != 200:
                raise RuntimeError(f"stub /wake_up: {status} {body[:200]!r}")
            return dt

        for _ in range(3):  # warm the keep-alive connections and both paths
            gateway_chat()
        direct_wake()
        raw["quiet"] = quiet()
        for r in range(rounds):
            if r % 2:
                raw["wake_ms"].append(ms(direct_wake()))
            raw["awake_ms"].append(ms(gateway_chat()))
            rest.call("POST", f"engines/{engine_id}/sleep", {"mode": "sleep"})
            rest.wait_state(engine_id, {"sleeping"}, 30)
            w0 = time.time()
            raw["sleeping_ms"].append(ms(gateway_chat()))
            e = rest.engine(engine_id)
            raw["server_wake_ms"].append(ms(e["ready_at"] - w0))  # request sent -> the record said ready
            if r % 2 == 0:
                raw["wake_ms"].append(ms(direct_wake()))
            # the control plane's own wake (rebook, /wake_up, /is_sleeping, mark ready), no gateway
            rest.call("POST", f"engines/{engine_id}/sleep", {"mode": "sleep"})
            rest.wait_state(engine_id, {"sleeping"}, 30)
            t0 = time.perf_counter()
            cp.wake_engine(engine_id)
            raw["cp_wake_ms"].append(ms(time.perf_counter() - t0))
            t0 = time.perf_counter()  # one probe on a fresh connection, as the wake makes two
            probes.get("127.0.0.1", stub_port, "/is_sleeping", key)
            raw["probe_ms"].append(ms(time.perf_counter() - t0))
        gw.close()
        direct.close()
    finally:
        server.stop()
        kill_group(stub)
        if cp is not None:
            cp.close()
        stop_leftovers(work / "stub-state")
    return {"figures": sleeping_figures(raw), "raw": raw}


def sleeping_figures(raw: dict) -> list[Figure]:
    a, s, w = raw["awake_ms"], raw["sleeping_ms"], raw["wake_ms"]
    if not (a and s and w):
        return []
    over = [x - median(a) - median(w) for x in s]
    figs = [
        Figure("one chat to a sleeping engine through the gateway, median", median(s), median(a) + median(w), "ms",
               "diff", f"awake chat {median(a):.2f} ms + the stub's own wake {median(w):.1f} ms", "<= +5 ms",
               median(s) - median(a) - median(w) <= 5,
               note=f"{len(s)} rounds; the wake measured direct on a separate stub (POST /sleep, then "
                    f"POST /wake_up timed), median {median(w):.2f} ms, p90 {percentile(w, 90):.2f} ms "
                    f"(STUB_WAKE_MS={WAKE_MS}); the server's record said ready a median "
                    f"{median(raw['server_wake_ms']):.1f} ms after the request was sent"),
        Figure("one chat to a sleeping engine through the gateway, p90", percentile(s, 90), median(a) + median(w),
               "ms", "diff", "median awake chat + median wake", "(the goal is judged on the median)",
               note=f"per-request time beyond the medians of awake + wake: median {median(over):.2f} ms, "
                    f"p90 {percentile(over, 90):.2f} ms, max {max(over):.2f} ms; the awake chat's own tail "
                    f"beyond its median: p90 {percentile(a, 90) - median(a):.2f} ms, max {max(a) - median(a):.2f} ms"),
        Figure("one chat to the awake engine through the gateway", median(a), None, "ms",
               note=f"p90 {percentile(a, 90):.2f} ms"),
    ]
    cpw = raw.get("cp_wake_ms")
    if cpw:
        figs.append(Figure("where the time goes: ControlPlane.wake_engine in-process (no gateway)", median(cpw),
                           median(w), "ms", "diff", "the stub's own wake",
                           note=f"p90 {percentile(cpw, 90):.2f} ms; one /is_sleeping probe on a fresh connection "
                                f"(the wake sends /wake_up and /is_sleeping that way): median "
                                f"{median(raw['probe_ms']):.2f} ms; the rest of the gateway's added time is the "
                                "request's own path (the failed pick, the worker-thread hop, the router's re-read)"))
    return figs


# --------------------------------------------------------------------------- the command
def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_idle", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="cold and unloaded starts each, alternating (default 3)")
    ap.add_argument("--stub-rounds", type=int, default=20, help="sleeping/awake chats (default 20)")
    ap.add_argument("--only", choices=("unloaded", "sleeping"), action="append")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue12-idle",
                    help="writes OUT.md and OUT.json")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (server and engine logs)")
    args = ap.parse_args(argv)
    selected = args.only or ["sleeping", "unloaded"]
    work = Path(tempfile.mkdtemp(prefix="sage-bench-idle-"))
    t0 = time.time()
    command = "python -m benchmarks.bench_idle " + shlex.join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "full",
            "cycles": f"{args.rounds} cold/unloaded and {args.stub_rounds} stub", "load_before": _load(),
            "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"}
    results: dict = {}
    try:
        for name in selected:
            print(f"== {name}", flush=True)
            started = time.time()
            try:
                res = run_sleeping(work, args.stub_rounds) if name == "sleeping" \
                    else run_unloaded(work, args.rounds)
            except Exception as e:
                import traceback

                traceback.print_exc()
                res = {"figures": [], "error": f"{type(e).__name__}: {e}"}
            res["seconds"] = round(time.time() - started, 1)
            results[SLEEPING_TITLE if name == "sleeping" else UNLOADED_TITLE] = res
            for f in res["figures"]:
                print(f"   {f.name}: {f.value:.4g} vs {f.baseline if f.baseline is None else round(f.baseline, 4)} "
                      f"{f.unit} -> {f.compared if f.compared is None else round(f.compared, 4)} "
                      f"{'' if f.met is None else ('met' if f.met else 'MISSED')}", flush=True)
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    meta.update(total_s=time.time() - t0, load_after=_load())
    results = dict(sorted(results.items()))  # 12a before 12b
    for res in results.values():
        res["figures"] = [f.to_json() for f in res["figures"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    js.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    md.write_text(markdown(meta, results).replace("# sage_nb benchmarks", "# sage_nb: idle engines (issue 12)", 1))
    print(f"wrote {md} and {js}")
    return 1 if any(r.get("error") for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
