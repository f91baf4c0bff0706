"""%llm / %%llm on a real IPython InteractiveShell, embedded mode, over stub engines (fast);
test_kernel_vllm.py repeats them in a real kernel of a real server with real engines."""

import json

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

from sage_nb import client as default_client
from sage_nb.kernel.client import Client, loading_phase
from sage_nb.kernel.magics import SageNBError
from sage_nb.kernel.parsing import parse_cell, parse_line

from ..conftest import STUB_PATH, shutdown


@pytest.fixture
def shell(state_dir, monkeypatch):
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.delenv("SAGE_NB_SERVER_URL", raising=False)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "sage_nb")
    cl = Client(state_dir=state_dir, engine_env={"PYTHONPATH": STUB_PATH}, port_range=(18300, 18399),
                adopt_unrecorded=False,
                health_interval=0.2)
    assert cl.mode == "embedded" and "no Jupyter server" in cl.why_embedded
    default_client.set_client(cl)
    magics = sh.magics_manager.registry["LLMMagics"]
    magics._client = None
    yield sh
    shutdown(cl)
    default_client.set_client(None)


def llm(shell, line):
    return shell.run_line_magic("llm", line)


@pytest.mark.parametrize("line,msg", [
    ("frobnicate", "invalid choice"), ("start", "required: model"), ("start m --tp 0", "at least 1"),
    ("start m --port 70000", "out of range"), ("start m --gpus a,b", "GPU indices"), ("stop", "engine"),
    ("logs x -n zero", "integer"), ('start "unclosed', "cannot parse"), ("engines -- --x", "only for 'start'"),
])
def test_bad_arguments_are_usage_errors(line, msg):
    with pytest.raises(UsageError, match=msg):
        parse_line(line)


def test_parsing_splits_vllm_args_and_help(capsys):
    parsed = parse_line("start org/model --embedding --name e --tp 2 --gpus 0,1 -- --enforce-eager --seed 1")
    a = parsed.args
    assert (a.model, a.embedding, a.name, a.tensor_parallel_size, a.gpu_ids) == ("org/model", True, "e", 2, [0, 1])
    assert parsed.vllm_args == ["--enforce-eager", "--seed", "1"]
    assert parse_line("start --help") is None and "--max-model-len" in capsys.readouterr().out
    assert parse_line("") is None  # bare %llm shows the help
    assert parse_cell("--help") is None
    with pytest.raises(UsageError, match="between 0 and 2"):
        parse_cell("--temperature 5")


def test_loading_phases_from_a_vllm_log():
    log = ("INFO Initializing a V1 LLM engine (v0.32.0)\nINFO Starting to load model /m...\n"
           "INFO Loading weights took 0.1 s\nINFO CPU KV cache size: 1,048,576 tokens\n")
    assert loading_phase("") == "launching"
    assert loading_phase(log[:40]) == "initializing engine"
    assert loading_phase(log) == "allocating KV cache"
    assert loading_phase(log + "INFO Starting vLLM server on http://127.0.0.1:1\n") == "starting API server"


def test_engine_lifecycle_with_magics(shell, model_dir):
    table = llm(shell, f"start {model_dir(1)} --name chat")
    assert "ready" in repr(table) and "chat" in table._repr_html_()
    llm(shell, f"start {model_dir(1)} --embedding --name emb --no-wait")
    default_client.get_client().wait_ready("emb", timeout=20)
    text = repr(llm(shell, "backends"))
    assert "llm" in text and "embedding" in text and "chat" in text and "emb" in text
    assert "chat" in repr(llm(shell, "engines"))
    assert "no NVIDIA GPU" in repr(llm(shell, "gpus"))
    assert "stub engine chat" in repr(llm(shell, "logs chat -n 5"))
    assert "stopped" in repr(llm(shell, "stop chat"))
    assert len(llm(shell, "prune").rows) == 1


def test_runtime_errors_are_one_line(shell):
    with pytest.raises(SageNBError) as exc:
        llm(shell, "stop nope")
    assert exc.value._render_traceback_() == ["sage_nb: no engine with id or name 'nope'"]
    with pytest.raises(SageNBError, match="does not exist"):
        llm(shell, "start /no/such/model")
    with pytest.raises(SageNBError, match="No LLM backend available. Start one with: %llm start <model>"):
        shell.run_cell_magic("llm", "", "hello")


def test_cell_magic_fills_variables(shell, model_dir, capsys):
    llm(shell, f"start {model_dir(1)} --name chat")
    shell.user_ns["topic"] = "volcanoes"
    sent = {}
    oa = default_client.get_client().llm()
    original = type(oa.chat.completions).create

    def spy(self, **kw):
        sent.update(kw)
        return original(self, **kw)

    type(oa.chat.completions).create = spy
    try:
        shell.run_cell_magic("llm", "--system be-brief --max-tokens 7", "Tell me about {topic} and {unknown}.")
    finally:
        type(oa.chat.completions).create = original
    assert sent["messages"] == [{"role": "system", "content": "be-brief"},
                                {"role": "user", "content": "Tell me about volcanoes and {unknown}."}]
    assert sent["max_tokens"] == 7 and sent["model"] == "chat"


def test_doctor_reports_each_check(shell, model_dir):
    llm(shell, f"start {model_dir(1)} --name chat")
    report = llm(shell, "doctor")
    checks = {row[0]: row[1] for row in report.rows}
    assert checks["server extension"] == "WARN" and checks["registry"] == "OK"
    assert checks["vLLM"] == "OK" and checks["engine chat"] == "OK" and "GPUs" in checks
    assert all(row[3] for row in report.rows if row[1] != "OK")  # every problem has its fix


def test_client_picks_by_kind_never_by_port(shell, model_dir):
    cl = default_client.get_client()
    cl.start(str(model_dir(1)), "embedding", name="emb")
    with pytest.raises(Exception, match="No LLM backend available"):
        default_client.llm()
    emb = default_client.embeddings()
    assert emb.model == "emb" and emb.backend["kind"] == "embedding"
    reply = emb.embeddings.create(model=emb.model, input=["a"])
    assert json.loads(reply.model_dump_json())["data"][0]["embedding"] == [0.5, 0.5]
    with pytest.raises(Exception, match="'emb' is an embedding model"):
        default_client.llm("emb")


def test_backends_show_the_jupyter_ai_lines_in_server_mode(shell):
    from .test_integrations import EMB, LLM, GatewayTransport

    magics = shell.magics_manager.registry["LLMMagics"]
    magics._client = Client(transport=GatewayTransport([LLM, EMB]))
    table = llm(shell, "backends")
    text = repr(table)
    assert "  %env OPENAI_API_KEY=<your Jupyter token>\n  %load_ext jupyter_ai_magics\n" in text
    assert text.endswith('\n  %%ai openai-chat-custom:org/chat -m {"openai_api_base":'
                         '"http://127.0.0.1:8888/a%40b/sage_nb/v1"}')
    assert "tok" not in text.replace("token", "")  # the token itself is never shown
    assert "white-space:pre-wrap" in table._repr_html_() and "%%ai openai-chat-custom:org/chat" in table._repr_html_()
    magics._client = Client(transport=GatewayTransport([EMB]))  # no LLM: nothing to use from jupyter-ai
    assert "jupyter" not in repr(llm(shell, "backends"))


def test_backends_show_no_jupyter_ai_lines_in_embedded_mode(shell, model_dir):
    llm(shell, f"start {model_dir(1)} --name chat")
    assert "%%ai" not in repr(llm(shell, "backends"))  # no gateway without a server
