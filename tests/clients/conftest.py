"""The field's own clients against a real server: one jupyter server with the tiny Llama and the
MiniLM embedder for this whole package, and side venvs (tests/clients/sidevenv.py) that hold the
clients. The venvs install while the engines load."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from ..serverproc import TOKEN, running_server, wait_ready
from . import sidevenv

PORTS = (19100, 19149)
VENVS = ("langchain", "jupyter-ai")


@pytest.fixture(scope="package")
def side_venv_installs():
    """Each side venv, being made (or found) in the background."""
    with ThreadPoolExecutor(len(VENVS)) as pool:
        yield {name: pool.submit(sidevenv.ensure, name) for name in VENVS}


def ready_venv(future: Future) -> sidevenv.SideVenv:
    """The side venv, or the test fails with pip's log tail (never a skip: CI reaches PyPI)."""
    try:
        venv = future.result()
    except sidevenv.SideVenvError as e:
        pytest.fail(str(e), pytrace=False)
    if venv.install_s:
        print(f"side venv {venv.name}: made in {venv.install_s:.0f} s")
    return venv


@pytest.fixture(scope="package")
def gateway(tmp_path_factory, tiny_llama, minilm, tiny_adapters, side_venv_installs):
    """A real server with a ready tiny Llama (``tiny``, with the LoRA adapter ``jupyter`` that makes it answer
    "jupyter") and MiniLM (``minilm``), tokenizer routes open."""
    # The tokenizer routes are open, as vLLM's own are: `vllm bench serve` sends no key there. The
    # base URL is plain: vllm bench serve's aiohttp turns the suite's usual "/jp%40x/" into "/jp@x/",
    # which none of sage_nb's routes matches (tornado matches the raw path).
    with running_server(tmp_path_factory.mktemp("clients"), port_range=PORTS, base="/user/clients/",
                        extra_args=("--SageNBApp.open_tokenizer=True",)) as server:
        code, llm = server.request("POST", "sage_nb/api/engines", {
            "model": str(tiny_llama), "name": "tiny", "max_lora_rank": 8,
            "adapters": {"jupyter": str(tiny_adapters["jupyter"])}})
        assert code == 202, llm
        code, emb = server.request("POST", "sage_nb/api/engines",
                                   {"model": str(minilm), "kind": "embedding", "name": "minilm"})
        assert code == 202, emb
        server.engines = {"llm": wait_ready(server, llm["id"]), "emb": wait_ready(server, emb["id"])}
        server.token = TOKEN
        yield server


@pytest.fixture
def venv(request, side_venv_installs) -> sidevenv.SideVenv:
    """The side venv named by the test's parameter."""
    return ready_venv(side_venv_installs[request.param])
