"""The main job: JupyterLab on localhost with sage_nb enabled and the tutorials open.

``python -m sage_nb.lab [--port N] [--workdir DIR] [extra jupyter lab args]`` prepares the default
models (the tiny Llama and the packaged MiniLM on CPU machines; on GPU machines it pre-fetches
``SAGE_NB_GPU_MODELS`` from the Hugging Face hub), and serves a working copy of the tutorials, so
running and saving them never changes the tracked notebooks: ``my-tutorials/`` in the checkout
(ignored by git; ``SAGE_NB_TUTORIALS_DIR`` or ``--workdir`` elsewhere), made on the first run and
kept. Later runs add tutorials it lacks and leave the user's copies as they are. It prints the URL
with its token.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import socket
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]

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
    from sage_nb.controlplane.gpus.inventory import GpuInventory
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


def prepare_tutorials(source: Path, workdir: Path) -> list[str]:
    """Copy the tutorials that ``workdir`` lacks from ``source``; the ones there stay as the user left
    them. Returns the names copied."""
    if not source.is_dir():
        raise SystemExit(f"sage_nb: no tutorials at {source} (run from a checkout, or pass --notebooks DIR)")
    workdir.mkdir(parents=True, exist_ok=True)
    copied = []
    for notebook in sorted(source.glob("*.ipynb")):
        target = workdir / notebook.name
        if not target.exists():
            shutil.copy2(notebook, target)
            copied.append(notebook.name)
    return copied


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_nb.lab", description=__doc__)
    parser.add_argument("--port", type=int, default=8888)
    parser.add_argument("--notebooks", type=Path, default=CHECKOUT / "notebooks", help="the tutorials to copy")
    parser.add_argument("--workdir", type=Path, help="the working copy JupyterLab serves "
                        "(default: $SAGE_NB_TUTORIALS_DIR, else my-tutorials/ in the checkout)")
    args, rest = parser.parse_known_args(argv)
    workdir = args.workdir or Path(os.environ.get("SAGE_NB_TUTORIALS_DIR") or CHECKOUT / "my-tutorials")
    copied = prepare_tutorials(args.notebooks, workdir)
    print(f"sage_nb: tutorials in {workdir}" + (f" (copied {', '.join(copied)})" if copied else ""))
    prepare_models()
    port = free_port(args.port)
    token = os.environ.get("JUPYTER_TOKEN") or secrets.token_hex(24)
    url = f"http://127.0.0.1:{port}/lab/tree/01-quickstart.ipynb?token={token}"
    print(f"\nsage_nb: JupyterLab with the tutorials: {url}\n", flush=True)
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
           f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={workdir}",
           "--LabApp.default_url=/lab/tree/01-quickstart.ipynb", *rest]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        cmd.append("--allow-root")
    os.execv(sys.executable, cmd)


if __name__ == "__main__":
    main()
