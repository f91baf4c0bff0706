"""Real engines from notebooks: embedded mode first (no server), then a real server started
afterwards finds that engine, and a real kernel of that server drives the magics and the client."""

from __future__ import annotations

import json
import time

import pytest
from IPython.core.interactiveshell import InteractiveShell
from jupyter_client import BlockingKernelClient

from sage_nb import client as default_client
from sage_nb.controlplane.engines.process import group_members
from sage_nb.kernel.client import Client

from ..serverproc import Server, free_port

pytestmark = pytest.mark.vllm


def execute(kc: BlockingKernelClient, code: str, timeout: float = 600) -> tuple[list[dict], dict]:
    """Run code in the kernel; return the iopub outputs and the reply content."""
    msg_id = kc.execute(code)
    outputs = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "status" and msg["content"]["execution_state"] == "idle":
            break
        if kind in ("stream", "display_data", "update_display_data", "execute_result", "error"):
            outputs.append({"type": kind, **msg["content"]})
    reply = kc.get_shell_msg(timeout=30)
    return outputs, reply["content"]


def text_of(outputs: list[dict]) -> str:
    parts = []
    for o in outputs:
        if o["type"] == "stream":
            parts.append(o["text"])
        elif "data" in o:
            parts.append(o["data"].get("text/markdown") or o["data"].get("text/plain", ""))
    return "\n".join(parts)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama, minilm):
    root = tmp_path_factory.mktemp("kernel-e2e")
    state = root / "state"
    server = Server(root, state, free_port(), port_range=(18950, 18999))
    yield {"root": root, "state": state, "server": server, "tiny": tiny_llama, "minilm": minilm}
    if server.proc is not None and server.proc.poll() is None:
        server.kill()
    from sage_nb.controlplane import ControlPlane

    for e in ControlPlane(state_dir=state, monitor=False).engines():
        for proc in group_members(e["pid"]) if e["pid"] else []:
            proc.kill()


def test_embedded_mode_then_a_server_finds_the_engine(world, monkeypatch, capsys):
    monkeypatch.delenv("JPY_PARENT_PID", raising=False)
    monkeypatch.delenv("SAGE_NB_SERVER_URL", raising=False)
    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "sage_nb")
    embedded = Client(state_dir=world["state"], port_range=(18950, 18999), adopt_unrecorded=False)
    assert embedded.mode == "embedded"
    default_client.set_client(embedded)
    shell.magics_manager.registry["LLMMagics"]._client = None
    try:
        table = shell.run_line_magic("llm", f"start {world['tiny']} --name tiny")
        assert "ready" in repr(table)
        shown = capsys.readouterr().out
        assert "starting" in shown  # the progress display
        engine = embedded.engine("tiny")
    finally:
        embedded.control_plane.close()
        default_client.set_client(None)
    server = world["server"]
    server.start()
    code, listed = server.get("sage_nb/api/engines")
    assert code == 200 and [(e["id"], e["state"]) for e in listed] == [(engine["id"], "ready")]
    world["tiny_id"] = engine["id"]


def test_magics_and_client_in_a_real_kernel(world):
    server = world["server"]
    code, kernel = server.request("POST", "api/kernels", {"name": "python3"})
    assert code == 201, kernel
    kc = BlockingKernelClient(connection_file=str(world["root"] / "runtime" / f"kernel-{kernel['id']}.json"))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        out, reply = execute(kc, "%load_ext sage_nb")
        assert reply["status"] == "ok", out
        out, reply = execute(kc, "%llm backends")
        assert reply["status"] == "ok" and "tiny" in text_of(out)
        assert any("text/html" in o.get("data", {}) for o in out)
        assert f'%%ai openai-chat-custom:tiny -m {{"openai_api_base":"{server.url}sage_nb/v1"}}' in text_of(out)
        out, reply = execute(kc, f"%llm start {world['minilm']} --embedding --name mini")
        assert reply["status"] == "ok", text_of(out)
        phases = [o["data"]["text/markdown"] for o in out if o["type"] in ("display_data", "update_display_data")]
        assert len(phases) >= 2 and "ready" in phases[-1]
        code_ = ("from sage_nb import client\noa = client.embeddings()\n"
                 "vec = oa.embeddings.create(model=oa.model, input=['x']).data[0].embedding\n"
                 "print(client.get_client().mode, oa.model, len(vec), client.llm().model)")
        out, reply = execute(kc, code_)
        assert text_of(out).split() == ["server", "mini", "384", "tiny"]
        out, reply = execute(kc, "%%llm --max-tokens 5\nSay hi to {client.__name__}")
        assert reply["status"] == "ok" and any("text/markdown" in o.get("data", {}) for o in out)
        out, reply = execute(kc, "%llm doctor")
        assert "server extension  OK" in text_of(out) and "engine mini" in text_of(out)
        # the server's registry, not the kernel's default state dir (the server has its own state_dir)
        assert str(world["state"] / "registry.sqlite3") in text_of(out)
        out, reply = execute(kc, "%llm stop nope")
        assert reply["status"] == "error" and reply["ename"] == "SageNBError"
        assert [o for o in out if o["type"] == "error"][0]["traceback"] == [
            "sage_nb: no engine with id or name 'nope'; see %llm engines"]
        out, reply = execute(kc, "%llm start --tp x")
        assert reply["status"] == "error" and reply["ename"] == "UsageError"
        out, reply = execute(kc, "r = %llm stop mini\nprint(repr(r))")
        assert "stopped" in text_of(out)
        code, stopped = server.request("DELETE", f"sage_nb/api/engines/{world['tiny_id']}")
        assert code == 200 and stopped["state"] == "stopped"
        # this kernel started mini, not tiny (the embedded test did): its prune keeps tiny and says so
        out, reply = execute(kc, "r = %llm prune\nprint(repr(r))")
        assert reply["status"] == "ok" and "this notebook's" in text_of(out) and " mini " in text_of(out)
        assert ("kept 1 stopped/failed engine not started from this notebook: tiny; %llm prune --all prunes them"
                in text_of(out))
    finally:
        kc.stop_channels()
        server.request("DELETE", f"api/kernels/{kernel['id']}")
    code, pruned = server.request("POST", "sage_nb/api/engines/prune")
    assert pruned["removed"] == [world["tiny_id"]]
    assert json.dumps(server.get("sage_nb/api/engines")[1]) == "[]"
