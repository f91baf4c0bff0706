"""The metrics routes through a real jupyter_server: engines' series (the stub counts what it answered),
GPU memory over time, bad windows, and sage_nb's own metrics in Prometheus' format, parsed back with
prometheus_client's parser."""

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tornado.httpclient import HTTPClientError

from ..conftest import BUSY_BOX, STUB_PATH
from .test_rest import call, error, wait_state

pytestmark = pytest.mark.usefixtures("cleanup_engines")


@pytest.fixture
def jp_server_config(jp_server_config):
    jp_server_config["SageNBApp"].update(metrics_interval=0.3, work_probe_interval=0,
                                         engine_env={"PYTHONPATH": STUB_PATH, "STUB_METRICS": "current"})
    return jp_server_config


async def collected(jp_fetch, name, predicate, timeout=10.0):
    series = None
    for _ in range(int(timeout / 0.1)):
        try:
            code, series = await call(jp_fetch, "api", "metrics", "engines", name, params={"window": "60"})
        except HTTPClientError as e:  # 404 until the collector has seen the engine
            assert e.code == 404
        else:
            if predicate(series):
                return series
        await asyncio.sleep(0.1)
    raise AssertionError(f"metrics of {name} never matched: {series}")


@pytest.mark.parametrize("fake_gpus", [json.dumps(BUSY_BOX)])
async def test_series_over_rest_count_what_the_client_received_and_prometheus_parses_back(jp_fetch, model_dir):
    _, e = await call(jp_fetch, "api", "engines", method="POST",
                      body={"model": str(model_dir(1)), "name": "counted", "max_model_len": 1024})
    await wait_state(jp_fetch, e["id"])
    await collected(jp_fetch, "counted", lambda s: s["status"] == "ok")
    received = {"prompt": 0, "completion": 0}
    for _ in range(4):
        code, reply = await call(jp_fetch, "v1", "chat", "completions", method="POST",
                                 body={"model": e["served_model_name"], "messages": [{"role": "user", "content": "x"}]})
        assert code == 200
        received["prompt"] += reply["usage"]["prompt_tokens"]
        received["completion"] += reply["usage"]["completion_tokens"]
    series = await collected(jp_fetch, "counted", lambda s: (s["summary"].get("finished") or {}).get("length") == 4)
    assert series["summary"]["prompt_tokens"] == received["prompt"]
    assert series["summary"]["generation_tokens"] == received["completion"]
    assert series["collecting"] and series["interval_s"] == 0.3 and series["points"][-1]["running"] == 0.0
    assert any(p["generation_tps"] for p in series["points"] if p["generation_tps"] is not None)

    code, overview = await call(jp_fetch, "api", "metrics", params={"window": "60"})
    assert code == 200 and [row["name"] for row in overview["engines"]] == ["counted"]

    code, gpus = await call(jp_fetch, "api", "metrics", "gpus", params={"window": "60"})
    assert code == 200 and [g["index"] for g in gpus["gpus"]] == [0, 1]
    last = gpus["gpus"][0]["points"][-1]  # the engine (booked there; the fake GPU shows it using nothing)
    assert last["used_mib"] == BUSY_BOX[0]["used_mib"]  # and 58 GiB no engine or process explains
    assert last["by"] == {"counted": 0, "other": BUSY_BOX[0]["used_mib"]}

    code, message = await error(jp_fetch, "api", "metrics", "engines", "counted", params={"window": "nope"})
    assert code == 400 and "window must be a number of seconds" in message
    code, message = await error(jp_fetch, "api", "metrics", "engines", "missing")
    assert code == 404 and "missing" in message
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": str(model_dir(140))})
    assert code == 409

    resp = await jp_fetch("sage_nb", "metrics")
    assert resp.code == 200 and resp.headers["Content-Type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(resp.body.decode())}
    requests = {(s.labels["engine"], s.labels["route"], s.labels["status"]): s.value
                for s in families["sage_nb_gateway_requests"].samples if s.name.endswith("_total")}
    assert requests[("counted", "v1/chat/completions", "200")] == 4
    count = next(s.value for s in families["sage_nb_gateway_request_duration_seconds"].samples
                 if s.name.endswith("_count") and s.labels["engine"] == "counted")
    assert count == 4
    refusals = {s.labels["status"]: s.value for s in families["sage_nb_start_refusals"].samples
                if s.name.endswith("_total")}
    assert refusals == {"409": 1}
    ready = {(s.labels["state"], s.labels["kind"]): s.value for s in families["sage_nb_engines"].samples}
    assert ready[("ready", "llm")] == 1 and ready[("failed", "llm")] == 0
    booked = {s.labels["gpu"]: s.value for s in families["sage_nb_gpu_memory_booked_bytes"].samples}
    assert set(booked) == {"0", "1"} and max(booked.values()) > 0
    running = {s.labels["engine"]: s.value for s in families["sage_nb_engine_requests_running"].samples}
    assert running == {"counted": 0.0}


async def test_the_prometheus_route_needs_the_servers_token(jp_fetch):
    with pytest.raises(HTTPClientError) as exc:
        await jp_fetch("sage_nb", "metrics", headers={"Authorization": ""})
    assert exc.value.code in (401, 403)
