"""An engine that dies while a request is in flight: the caller gets a clear 504, never a hang."""

import asyncio
import os
import signal
import time

import pytest

from ..conftest import STUB_PATH
from .test_gateway import start
from .test_rest import error

pytestmark = pytest.mark.usefixtures("cleanup_engines")


@pytest.fixture
def jp_server_config(state_dir):
    return {
        "ServerApp": {"jpserver_extensions": {"sage_nb": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "SageNBApp": {"state_dir": str(state_dir), "port_range": [18850, 18899], "health_interval": 0.2,
                      "work_probe_interval": 0.5, "work_probe_timeout": 1.0,
                      "engine_env": {"PYTHONPATH": STUB_PATH, "STUB_HANG": "1"}},
    }


async def test_hung_engine_is_unrouted_and_its_request_gets_504(jp_fetch, jp_serverapp, model_dir):
    engine = await start(jp_fetch, model_dir(1), name="hangs")
    router = jp_serverapp.web_app.settings["sage_nb_router"]
    pending = asyncio.ensure_future(error(jp_fetch, "v1", "chat", "completions", method="POST",
                                          body={"messages": []}, request_timeout=60))
    await asyncio.sleep(0.5)
    assert not pending.done() and sum(router.inflight.values()) == 1  # the engine never answers
    t0 = time.monotonic()
    os.kill(engine["pid"], signal.SIGSTOP)  # hung: health probes now time out
    try:
        code, message = await pending
        assert code == 504 and "'hangs' stopped being ready" in message, message
        assert time.monotonic() - t0 < 8
        assert not any(router.inflight.values())
        code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST", body={"messages": []})
        assert code == 503  # no longer routed to
    finally:
        os.kill(engine["pid"], signal.SIGCONT)


async def test_engine_answering_health_but_completing_nothing_gets_504(jp_fetch, jp_serverapp, model_dir):
    # no SIGSTOP: /health keeps answering 200, only real requests hang (like a stuck EngineCore)
    await start(jp_fetch, model_dir(1), name="stuck")
    router = jp_serverapp.web_app.settings["sage_nb_router"]
    t0 = time.monotonic()
    code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST", body={"messages": []},
                                request_timeout=60)
    assert code == 504 and "'stuck' stopped being ready" in message, message
    assert time.monotonic() - t0 < 10  # work probe timeout + health passes, far below request_timeout
    assert not any(router.inflight.values())
    code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST", body={"messages": []})
    assert code == 503


async def test_engine_dying_mid_request_is_a_clear_502(jp_fetch, jp_serverapp, model_dir):
    engine = await start(jp_fetch, model_dir(1), name="dies")
    pending = asyncio.ensure_future(error(jp_fetch, "v1", "chat", "completions", method="POST",
                                          body={"messages": []}, request_timeout=60))
    await asyncio.sleep(0.5)
    os.kill(engine["pid"], signal.SIGKILL)
    code, message = await pending
    assert code in (502, 504) and "'dies'" in message
    assert not any(jp_serverapp.web_app.settings["sage_nb_router"].inflight.values())
