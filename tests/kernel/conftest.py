"""The kernel tests' IPython shell: sage_nb's magics loaded, an embedded client over stub engines."""

import pytest
from IPython.core.interactiveshell import InteractiveShell

from sage_nb import client as default_client
from sage_nb.kernel.client import Client

from ..conftest import STUB_PATH, shutdown


def embedded_shell(state_dir, monkeypatch, **settings) -> tuple[InteractiveShell, Client]:
    """An IPython shell with sage_nb's magics over an embedded client of stub engines (``settings``:
    the client's control-plane settings, over the defaults here)."""
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.delenv("SAGE_NB_SERVER_URL", raising=False)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "sage_nb")
    settings = {"engine_env": {"PYTHONPATH": STUB_PATH}, "port_range": (18300, 18399), "adopt_unrecorded": False,
                "health_interval": 0.2, **settings}
    cl = Client(state_dir=state_dir, **settings)
    assert cl.mode == "embedded" and "no Jupyter server" in cl.why_embedded
    default_client.set_client(cl)
    sh.magics_manager.registry["LLMMagics"]._client = None
    return sh, cl


@pytest.fixture
def shell(state_dir, monkeypatch):
    sh, cl = embedded_shell(state_dir, monkeypatch)
    yield sh
    shutdown(cl)
    default_client.set_client(None)
