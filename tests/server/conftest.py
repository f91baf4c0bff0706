"""The server extension under pytest-jupyter, with a non-trivial base_url and auth required."""

import pytest

from sage_nb.controlplane import ControlPlane

from ..conftest import STUB_PATH
from ..serverproc import running_server


@pytest.fixture
def jp_base_url():
    return "/a%40b/"


@pytest.fixture
def fake_gpus():
    return ""


@pytest.fixture
def jp_server_config(state_dir, fake_gpus):
    return {
        "ServerApp": {"jpserver_extensions": {"sage_nb": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "SageNBApp": {"state_dir": str(state_dir), "engine_env": {"PYTHONPATH": STUB_PATH},
                      "health_interval": 0.2, "port_range": [18800, 18899], "fake_gpus": fake_gpus},
    }


@pytest.fixture
def cleanup_engines(state_dir):
    yield
    cp = ControlPlane(state_dir=state_dir, monitor=False)
    cp.stop_all()
    cp.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real jupyter server process with sage_nb and real engines, for the module (modules that need
    other settings define their own)."""
    with running_server(tmp_path_factory.mktemp("jupyter")) as srv:
        yield srv
