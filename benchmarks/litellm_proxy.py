"""The LiteLLM proxy as a reference gateway, in its own virtualenv (never in the project's .venv).

``ensure()`` creates ``benchmarks/.venv-litellm`` with ``litellm[proxy]==VERSION`` when it is
missing; ``start()`` runs the proxy with one uvicorn worker in front of one upstream.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

from .common import ensure_side_venv, spawn

VERSION = "1.108.7"
VENV = Path(__file__).resolve().parent / ".venv-litellm"
BIN = VENV / "bin" / "litellm"
KEY = "sk-bench-" + "5e1f" * 16  # the proxy's master key (it refuses to start without one)


def ensure(log: Path) -> tuple[bool, str]:
    """``(usable, why_not)``; installs the pinned litellm into its side venv on first use."""
    return ensure_side_venv(VENV, "litellm", f"litellm[proxy]=={VERSION}", VERSION, log)


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
