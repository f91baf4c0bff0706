"""The main job: JupyterLab on localhost with sage_nb enabled and the tutorials open.

``python -m sage_nb.lab [--port N] [extra jupyter lab args]`` prepares the default models
(the tiny Llama and the packaged MiniLM on CPU machines; on GPU machines it pre-fetches
``SAGE_NB_GPU_MODELS`` from the Hugging Face hub) and prints the URL with its token.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
from pathlib import Path

DEFAULT_GPU_MODELS = "Qwen/Qwen2.5-1.5B-Instruct,BAAI/bge-small-en-v1.5"


def free_port(start: int) -> int:
    for port in range(start, start + 100):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise SystemExit(f"no free port in {start}-{start + 99}")


def prepare_models() -> None:
    from sage_nb.controlplane.gpus import GpuInventory
    from sage_nb.testing.tinymodel import default_models_dir, make_tiny_llama, minilm_path

    print(f"sage_nb: tiny test model at {make_tiny_llama(default_models_dir() / 'tiny-llama')}")
    try:
        print(f"sage_nb: MiniLM embedder at {minilm_path()}")
    except RuntimeError as e:
        print(f"sage_nb: {e}")
    if GpuInventory().devices():
        try:
            from huggingface_hub import snapshot_download

            for model in os.environ.get("SAGE_NB_GPU_MODELS", DEFAULT_GPU_MODELS).split(","):
                print(f"sage_nb: fetching {model} ...", flush=True)
                snapshot_download(model.strip())
        except Exception as e:  # offline or gated: the tutorials still run on the tiny model
            print(f"sage_nb: could not pre-fetch GPU models ({e}); continuing")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_nb.lab", description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--notebooks", default=str(Path(__file__).resolve().parents[1] / "notebooks"))
    args, rest = parser.parse_known_args(argv)
    prepare_models()
    port = free_port(args.port)
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    url = f"http://127.0.0.1:{port}/lab/tree/01-quickstart.ipynb?token={token}"
    print(f"\nsage_nb: JupyterLab with the tutorials: {url}\n", flush=True)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={args.notebooks}",
           "--LabApp.default_url=/lab/tree/01-quickstart.ipynb", *rest]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
