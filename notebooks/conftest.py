"""nbval runs these tutorials against real CPU engines, through a real Jupyter server.

Before the first notebook's kernel starts, a jupyter server with sage_nb is started
and its URL and token are exported, so the tutorials' kernels talk to its gateway as
they would inside JupyterLab. Every notebook item carries the ``vllm`` marker.
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
