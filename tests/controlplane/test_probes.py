"""Work probes: an engine that answers /health but completes no request is caught; a busy one is not."""

import time

from sage_nb.controlplane import BadRequest, ControlPlane
from sage_nb.controlplane.engines.probes import OK, STUCK, progress, run_probe

from ..conftest import STUB_PATH, wait_for

FAST = {"work_probe_interval": 0.3, "work_probe_timeout": 0.6, "health_failures": 2}


def test_engine_that_completes_nothing_is_failed(stub_cp, model_dir):
    cp = stub_cp(engine_env={"PYTHONPATH": STUB_PATH, "STUB_HANG": "1"}, **FAST)
    e = cp.start_engine(str(model_dir(1)), name="hangs")
    assert run_probe(e["host"], e["port"], "llm", "hangs", cp.api_key(e["id"]), 0.5) == STUCK
    # /health keeps answering 200 the whole time; only the work probes see the hang
    wait_for(lambda: cp.registry.find("hangs").health_failures >= 1, timeout=10)
    assert cp.backends()["llm_backends"] == []  # unrouted from the first stuck probe
    failed = wait_for(lambda: (x := cp.engine("hangs"))["state"] == "failed" and x, timeout=10)
    assert "work probes (a 1-token request) got no answer" in failed["error"]


def test_busy_engine_making_progress_is_left_alone(stub_cp, model_dir):
    # every request is slow, but the engine's own progress counters move: busy, not hung
    cp = stub_cp(engine_env={"PYTHONPATH": STUB_PATH, "STUB_BUSY": "1"}, **FAST)
    e = cp.start_engine(str(model_dir(1)), name="busy")
    assert progress(e["host"], e["port"], None, 2.0) is not None
    assert run_probe(e["host"], e["port"], "llm", "busy", cp.api_key(e["id"]), 0.5) == OK
    time.sleep(3)  # several probe windows
    engine = cp.engine("busy")
    assert engine["state"] == "ready" and cp.registry.find("busy").health_failures == 0


def test_answering_engine_passes_and_probes_can_be_off(stub_cp, model_dir):
    cp = stub_cp(**FAST)
    e = cp.start_engine(str(model_dir(1)), name="fine", kind="embedding")
    assert run_probe(e["host"], e["port"], "embedding", "fine", cp.api_key(e["id"]), 2.0) == OK
    assert progress(e["host"], e["port"], None, 2.0) is None  # the plain stub has no /metrics
    time.sleep(1.5)
    assert cp.registry.find("fine").health_failures == 0
    off = ControlPlane(state_dir=cp.settings.state_dir, monitor=False, work_probe_interval=0)
    assert off.settings.work_probe_interval == 0
    off.close()


def test_bad_work_probe_settings_are_refused(state_dir):
    for bad in ({"work_probe_interval": -1}, {"work_probe_timeout": 0}):
        try:
            ControlPlane(state_dir=state_dir, monitor=False, **bad)
        except BadRequest as e:
            assert "work_probe" in e.message
        else:
            raise AssertionError(f"{bad} accepted")
