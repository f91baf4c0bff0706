"""The LiteLLM proxy as a reference gateway, in its own virtualenv (never in the project's .venv).

``ensure()`` creates ``benchmarks/.venv-litellm`` with ``litellm[proxy]==VERSION`` when it is
missing; ``start()`` runs the proxy with one uvicorn worker in front of one upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .common import spawn

VERSION = "1.108.7"
VENV = Path(__file__).resolve().parent / ".venv-litellm"
BIN = VENV / "bin" / "litellm"
KEY = "sk-bench-" + "5e1f" * 16  # the proxy's master key (it refuses to start without one)


def installed_version() -> str | None:
    py = VENV / "bin" / "python"
    if not BIN.exists() or not py.exists():
        return None
    out = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() or None


def ensure(log: Path) -> tuple[bool, str]:
    """``(usable, why_not)``; installs the pinned proxy into its side venv on first use."""
    if installed_version() == VERSION:
        return True, ""
    try:
        with open(log, "ab") as f:
            if not (VENV / "bin" / "python").exists():
                subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(VENV)], check=True,
                               stdout=f, stderr=subprocess.STDOUT, timeout=120)
                subprocess.run([str(VENV / "bin" / "python"), "-m", "ensurepip"], check=True,
                               stdout=f, stderr=subprocess.STDOUT, timeout=300)
            subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q",
                            f"litellm[proxy]=={VERSION}"], check=True, stdout=f, stderr=subprocess.STDOUT,
                           timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return False, f"could not install litellm[proxy]=={VERSION} into {VENV}: {e} (log: {log})"
    version = installed_version()
    return version == VERSION, "" if version == VERSION else f"installed litellm is {version}, not {VERSION}"


def start(port: int, upstream_port: int, upstream_key: str, served: str, workdir: Path) -> subprocess.Popen:
    """The proxy on ``port`` routing model ``served`` to an OpenAI-compatible upstream."""
    config = {
        "model_list": [{"model_name": served, "litellm_params": {
            "model": f"openai/{served}", "api_base": f"http://127.0.0.1:{upstream_port}/v1",
            "api_key": upstream_key}}],
        "litellm_settings": {"drop_params": True, "turn_off_message_logging": True, "request_timeout": 600},
        "general_settings": {"disable_spend_logs": True, "master_key": KEY},
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "litellm.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR",
           "NO_DOCS": "True", "DISABLE_ADMIN_UI": "True"}
    env.pop("PYTHONPATH", None)
    return spawn([str(BIN), "--config", str(path), "--host", "127.0.0.1", "--port", str(port),
                  "--num_workers", "1"], env, workdir / "litellm.log")
