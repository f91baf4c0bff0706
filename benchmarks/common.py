"""What every benchmark shares: figures, statistics, interleaved cycles and process helpers."""

from __future__ import annotations

import os
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUB_ENGINE = str(ROOT / "sage_nb" / "testing" / "stub_engine")  # the stub engine: vllm.entrypoints.openai.api_server
API_SERVER = "vllm.entrypoints.openai.api_server"
STREAM_PARTS, STREAM_GAP_MS = 8, 2  # the benchmarks' stub streams (the stub's own defaults suit the tests)
REGISTRY_ENV = "SAGE_NB_REGISTRY"  # a server whose registry differs never adopts such a process


@dataclass
class Figure:
    """One reported number: ``value`` against ``baseline`` (both measured in this run), as a
    difference (``mode="diff"``, value - baseline) or a ratio (``mode="ratio"``, value / baseline)."""

    name: str
    value: float
    baseline: float | None
    unit: str
    mode: str = "ratio"
    baseline_name: str = ""
    goal: str = ""
    met: bool | None = None
    note: str = ""
    compared: float | None = field(default=None)

    def __post_init__(self) -> None:
        if self.baseline is None:
            self.compared = None
        elif self.mode == "diff":
            self.compared = self.value - self.baseline
        else:
            self.compared = self.value / self.baseline if self.baseline else float("inf")

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Settings:
    quick: bool
    cycles: int
    workdir: Path
    shared: dict = field(default_factory=dict)  # results one benchmark hands to another

    def pick(self, full, quick):
        return quick if self.quick else full


def median(xs) -> float:
    return statistics.median(xs)


def percentile(xs, q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def interleave(cycles: int, cases: dict[str, Callable[[], object]]) -> dict[str, list]:
    """Run every case once per cycle, rotating the order each cycle; ``{name: [result per cycle]}``."""
    names = list(cases)
    out: dict[str, list] = {n: [] for n in names}
    for c in range(cycles):
        k = c % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(cases[name]())
    return out


def per_call(fn: Callable[[], object], n: int) -> float:
    """Median seconds of ``n`` single calls (after two warm-up calls)."""
    fn(), fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return median(times)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET without proxies; (0, b"") when nothing answers."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.02, what: str = "") -> float:
    """Poll ``check`` until true; the seconds it took (raises TimeoutError)."""
    t0 = time.perf_counter()
    while not check():
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError(f"not within {timeout:.0f} s: {what}")
        time.sleep(interval)
    return time.perf_counter() - t0


def spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """A child in its own session (killed by process group), output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:
        return subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=log.parent)


def kill_group(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    """TERM the child's process group, KILL it after ``grace`` seconds; reap the child."""
    if proc is None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            proc.poll()
            if not _group_alive(proc.pid):
                break
            time.sleep(0.05)
        else:
            continue
        break
    proc.poll()


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def start_stub(port: int, served: str, log: Path, *, key: str = "", registry: str = "",
               pooling: bool = False, env: dict | None = None) -> subprocess.Popen:
    """A fast stub engine with vLLM's command-line shape (adoptable by sage_nb's discovery); streams of
    ``STREAM_PARTS`` chunks ``STREAM_GAP_MS`` apart unless ``env`` sets ``STUB_STREAM_PARTS`` /
    ``STUB_STREAM_GAP_MS``."""
    cmd = [sys.executable, "-m", API_SERVER, "--model", f"/models/{served}", "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", served]
    if pooling:
        cmd += ["--runner", "pooling"]
    full_env = {**os.environ, "PYTHONPATH": STUB_ENGINE, "VLLM_API_KEY": key,
                "STUB_STREAM_PARTS": str(STREAM_PARTS), "STUB_STREAM_GAP_MS": str(STREAM_GAP_MS), **(env or {})}
    if registry:
        full_env[REGISTRY_ENV] = registry
    return spawn(cmd, full_env, log)


def wait_healthy(port: int, timeout: float = 60.0, interval: float = 0.02) -> float:
    return wait_until(lambda: http_get(f"http://127.0.0.1:{port}/health", timeout=2)[0] == 200,
                      timeout, interval, f"/health on port {port}")


def ms(seconds: float) -> float:
    return seconds * 1000.0


def installed_version(venv: Path, dist: str) -> str | None:
    """The version of ``dist`` in the side venv ``venv`` (``None`` when there is none)."""
    py = venv / "bin" / "python"
    if not py.exists():
        return None
    out = subprocess.run([str(py), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def ensure_side_venv(venv: Path, dist: str, requirement: str, version: str, log: Path) -> tuple[bool, str]:
    """``(usable, why_not)``: ``requirement`` (pinned to ``version``) installed into the side venv
    ``venv`` on first use, never into the project's own."""
    if installed_version(venv, dist) == version:
        return True, ""
    try:
        with open(log, "ab") as f:
            if not (venv / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                               stdout=f, stderr=subprocess.STDOUT, timeout=120)
                subprocess.run([str(venv / "bin" / "python"), "-m", "ensurepip"], check=True,
                               stdout=f, stderr=subprocess.STDOUT, timeout=300)
            subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", requirement],
                           check=True, stdout=f, stderr=subprocess.STDOUT, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"could not install {requirement} into {venv}: {e} (log: {log})"
    found = installed_version(venv, dist)
    return found == version, "" if found == version else f"installed {dist} is {found}, not {version}"
