"""The gateway's routing, errors, streaming and load sharing, over lightweight stub engines."""

import asyncio
import json
import os
import signal
import time

import psutil
import pytest
from tornado.httpclient import HTTPClientError

from ..conftest import STUB_PATH
from .test_rest import call, error, wait_state

pytestmark = pytest.mark.usefixtures("cleanup_engines")


async def start(jp_fetch, model, **body):
    _, e = await call(jp_fetch, "api", "engines", method="POST", body={"model": str(model), **body})
    return await wait_state(jp_fetch, e["id"])


async def test_routes_by_kind_and_model_field(jp_fetch, model_dir):
    chat_model, emb_model = model_dir(1), model_dir(1)
    chat = await start(jp_fetch, chat_model, name="chat")
    emb = await start(jp_fetch, emb_model, name="emb", kind="embedding")
    code, models = await call(jp_fetch, "v1", "models")
    assert code == 200 and {(m["id"], m["kind"]) for m in models["data"]} == {("chat", "llm"), ("emb", "embedding")}
    # the model may be the served name, the model path or the engine name, or left out
    for model in ("chat", str(chat_model), chat["id"], None):
        body = {"messages": [{"role": "user", "content": "hi"}], **({"model": model} if model else {})}
        code, reply = await call(jp_fetch, "v1", "chat", "completions", method="POST", body=body)
        assert code == 200 and reply["served_by"] == chat["port"] and reply["model"] == "chat"
    code, reply = await call(jp_fetch, "v1", "completions", method="POST", body={"prompt": "x"})
    assert reply["served_by"] == chat["port"]
    code, reply = await call(jp_fetch, "v1", "embeddings", method="POST", body={"input": ["a", "b"]})
    assert code == 200 and reply["served_by"] == emb["port"] and len(reply["data"]) == 2


async def test_wrong_kind_unknown_model_and_bad_body(jp_fetch, model_dir):
    await start(jp_fetch, model_dir(1), name="emb", kind="embedding")
    code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST",
                                body={"model": "emb", "messages": []})
    assert code == 400 and "'emb' is an embedding model" in message
    code, message = await error(jp_fetch, "v1", "embeddings", method="POST", body={"model": "nope", "input": "x"})
    assert code == 404 and "nope" in message
    code, message = await error(jp_fetch, "v1", "embeddings", method="POST", body="{oops")
    assert code == 400 and "JSON" in message
    code, message = await error(jp_fetch, "v1", "embeddings", method="POST", body={"model": 3})
    assert code == 400


async def test_no_backend_of_that_kind_is_503_with_the_fix(jp_fetch):
    code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST", body={"messages": []})
    assert code == 503 and message == "No LLM backend available. Start one with: %llm start <model>"
    code, message = await error(jp_fetch, "v1", "embeddings", method="POST", body={"input": "x"})
    assert code == 503 and message.startswith("No embedding backend available. Start one with: %llm start")


async def test_unknown_model_names_only_models_of_the_routes_kind(jp_fetch, model_dir):
    await start(jp_fetch, model_dir(1), name="acc-emb", kind="embedding")
    # no LLM engine at all: the same 503 and fix as without a model, not a 404 naming the embedder
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST", body=body)
    assert code == 503 and message == "No LLM backend available. Start one with: %llm start <model>"
    await start(jp_fetch, model_dir(1), name="chat")
    code, message = await error(jp_fetch, "v1", "chat", "completions", method="POST", body=body)
    assert code == 404 and "'gpt-4o'" in message and "['chat']" in message and "acc-emb" not in message
    code, message = await error(jp_fetch, "v1", "embeddings", method="POST", body={"model": "gpt-4o", "input": "x"})
    assert code == 404 and "['acc-emb']" in message and "chat" not in message


async def test_tokenize_and_detokenize_go_to_the_engine_of_the_model(jp_fetch, model_dir):
    chat = await start(jp_fetch, model_dir(1), name="chat")
    emb = await start(jp_fetch, model_dir(1), name="emb", kind="embedding")
    for engine in (chat, emb):  # any kind: vLLM tokenizes for pooling models too
        code, tokens = await call(jp_fetch, "tokenize", method="POST", body={"model": engine["name"], "prompt": "hi"})
        assert code == 200 and tokens["served_by"] == engine["port"] and tokens["count"] == 2
        code, text = await call(jp_fetch, "detokenize", method="POST",
                                body={"model": engine["name"], "tokens": tokens["tokens"]})
        assert code == 200 and text == {"prompt": "hi", "served_by": engine["port"]}
    code, message = await error(jp_fetch, "tokenize", method="POST", body={"model": "nope", "prompt": "x"})
    assert code == 404 and "['chat', 'emb']" in message


async def test_errors_are_openai_shaped_and_a_refused_token_says_what_to_do(jp_fetch, model_dir):
    await start(jp_fetch, model_dir(1), name="emb", kind="embedding")
    cases = [({"model": "emb", "messages": []}, {}, 400, "invalid_request_error", "'emb' is an embedding model"),
             ({"messages": []}, {"Authorization": "Bearer wrong"}, 403, "permission_error", "Jupyter token"),
             ({"messages": []}, {"Authorization": ""}, 403, "permission_error", "Jupyter token")]
    for body, headers, status, kind, text in cases:
        with pytest.raises(HTTPClientError) as exc:
            await jp_fetch("sage_nb", "v1", "chat", "completions", method="POST", body=json.dumps(body),
                           headers=headers)
        reply = json.loads(exc.value.response.body)
        assert exc.value.code == status and text in reply["message"]
        assert reply["error"] == {"message": reply["message"], "type": kind, "code": status}


