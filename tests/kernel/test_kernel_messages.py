"""What the kernel says when something goes wrong, on a real IPython shell over stub engines: a failed
engine in one line with where its log is, a start's progress line ending in "failed" (refused, or failed
while loading), a missing engine pointing at ``%llm engines``, ``%llm prune`` keeping other notebooks'
records and saying so, and ``%llm doctor`` asking no fix on a machine without GPUs."""

import pytest

from sage_nb import client as default_client
from sage_nb.controlplane import EngineFailed
from sage_nb.kernel import client as client_module
from sage_nb.kernel import doctor
from sage_nb.kernel import magics as magics_module
from sage_nb.kernel.client import Client
from sage_nb.kernel.magics import SageNBError
from sage_nb.kernel.views import one_line

from ..conftest import shutdown

KID = "5f0c7e0e-3a5d-4a31-9b8e-0e4c2f1d9a77"
OTHER = "0c1d2e3f-0000-4000-8000-000000000001"
CRASH = """#!/bin/sh
echo "INFO launching the engine"
echo "Traceback (most recent call last):" >&2
echo '  File "/x/api_server.py", line 1, in <module>' >&2
echo "OSError: We couldn't connect to 'https://huggingface.co' to load the files" >&2
exit 1
"""


def llm(shell, line):
    return shell.run_line_magic("llm", line)


@pytest.fixture
def shown(shell, monkeypatch):
    """What the shell displays: each output's text, by display id (updates replace it)."""
    outputs: dict = {}

    def publish(data, metadata=None, source=None, *, transient=None, update=False, **kw):
        key = (transient or {}).get("display_id") or len(outputs)
        outputs[key] = data.get("text/plain", "")

    monkeypatch.setattr(shell.display_pub, "publish", publish)
    return outputs


@pytest.fixture
def crashing(shell, state_dir, tmp_path):
    """The shell's client over an "interpreter" whose engine prints a traceback and exits 1 while loading."""
    script = tmp_path / "python"
    script.write_text(CRASH)
    script.chmod(0o755)
    cl = Client(embedded=True, state_dir=state_dir, engine_python=str(script), port_range=(18550, 18559),
                adopt_unrecorded=False, health_interval=0.2)
    default_client.set_client(cl)
    shell.magics_manager.registry["LLMMagics"]._client = None
    yield cl
    shutdown(cl)


def test_an_engine_failing_while_loading_is_one_line_and_its_progress_says_failed(shell, crashing, shown, model_dir):
    with pytest.raises(SageNBError) as exc:
        llm(shell, f"start {model_dir(1)} --name bad")
    error = crashing.engine("bad")["error"]
    assert "\n" in error  # the record keeps the log tail; the notebook shows its first line
    lines = exc.value._render_traceback_()
    assert lines == [f"sage_nb: engine 'bad' failed: {error.splitlines()[0]} (the engine's log: %llm logs bad)"]
    assert "Traceback" not in lines[0]
    progress = list(shown.values())
    assert len(progress) == 1 and progress[0].startswith("❌ bad failed — ")  # the ⏳ line was replaced


def test_a_refused_start_leaves_no_starting_line(shell, shown):
    with pytest.raises(SageNBError, match="does not exist") as exc:
        llm(shell, "start /no/such/model")
    assert len(exc.value._render_traceback_()) == 1
    assert list(shown.values()) == [shown[next(iter(shown))]] and next(iter(shown.values())).startswith(
        "❌ /no/such/model failed — ")


def test_a_missing_engine_points_at_the_engines_list(shell):
    for line in ("stop nope", "logs nope", "wake nope", "keep-alive nope 10m"):
        with pytest.raises(SageNBError) as exc:
            llm(shell, line)
        assert exc.value._render_traceback_() == ["sage_nb: no engine with id or name 'nope'; see %llm engines"]


def test_one_line_keeps_other_messages_and_failures_without_a_name():
    assert one_line(EngineFailed("engine 'x' failed: cause\n--- last lines ---\nTraceback")) == \
        "engine 'x' failed: cause (the engine's log: %llm logs x)"
    assert one_line(EngineFailed("engine 'x' is not ready after 60 s")) == \
        "engine 'x' is not ready after 60 s (the engine's log: %llm logs x)"
    assert one_line(EngineFailed("no engine name here\nmore")) == "no engine name here"


def test_prune_from_a_notebook_keeps_other_notebooks_engines(shell, model_dir, monkeypatch):
    cl = default_client.get_client()
    for name, kernel_id, notebook in (("mine", KID, "work/a.ipynb"), ("earlier", OTHER, "work/a.ipynb"),
                                      ("theirs", OTHER, "work/b.ipynb"), ("rest", None, None)):
        cl.start(str(model_dir(1)), name=name, kernel_id=kernel_id, notebook=notebook)
        cl.stop(name)
    monkeypatch.setattr(client_module, "this_kernel", lambda: (KID, "work/a.ipynb"))
    monkeypatch.setattr(magics_module, "this_kernel", lambda: (KID, "work/a.ipynb"))
    table = llm(shell, "prune")
    assert sorted(r[1] for r in table.rows) == ["earlier", "mine"] and "this notebook's" in table.title
    kept = "kept 2 stopped/failed engines not started from this notebook: theirs, rest; %llm prune --all prunes them"
    assert table.footer == kept and kept in repr(table)
    again = llm(shell, "prune")
    assert again.rows == [] and again.footer == kept
    table = llm(shell, "prune --all")
    assert sorted(r[1] for r in table.rows) == ["rest", "theirs"] and table.footer is None and cl.engines() == []


def test_doctor_on_a_machine_without_gpus_asks_no_fix(shell):
    rows = {row[0]: row for row in llm(shell, "doctor").rows}
    if rows["GPUs"][2].startswith("no NVIDIA GPU"):  # this machine: the CPU path, nothing to fix
        assert rows["GPUs"][1:] == ["OK", rows["GPUs"][2], ""] and "engines run on CPU" in rows["GPUs"][2]
    cpu = doctor.gpu_check({"source": "none", "error": "NVML unavailable: no libnvidia-ml", "devices": []})
    assert cpu == ["GPUs", "OK", "no NVIDIA GPU (NVML unavailable: no libnvidia-ml): engines run on CPU; "
                   "nothing to fix", ""]
    hidden = doctor.gpu_check({"source": "nvml", "error": "CUDA_VISIBLE_DEVICES='' names no GPU", "devices": []})
    assert hidden[1] == "WARN" and "CUDA_VISIBLE_DEVICES" in hidden[3]
    assert doctor.gpu_check({"source": "nvml", "devices": [{}, {}]}) == ["GPUs", "OK", "2 GPU(s) via nvml", ""]
