"""vLLM's Rust router (``vllm-router`` on PyPI) as a reference gateway, in its own virtualenv.

``ensure()`` creates ``benchmarks/.venv-vllm-router`` with ``vllm-router==VERSION`` when it is
missing; ``start()`` runs the router in front of one upstream. The router has no auth of its own:
it passes the client's ``Authorization`` header through to the worker (a request without the
upstream's key gets the upstream's 401), so a client sends the upstream's key, as it does direct;
``--api-key`` is the key for the router's own calls to the worker.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from .common import ensure_side_venv, free_port, http_get, spawn

VERSION = "0.1.17"
VENV = Path(__file__).resolve().parent / ".venv-vllm-router"
BIN = VENV / "bin" / "vllm-router"


def ensure(log: Path) -> tuple[bool, str]:
    """``(usable, why_not)``; installs the pinned vllm-router into its side venv on first use."""
    return ensure_side_venv(VENV, "vllm-router", f"vllm-router=={VERSION}", VERSION, log)


def command(port: int, upstream_port: int, upstream_key: str) -> list[str]:
    """The router on ``port`` in front of one worker, with round-robin routing: with one worker every
    policy picks it, and round-robin is the cheapest (the default, ``cache_aware``, matches each prompt
    against a prefix tree first; in a trial on the fast stub it added about twice the p50 latency).
    Its Prometheus exporter goes on a free port (the default, 29000, may be taken)."""
    return [str(BIN), "--host", "127.0.0.1", "--port", str(port),
            "--worker-urls", f"http://127.0.0.1:{upstream_port}", "--policy", "round_robin",
            "--api-key", upstream_key, "--prometheus-host", "127.0.0.1", "--prometheus-port", str(free_port()),
            "--worker-startup-check-interval", "1", "--log-level", "warning"]


def start(port: int, upstream_port: int, upstream_key: str, workdir: Path) -> subprocess.Popen:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return spawn(command(port, upstream_port, upstream_key), env, workdir / "router.log")


def ready(port: int) -> bool:
    """``/readiness`` is 200 once the router has found its worker healthy."""
    return http_get(f"http://127.0.0.1:{port}/readiness", timeout=2)[0] == 200
