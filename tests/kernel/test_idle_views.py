"""Idle engines from the notebook: the idle column, the client's sleep/wake/keep-alive calls over each
transport, and (at the end) the same through the magics and dashboard on an embedded control plane."""

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from IPython.core.error import UsageError

from sage_nb import client as default_client
from sage_nb.controlplane.errors import BadRequest, EngineFailed
from sage_nb.controlplane.validation import duration
from sage_nb.kernel import views
from sage_nb.kernel.client import Client
from sage_nb.kernel.connection import ServerInfo
from sage_nb.kernel.transport import RestTransport

ENGINE = {"id": "e1", "name": "chat", "kind": "llm", "state": "ready", "gpu_ids": [0], "port": 9001,
          "served_model_name": "chat", "ready_at": None, "health_failures": 0, "keep_alive": 300.0,
          "idle_at": 1250.0, "last_used_at": 950.0, "sleep_level": None, "dormant_since": None}


class RecordingTransport:
    """A transport that records each call and answers with one engine whose state goes through
    ``states`` (one per answer, the last one stays), and sleeps when told to."""

    mode, server, control_plane, why_embedded = "fake", None, None, ""

    def __init__(self, *states: str, **fields) -> None:
        self.calls: list[tuple] = []
        self.states = list(states) or ["ready"]
        self.model = {**ENGINE, **fields}

    def _now(self) -> dict:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        return {**self.model, "state": state}

    def engines(self):
        return [self._now()]

    def engine(self, id_or_name):
        self.calls.append(("engine", id_or_name))
        return self._now()

    def gpus(self):
        return {"devices": [], "source": "none", "error": "fake"}

    def logs(self, id_or_name, lines):
        return ""

    def stop(self, id_or_name):
        self.calls.append(("stop", id_or_name))
        return {**self.model, "state": "stopped"}

    def sleep(self, id_or_name, mode):  # the engine sleeps from now on
        self.calls.append(("sleep", id_or_name, mode))
        self.states = ["unloaded" if mode == "unload" else "sleeping"]
        self.model["sleep_level"] = None if mode == "unload" else 1
        return self._now()

    def wake(self, id_or_name):
        self.calls.append(("wake", id_or_name))
        return self._now()

    def set_keep_alive(self, id_or_name, keep_alive):
        self.calls.append(("set_keep_alive", id_or_name, keep_alive))
        return {**self.model, "keep_alive": duration("keep_alive", keep_alive)}


# ---------------------------------------------------------------------- the idle column
@pytest.mark.parametrize("seconds,text", [
    (None, "forever"), (0, "0s"), (0.2, "1s"), (45, "45s"), (250, "4m10s"), (600, "10m"), (5400, "1h30m"),
    (3601, "1h1s"), (2 * 86400, "2d"), (86400 + 60.5, "1d1m1s"),
])
def test_span_reads_like_a_keep_alive_value(seconds, text):
    assert views.span(seconds) == text


@pytest.mark.parametrize("fields,text", [
    ({}, "in 4m10s"),                                   # idle_at 1250, now 1000
    ({"idle_at": 1000.0}, "now"), ({"idle_at": 900.0}, "now"),
    ({"keep_alive": None, "idle_at": None}, "never"),
    ({"state": "sleeping", "sleep_level": 1}, "sleeping L1"), ({"state": "sleeping", "sleep_level": 2}, "sleeping L2"),
    ({"state": "unloaded"}, "unloaded"), ({"state": "waking"}, "waking"),
    ({"state": "starting"}, ""), ({"state": "stopped"}, ""), ({"state": "failed"}, ""),
])
def test_idle_text(fields, text):
    assert views.idle_text({**ENGINE, **fields}, now=1000.0) == text


