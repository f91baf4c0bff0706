"""``%llm top`` in an embedded kernel: each engine's figures from its own /metrics, the window checked,
and ``--watch`` redrawing in a terminal until its rounds end."""

import time

import pytest
from IPython.core.error import UsageError

from sage_nb import client as default_client
from sage_nb.kernel.magics import watch

from ..conftest import STUB_PATH, shutdown
from .conftest import embedded_shell


@pytest.fixture
def counted_shell(state_dir, monkeypatch):
    sh, cl = embedded_shell(state_dir, monkeypatch, work_probe_interval=0, metrics_interval=0.2,
                            engine_env={"PYTHONPATH": STUB_PATH, "STUB_METRICS": "current"})
    yield sh, cl
    shutdown(cl)
    default_client.set_client(None)


def test_top_shows_what_each_engine_does_and_watch_redraws(counted_shell, model_dir, capsys):
    shell, cl = counted_shell
    shell.run_line_magic("llm", f"start {model_dir(1)} --name busy")
    assert cl.metrics()["collecting"]  # an embedded kernel collects from its first question on
    oa = cl.openai("llm")
    for _ in range(3):
        oa.chat.completions.create(model="busy", messages=[{"role": "user", "content": "hi"}])
    time.sleep(0.6)  # readings after the requests
    table = shell.run_line_magic("llm", "top --window 30")
    assert table.title.startswith("sage_nb top: the last 30s")
    (row,) = table.rows
    assert row[:5] == ["busy", "ready", "0", "0", "0.0%"] and row[7] != ""  # TTFT p50/p95 of the 3 requests
    series = cl.metrics("busy", window=30)
    assert series["totals"]["finished"] == {"length": 3} and series["totals"]["prompt_tokens"] == 12
    with pytest.raises(UsageError, match="window"):
        shell.run_line_magic("llm", "top --window soon")
    with pytest.raises(Exception, match="window must be a positive number of seconds"):
        cl.metrics(window=-1)
    capsys.readouterr()
    redraws = []
    watch(lambda: redraws.append(1) or table, table, 0.01, rounds=2)
    out = capsys.readouterr().out
    assert len(redraws) == 2 and out.count("\x1b[H\x1b[2J") == 2 and out.count("sage_nb top") == 3
