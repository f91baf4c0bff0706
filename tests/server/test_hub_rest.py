"""POST api/engines for models sized from the hub's metadata (a local hub): placed and booked, or
refused with the numbers (409), or a 400 whose message says what is wrong with the hub or model."""

import json

import pytest

from sage_nb.testing.hub import LocalHub

from ..conftest import BUSY_BOX, STUB_PATH
from ..controlplane.test_hub_sizing import MODELS
from .test_rest import call, error

pytestmark = pytest.mark.usefixtures("cleanup_engines", "online_hub")


@pytest.fixture(scope="module")
def hub():
    with LocalHub(MODELS) as hub:
        yield hub


@pytest.fixture
def jp_server_config(state_dir, hub, tmp_path):
    return {
        "ServerApp": {"jpserver_extensions": {"sage_nb": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "SageNBApp": {"state_dir": str(state_dir), "health_interval": 0.2, "port_range": [18800, 18899],
                      "fake_gpus": json.dumps(BUSY_BOX),
                      "engine_env": {"PYTHONPATH": STUB_PATH, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0",
                                     "HF_HOME": str(tmp_path / "hf")}},
    }


async def test_hub_models_over_rest(jp_fetch, hub):
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": "sage-test/made-up-70b"})
    assert code == 409 and "free: GPU0 22528 MiB, GPU1 81920 MiB" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": "sage-test/gated-403"})
    assert code == 400 and "is gated or private" in message and "hf auth login" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": "sage-test/nothing"})
    assert code == 400 and f"no model 'sage-test/nothing' on the hub at {hub.url} (404)" in message
    code, e = await call(jp_fetch, "api", "engines", method="POST", body={"model": "sage-test/made-up-34b"})
    assert code == 202 and e["gpu_ids"] == [1] and e["weights_mib"] == 40 * 1024 + 1