async def test_stream_arrives_chunk_by_chunk(jp_fetch, model_dir):
    await start(jp_fetch, model_dir(1), name="chat")
    arrivals = []
    resp = await jp_fetch("sage_nb", "v1", "chat", "completions", method="POST",
                          body=json.dumps({"stream": True, "messages": []}),
                          streaming_callback=lambda chunk: arrivals.append((time.monotonic(), chunk)))
    assert resp.code == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
    data = b"".join(c for _, c in arrivals).decode()
    assert [line for line in data.splitlines() if line.startswith("data:")][-1] == "data: [DONE]"
    assert len(arrivals) >= 3 and arrivals[-1][0] - arrivals[0][0] > 0.08  # not buffered


async def test_bearer_token_like_openai_clients_send(jp_fetch, jp_serverapp, model_dir):
    await start(jp_fetch, model_dir(1), name="chat")
    token = jp_serverapp.identity_provider.token
    code, _ = await call(jp_fetch, "v1", "models", headers={"Authorization": f"Bearer {token}"})
    assert code == 200


async def test_replicas_share_load_and_a_dead_one_is_skipped(jp_fetch, jp_serverapp, model_dir):
    model = model_dir(1)
    a = await start(jp_fetch, model)
    b = await start(jp_fetch, model)
    body = {"model": str(model), "messages": []}
    replies = await asyncio.gather(*[call(jp_fetch, "v1", "chat", "completions", method="POST", body=body)
                                     for _ in range(10)])
    assert {r["served_by"] for _, r in replies} == {a["port"], b["port"]}
    router = jp_serverapp.web_app.settings["sage_nb_router"]
    assert not any(router.inflight.values())
    os.kill(a["pid"], signal.SIGKILL)  # before the monitor notices: connection refused -> retry
    for _ in range(4):
        code, reply = await call(jp_fetch, "v1", "chat", "completions", method="POST", body=body)
        assert code == 200 and reply["served_by"] == b["port"]


async def test_engine_dying_on_a_request_is_resent_to_a_replica(jp_fetch, jp_serverapp, model_dir):
    # The request reached the engine over a pooled connection, then the engine died without a word:
    # nothing can be working on it any more, so the gateway resends it to the other replica.
    model = model_dir(1)
    a = await start(jp_fetch, model)
    b = await start(jp_fetch, model)
    body = {"model": str(model), "messages": [], "stub_fault": {"port": a["port"], "do": "die"}}
    for _ in range(4):  # the router takes turns, so one of these reaches a and kills it
        code, reply = await call(jp_fetch, "v1", "chat", "completions", method="POST", body=body)
        assert code == 200 and reply["served_by"] == b["port"]
    assert _dead(a["pid"])


async def test_live_engine_cutting_a_request_off_is_502_not_resent(jp_fetch, model_dir):
    # The engine is still there and may be working on it: resending could do the work twice.
    model = model_dir(1)
    a = await start(jp_fetch, model)
    await start(jp_fetch, model)
    body = {"model": str(model), "messages": [], "stub_fault": {"port": a["port"], "do": "drop"}}
    codes = []
    for _ in range(4):
        code, reply = await call(jp_fetch, "v1", "chat", "completions", method="POST", body=body,
                                 raise_error=False)
        codes.append(code)
        assert code in (200, 502)
        if code == 502:
            assert "broke off the request" in reply["message"]
    assert codes.count(502) == 2  # every request sent to a, and only those, failed
    assert not _dead(a["pid"])


def _dead(pid: int) -> bool:
    import psutil
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def jp_server_config(state_dir):
    return {
        "ServerApp": {"jpserver_extensions": {"sage_nb": True, "jupyter_server_terminals": False},
                      "allow_unauthenticated_access": False},
        "SageNBApp": {"state_dir": str(state_dir), "port_range": [18800, 18899],
                      "engine_env": {"PYTHONPATH": STUB_PATH, "STUB_STREAM_PARTS": "100"}},
    }


def upstream_connections(port: int) -> set[int]:
    """Local ports of this process's (the server's) open connections to an engine's port."""
    return {c.laddr.port for c in psutil.Process().net_connections("tcp")
            if c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED}


async def test_streams_reuse_upstream_connections(jp_fetch, model_dir):
    """Streams go over pooled keep-alive connections to the engine, not a new one per stream."""
    chat = await start(jp_fetch, model_dir(1), name="chat")
    body = {"stream": True, "messages": [], "max_tokens": 3}
    seen = []
    for _ in range(3):
        resp = await jp_fetch("sage_nb", "v1", "chat", "completions", method="POST", body=json.dumps(body))
        assert resp.code == 200 and b"[DONE]" in resp.body
        seen.append(upstream_connections(chat["port"]))
    assert len(seen[0]) == 1 and seen[0] == seen[1] == seen[2], seen


async def test_client_disconnect_cancels_upstream(jp_fetch, jp_serverapp, jp_base_url, model_dir):
    chat = await start(jp_fetch, model_dir(1), name="chat")
    router = jp_serverapp.web_app.settings["sage_nb_router"]
    port, token = jp_serverapp.port, jp_serverapp.identity_provider.token
    body = json.dumps({"stream": True, "messages": []}).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST {jp_base_url}sage_nb/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                 f"Authorization: token {token}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    await writer.drain()
    assert b"200" in await reader.readline()
    await reader.readuntil(b"part1")
    assert sum(router.inflight.values()) == 1
    assert len(upstream_connections(chat["port"])) == 1
    writer.transport.abort()  # the client goes away; 100 parts would take 5 s
    t0 = time.monotonic()
    while sum(router.inflight.values()) or upstream_connections(chat["port"]):
        # the engine learns of it by its connection closing: one kept in the pool would not tell it
        assert time.monotonic() - t0 < 2, "upstream request still running"
        await asyncio.sleep(0.05)

