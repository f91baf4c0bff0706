"""#8 Dashboard cost: CPU of a real IPython kernel running ``sage_nb.kernel.dashboard.Dashboard``'s
refresh loop (every 2 s, on the kernel's event loop, as in a notebook) and of the jupyter server
serving its polls, against the same kernel and server idle (refresh paused); interleaved windows."""

from __future__ import annotations

import secrets
import subprocess
import time

import psutil
from jupyter_client.manager import KernelManager

from .common import Figure, Settings, free_port, interleave, kill_group, median, start_stub, wait_healthy
from .jserver import TOKEN, JServer

SETUP = """
from sage_nb.kernel.client import Client
from sage_nb.kernel.dashboard import Dashboard
_dash = Dashboard(Client(url={url!r}, token={token!r}, embedded=False), interval=2.0, autostart=False)
_fetches, _fetch = [0], _dash.fetch
def _counted():
    _fetches[0] += 1
    return _fetch()
_dash.fetch = _counted  # to check that the loop really refreshed
print(repr(_dash))
"""


def execute(kc, code: str) -> str:
    msg_id = kc.execute(code)
    out = []
    while True:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "stream":
            out.append(msg["content"]["text"])
        elif msg["msg_type"] == "error":
            raise RuntimeError("\n".join(msg["content"]["traceback"]))
        elif msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return "".join(out)


def cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return t.user + t.system


def run(s: Settings) -> dict:
    work = s.workdir / "dashboard"
    state = (work / "state").resolve()
    port = free_port()
    stub = start_stub(port, "fast", work / "stub.log", key=secrets.token_urlsafe(8),
                      registry=str(state / "registry.sqlite3"))
    km, kc, server = None, None, JServer(work / "server", state)
    window = s.pick(20.0, 8.0)
    try:
        wait_healthy(port)
        server.start()
        server.wait_backends({"fast"})
        km = KernelManager(kernel_name="python3")
        km.start_kernel(cwd=str(work), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kc = km.client()
        kc.start_channels()
        kc.wait_for_ready(timeout=60)
        execute(kc, SETUP.format(url=server.url, token=TOKEN))
        kernel = psutil.Process(km.provisioner.process.pid)
        jserver = psutil.Process(server.proc.pid)

        def measure(refresh: bool):
            execute(kc, f"_dash.pause({not refresh})")
            time.sleep(1.0)  # let the state settle
            k0, s0, t0 = cpu(kernel), cpu(jserver), time.perf_counter()
            time.sleep(window)
            dt = time.perf_counter() - t0
            return 100 * (cpu(kernel) - k0) / dt, 100 * (cpu(jserver) - s0) / dt

        cycles = interleave(s.cycles, {"idle": lambda: measure(False), "refreshing": lambda: measure(True)})
        execute(kc, "_dash.pause(True)")
        snapshot = execute(kc, "print(repr(_dash))")
        fetches = int(execute(kc, "print(_fetches[0])"))
        expected = s.cycles * window / 2
        if fetches < 0.8 * expected:
            raise AssertionError(f"the dashboard refreshed {fetches} times, expected about {expected:.0f}")
    finally:
        if kc is not None:
            kc.stop_channels()
        if km is not None:
            km.shutdown_kernel(now=True)
        server.stop()
        kill_group(stub)
    k = {name: median([c[0] for c in v]) for name, v in cycles.items()}
    j = {name: median([c[1] for c in v]) for name, v in cycles.items()}
    figs = [Figure("kernel CPU with the dashboard refreshing every 2 s", k["refreshing"], k["idle"], "% of a core",
                   "diff", "the same kernel, refresh paused", "Δ < 1 % of a core", k["refreshing"] - k["idle"] < 1),
            Figure("server CPU serving the dashboard's polls", j["refreshing"], j["idle"], "% of a core", "diff",
                   "the same server, no polls", "Δ < 1 % of a core", j["refreshing"] - j["idle"] < 1)]
    return {"figures": figs, "raw": {"cycles_pct": cycles, "window_s": window, "refreshes": fetches,
                                    "dashboard_text": snapshot}}
