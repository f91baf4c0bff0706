"""The plots' data: what an engine's and a GPU's marks hold after an update is the series they were
given (stacked by owner for a GPU), plots come and go with engines, and the dashboard and
``%llm metrics`` feed them from the collector."""

import math

import numpy as np

from sage_nb.kernel.plots import EnginePlot, GpuPlot, MetricsPlots, summary_html

POINTS = [{"t": 1000.0, "running": 1, "waiting": 0, "kv_cache_pct": 5.0, "prompt_tps": None, "generation_tps": None},
          {"t": 1002.0, "running": 4, "waiting": 2, "kv_cache_pct": 40.0, "prompt_tps": 30.0, "generation_tps": 120.0}]


def test_an_engines_marks_hold_its_series():
    plot = EnginePlot("chat")
    plot.update(POINTS)
    assert list(plot.tokens.x.astype("int64")) == [1_000_000, 1_002_000]  # ms since the epoch
    prompt, generated = plot.tokens.y
    assert math.isnan(prompt[0]) and prompt[1] == 30.0 and generated[1] == 120.0
    assert list(plot.cache.y) == [5.0, 40.0] and list(plot.queue.y) == [0, 2]


def test_a_gpus_memory_is_stacked_by_owner_tallest_first():
    gpu = {"uuid": "GPU-0", "index": 0, "name": "L4", "total_mib": 23034,
           "points": [{"t": 1.0, "used_mib": 3000, "by": {"chat": 2000, "bob": 1000}},
                      {"t": 3.0, "used_mib": 5000, "by": {"chat": 2000, "bob": 2500, "other": 500}}]}
    plot = GpuPlot(gpu)
    plot.update(gpu)
    assert list(plot.area.labels) == ["other", "chat", "bob"]  # owners sorted, drawn tallest first
    assert np.array_equal(plot.area.y, [[3000, 5000], [3000, 4500], [1000, 2500]])
    assert plot.area.y[0][-1] == gpu["points"][-1]["used_mib"]


def test_plots_follow_the_engines_and_say_why_one_has_none():
    plots = MetricsPlots()
    plots.update([{"name": "a", "status": "ok", "points": POINTS},
                  {"name": "b", "status": "no metrics", "reason": "no metrics: the engine is sleeping",
                   "points": []}], None)
    assert list(plots.engines) == ["a"] and "sleeping" in plots.note.value
    first = plots.engines["a"]
    plots.update([{"name": "a", "status": "ok", "points": POINTS[1:]}], None)
    assert plots.engines["a"] is first and len(first.cache.y) == 0  # the same plot; one point: no line yet
    plots.update([], None)
    assert plots.engines == {} and plots.children == (plots.note,)


def test_the_summary_line_reads_the_window():
    series = {"status": "ok", "summary": {"seconds": 60.0, "ttft_p50_ms": 12.0, "ttft_p95_ms": 40.0,
                                          "itl_p50_ms": None, "itl_p95_ms": None, "prefix_hit_rate": 0.5,
                                          "finished": {"length": 3}}}
    text = summary_html(series)
    assert "TTFT p50 12 / p95 40 ms" in text and "inter-token p50 – / p95 – ms" in text
    assert "hits 50%" in text and "3 length" in text
    assert "sleeping" in summary_html({"status": "no metrics", "reason": "the engine is sleeping"})