def test_engines_table_has_the_idle_column(monkeypatch):
    monkeypatch.setattr(views.time, "time", lambda: 1190.0)
    table = views.engines_table([ENGINE, {**ENGINE, "id": "e2", "name": "emb", "state": "sleeping",
                                          "sleep_level": 1}])
    assert "idle" in table.columns
    column = table.columns.index("idle")
    assert [row[column] for row in table.rows] == ["in 1m", "sleeping L1"]
    assert "in 1m" in repr(table) and "<td style='text-align:left'>sleeping L1</td>" in table._repr_html_()


# ---------------------------------------------------------------------- the client
def test_wait_ready_polls_through_waking():
    transport = RecordingTransport("waking", "waking", "ready")
    seen = []
    engine = Client(transport=transport).wait_ready("chat", on_progress=lambda e, phase: seen.append(phase))
    assert engine["state"] == "ready" and seen == ["waking", "ready"]
    assert transport.calls.count(("engine", "chat")) == 3


def test_wait_ready_fails_when_waking_ends_otherwise():
    with pytest.raises(EngineFailed, match="'chat' failed"):
        Client(transport=RecordingTransport("waking", "failed")).wait_ready("chat")
    with pytest.raises(EngineFailed, match="not ready after 0 s"):
        Client(transport=RecordingTransport("waking")).wait_ready("chat", timeout=0.01)


def test_wake_waits_unless_told_not_to():
    transport = RecordingTransport("starting", "ready")  # an unloaded engine goes through starting
    assert Client(transport=transport).wake("chat", wait=False)["state"] == "starting"
    assert transport.calls == [("wake", "chat")]
    transport = RecordingTransport("waking", "ready")
    assert Client(transport=transport).wake("chat")["state"] == "ready"
    assert transport.calls == [("wake", "chat"), ("engine", "e1")]


def test_sleep_passes_the_mode():
    transport = RecordingTransport()
    cl = Client(transport=transport)
    assert cl.sleep("chat")["state"] == "sleeping" and cl.sleep("chat", "unload")["state"] == "unloaded"
    assert transport.calls == [("sleep", "chat", "auto"), ("sleep", "chat", "unload")]


@pytest.mark.parametrize("value", ["abc", "-5", -5, "1e99", True, "400d"])
def test_set_keep_alive_checks_before_any_call(value):
    transport = RecordingTransport()
    with pytest.raises(BadRequest, match=re.escape(repr(value))):
        Client(transport=transport).set_keep_alive("chat", value)
    assert transport.calls == []


@pytest.mark.parametrize("value", ["30m", 3600, "-1", -1, "forever", None])
def test_set_keep_alive_sends_the_value_as_given(value):
    transport = RecordingTransport()
    Client(transport=transport).set_keep_alive("chat", value)
    assert transport.calls == [("set_keep_alive", "chat", value)]


