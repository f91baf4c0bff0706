"""Property-based bad input over every REST route, the gateway bodies and the magic arguments:
never a 5xx for bad input, every error is JSON with a message, magics give usage errors."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from IPython.core.error import UsageError

from sage_nb.kernel.parsing import parse_cell, parse_line

from ..serverproc import TOKEN, Server, running_server, stub_model, wait_ready

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=12)
FIELDS = ["model", "kind", "name", "tensor_parallel_size", "gpu_ids", "port", "max_model_len", "dtype",
          "gpu_memory_utilization", "extra_args"]
START_BODIES = st.dictionaries(st.sampled_from(FIELDS + ["other"]), JSON, max_size=6) | JSON
GATEWAY_BODIES = st.dictionaries(st.sampled_from(["model", "messages", "input", "stream", "prompt", "max_tokens"]),
                                 JSON, max_size=5) | JSON
RAW = st.binary(max_size=64)
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("fuzz"), (18100, 18199), stub_engines=True) as srv:
        model = stub_model(srv.root)
        for kind, name in (("llm", "chat"), ("embedding", "emb")):
            code, e = srv.request("POST", "sage_nb/api/engines", {"model": model, "kind": kind, "name": name})
            assert code == 202, e
            wait_ready(srv, e["id"])
        yield srv


def send(server: Server, method: str, path: str, data: bytes | None):
    req = urllib.request.Request(server.url + path, data=data, method=method,
                                 headers={"Authorization": f"token {TOKEN}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def check_reply(status: int, body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if status >= 400:  # sage_nb's {"message"}, or an engine's OpenAI-style {"error": {"message"}} passed on
        reply = json.loads(body)
        message = reply.get("message") or (reply.get("error") or {}).get("message")
        assert isinstance(message, str) and message, body


def settle(server: Server) -> None:
    """Stop whatever a fuzzed body managed to start (valid bodies are valid), keep chat and emb."""
    for e in server.get("sage_nb/api/engines")[1]:
        if e["name"] not in ("chat", "emb") and e["state"] in ("starting", "ready"):
            server.request("DELETE", f"sage_nb/api/engines/{e['id']}")
    server.request("POST", "sage_nb/api/engines/prune")


@SETTINGS
@given(body=START_BODIES)
def test_start_bodies(server, body):
    check_reply(*send(server, "POST", "sage_nb/api/engines", json.dumps(body).encode()))
    settle(server)


@SETTINGS
@given(raw=RAW, route=st.sampled_from(["sage_nb/api/engines", "sage_nb/v1/chat/completions",
                                       "sage_nb/v1/completions", "sage_nb/v1/embeddings"]))
def test_raw_bytes_bodies(server, raw, route):
    check_reply(*send(server, "POST", route, raw))
    settle(server)


@SETTINGS
@given(body=GATEWAY_BODIES, route=st.sampled_from(["chat/completions", "completions", "embeddings"]))
def test_gateway_bodies(server, body, route):
    status, reply = send(server, "POST", f"sage_nb/v1/{route}", json.dumps(body).encode())
    check_reply(status, reply)


@SETTINGS
@given(engine=st.text(max_size=40), lines=st.text(max_size=8),
       verb=st.sampled_from(["GET", "DELETE", "GET-logs"]))
def test_engine_paths(server, engine, lines, verb):
    path = "sage_nb/api/engines/" + urllib.request.quote(engine, safe="")
    if verb == "GET-logs":
        path += "/logs?lines=" + urllib.request.quote(lines, safe="")
    if engine in ("chat", "emb") and verb == "DELETE":
        return
    status, body = send(server, verb.split("-")[0], path, None)
    assert status != 405 or not engine
    if status >= 400 and status != 405 and body:
        check_reply(status, body)
    assert b"/etc/passwd" not in body and b"root:x:0" not in body  # the logs route reads engine logs only


def test_path_traversal_in_logs_is_refused(server):
    for attempt in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "chat%2F..%2F..%2F..%2Fetc%2Fpasswd"):
        status, body = send(server, "GET", f"sage_nb/api/engines/{attempt}/logs", None)
        assert status == 404 and b"root:" not in body


@settings(max_examples=300, deadline=None)
@given(line=st.text(max_size=60))
def test_magic_arguments_give_usage_errors_only(line):
    for parse in (parse_line, parse_cell):
        try:
            parse(line)
        except UsageError:
            pass
