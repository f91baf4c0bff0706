"""nbval runs these tutorials against real CPU engines, through a real Jupyter server.

Before the first notebook's kernel starts, a jupyter server with sage_nb is started
and its URL and token are exported, so the tutorials' kernels talk to its gateway as
they would inside JupyterLab. Every notebook item carries the ``vllm`` marker.

nbval runs with ``--nbval-lax``: outputs are not compared. A tutorial whose metadata says
``"sage_nb": {"every_cell_shows_output": true}`` is held to more: each of its code cells must show
something, and each dashboard it shows must list an engine. After a tutorial's last cell, the
engines it left running (for its reader to look at) are stopped, so the next one starts on an
empty server.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.serverproc import TOKEN, Server, free_port  # noqa: E402

_server: Server | None = None


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).endswith(".ipynb"):
            item.add_marker(pytest.mark.vllm)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    global _server
    if _server is not None or not str(item.fspath).endswith(".ipynb"):
        return
    root = Path(tempfile.mkdtemp(prefix="sage-nb-tutorials-"))
    _server = Server(root, root / "state", free_port(), port_range=(18700, 18749))
    _server.start()
    os.environ.update({"SAGE_NB_SERVER_URL": _server.url, "SAGE_NB_TOKEN": TOKEN,
                       "SAGE_NB_STATE_DIR": str(root / "state")})


def pytest_sessionfinish(session, exitstatus):
    if _server is None:
        return
    from sage_nb.controlplane import ControlPlane

    cp = ControlPlane(state_dir=_server.state_dir, monitor=False)
    for engine in cp.engines():
        if engine["state"] in ("starting", "ready", "stopping"):
            cp.stop_engine(engine["id"])
    cp.prune()
    if _server.proc.poll() is None:
        _server.kill()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    result = yield
    if str(item.fspath).endswith(".ipynb") and item.parent.nb.metadata.get("sage_nb", {}).get(
            "every_cell_shows_output"):
        check_shown(item.cell_num, item.cell.source, item.test_outputs or [])
    return result


def check_shown(cell_num: int, source: str, outputs: list) -> None:
    """A cell shows something (text, a table, a widget); a dashboard's text form lists an engine."""
    texts = [out.get("text") or "".join(str(v) for v in (out.get("data") or {}).values()) for out in outputs]
    if not any(t.strip() for t in texts):
        raise AssertionError(f"cell {cell_num} shows nothing: {source.strip()!r:.120}")
    for out in outputs:
        plain = (out.get("data") or {}).get("text/plain", "")
        if plain.startswith("sage_nb dashboard") and "no engines" in plain:
            raise AssertionError(f"cell {cell_num}: its dashboard lists no engine:\n{plain}")


def pytest_runtest_teardown(item, nextitem):
    if _server is None or not str(item.fspath).endswith(".ipynb"):
        return
    if nextitem is not None and nextitem.fspath == item.fspath:
        return
    from sage_nb.controlplane import ControlPlane

    cp = ControlPlane(state_dir=_server.state_dir, monitor=False)
    try:
        for engine in cp.engines():
            if engine["state"] in ("starting", "ready", "sleeping", "waking"):
                cp.stop_engine(engine["id"])
    finally:
        cp.close()