def test_rest_transport_sends_sleep_wake_and_keep_alive():
    seen = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self):
            length = int(self.headers.get("Content-Length") or 0)
            seen.append((self.command, self.path, json.loads(self.rfile.read(length) or b"null")))
            body = json.dumps({**ENGINE, "state": "waking"}).encode()
            self.send_response(202 if self.path.endswith("/wake") else 200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_POST = do_PATCH = _answer

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        rest = RestTransport(ServerInfo(f"http://127.0.0.1:{httpd.server_address[1]}/base/", "tok", "test"))
        assert rest.sleep("chat", "unload")["id"] == "e1"
        assert rest.wake("chat")["state"] == "waking"
        rest.set_keep_alive("e1", "forever")
    finally:
        httpd.shutdown()
        httpd.server_close()
    assert seen == [("POST", "/base/sage_nb/api/engines/chat/sleep", {"mode": "unload"}),
                    ("POST", "/base/sage_nb/api/engines/chat/wake", {}),
                    ("PATCH", "/base/sage_nb/api/engines/e1", {"keep_alive": "forever"})]


# ---------------------------------------------------------------------- embedded control plane
# needs ControlPlane.sleep_engine, wake_engine, set_keep_alive and LaunchRequest.keep_alive (the lead's
# control-plane part of issue 12): the magics and the dashboard over stub engines.
# (the shell fixture: tests/kernel/conftest.py)


def llm(shell, line):
    return shell.run_line_magic("llm", line)


def row(table) -> dict:
    assert len(table.rows) == 1
    return dict(zip(table.columns, table.rows[0], strict=True))


def test_magics_keep_alive_sleep_and_wake(shell, model_dir):
    cl = default_client.get_client()
    table = llm(shell, f"start {model_dir(1)} --name chat --keep-alive 10m")
    assert table.title == "sage_nb: ready" and re.fullmatch(r"in (10m|9m5\ds)", row(table)["idle"])
    assert cl.engine("chat")["keep_alive"] == 600
    table = llm(shell, "keep-alive chat forever")
    assert table.title == "sage_nb: keep-alive forever" and row(table)["idle"] == "never"
    assert llm(shell, "keep-alive chat -1").title == "sage_nb: keep-alive forever"
    assert llm(shell, "keep-alive chat 1h30m").title == "sage_nb: keep-alive 1h30m"
    assert cl.engine("chat")["keep_alive"] == 5400
    with pytest.raises(UsageError, match="'abc'"):
        llm(shell, "keep-alive chat abc")
    assert cl.engine("chat")["keep_alive"] == 5400

    table = llm(shell, "sleep chat --unload")
    assert table.title == "sage_nb: unloaded" and row(table)["idle"] == "unloaded"
    assert cl.engine("chat")["state"] == "unloaded" and cl.backends()["llm_backends"] == []
    table = llm(shell, "wake chat")
    assert table.title == "sage_nb: awake" and row(table)["state"] == "ready"
    assert [b["name"] for b in cl.backends()["llm_backends"]] == ["chat"]

    table = llm(shell, "sleep chat")  # auto: vLLM sleep mode where the engine has it, else unload
    state = row(table)["state"]
    assert state in ("sleeping", "unloaded") and table.title == f"sage_nb: {state}"
    table = llm(shell, "wake chat --no-wait")
    assert row(table)["state"] in ("waking", "starting", "ready")
    assert cl.wait_ready("chat", timeout=30)["state"] == "ready"


def test_dashboard_sleep_and_wake_buttons(shell, model_dir):
    from sage_nb.kernel.dashboard import Dashboard

    from .test_dashboard import buttons, html_of

    cl = default_client.get_client()
    cl.start(str(model_dir(1)), name="chat", keep_alive="forever")
    board = Dashboard(client=cl, autostart=False)
    assert "never" in html_of(board.engine_box)
    assert not buttons(board, "sleep")[0].disabled and buttons(board, "wake")[0].disabled
    buttons(board, "sleep")[0].click()
    state = cl.engine("chat")["state"]
    assert state in ("sleeping", "unloaded") and state in html_of(board.engine_box)  # _act refreshed it
    assert buttons(board, "sleep")[0].disabled and not buttons(board, "wake")[0].disabled
    buttons(board, "wake")[0].click()
    assert cl.wait_ready("chat", timeout=30)["state"] == "ready"


def test_the_gpus_table_says_who_holds_the_memory():
    parts = {"mine": [{"name": "chat", "engine_id": "e1", "booked_mib": 5761, "used_mib": 0}],
             "others": [{"user": "bob", "name": "embed", "engine_id": "e2", "booked_mib": 1627, "used_mib": 1700}],
             "processes": [{"pid": 7, "user": "alice", "command": "python", "used_mib": 20480}],
             "unaccounted_mib": 1024, "booked_unused_mib": 5761, "free_mib": 40000}
    assert views.holders(parts) == "chat 5761; bob/embed 1700; alice/python 20480; ? 1024"
    report = {"source": "fake", "error": None, "devices": [
        {"index": 0, "name": "A", "total_mib": 81920, "used_mib": 23204, "booked_mib": 7388, "available_mib": 52955,
         "utilization": None, "parts": parts}]}
    assert "held by (MiB)" in repr(views.gpus_table(report)) and "bob/embed 1700" in repr(views.gpus_table(report))
