"""The API-key guard sage_nb loads into vLLM engines (``--middleware sage_nb_engine_guard.KeyGuard``)."""

from __future__ import annotations

import ast
import importlib.util
import sys
from pathlib import Path

import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

GUARD_FILE = Path(__file__).resolve().parents[2] / "sage_nb" / "engine_guard" / "sage_nb_engine_guard.py"
KEY = "s3cret-key"


def load_guard():
    """The module as vLLM gets it: from its file, standalone (it must need nothing from sage_nb)."""
    spec = importlib.util.spec_from_file_location("sage_nb_engine_guard", GUARD_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def inner_app(scope, receive, send):
    """Answers 200 with the method and path it saw, or accepts a websocket."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "hello"})
        await send({"type": "websocket.close", "code": 1000})
        return
    body = f"{scope['method']} {scope['path']}".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": body})


def client(monkeypatch, key: str | None, **kwargs) -> TestClient:
    if key is None:
        monkeypatch.delenv("VLLM_API_KEY", raising=False)
    else:
        monkeypatch.setenv("VLLM_API_KEY", key)
    return TestClient(load_guard().KeyGuard(inner_app), **kwargs)  # the key is read here


GUARDED = [("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping"), ("POST", "/tokenize"),
           ("POST", "/collective_rpc"), ("GET", "/v1/models"), ("POST", "/v1/chat/completions")]
OPEN = [("GET", "/health"), ("GET", "/metrics"), ("GET", "/ping"), ("GET", "/version"), ("GET", "/openapi.json")]


def test_module_imports_only_the_standard_library():
    """vLLM imports it in the engine process, by module name, from a folder of its own: nothing from
    sage_nb, and pure ASGI (not even Starlette)."""
    imported = set()
    for node in ast.walk(ast.parse(GUARD_FILE.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported and imported <= set(sys.stdlib_module_names) | {"__future__"}, imported


def test_without_a_key_everything_passes(monkeypatch):
    c = client(monkeypatch, None)
    for method, path in GUARDED + OPEN:
        r = c.request(method, path)
        assert r.status_code == 200, (method, path)
        assert r.text == f"{method} {path.split('?')[0]}"


@pytest.mark.parametrize("method,path", GUARDED)
def test_with_a_key_guarded_paths_need_it(monkeypatch, method, path):
    c = client(monkeypatch, KEY)
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"},
                    {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"}, {"Authorization": "Bearer "}):
        r = c.request(method, path, headers=headers)
        assert r.status_code == 401, (method, path, headers)
        assert r.json() == {"error": "Unauthorized"}
        assert r.headers["content-type"] == "application/json"
    r = c.request(method, path, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200
    assert r.text == f"{method} {path.split('?')[0]}"
    r = c.request(method, path, headers={"authorization": f"bearer {KEY}"})  # case-insensitive, like vLLM
    assert r.status_code == 200


@pytest.mark.parametrize("method,path", OPEN)
def test_with_a_key_open_paths_pass_without_it(monkeypatch, method, path):
    r = client(monkeypatch, KEY).request(method, path)
    assert r.status_code == 200
    assert r.text == f"{method} {path}"


def test_with_a_key_options_passes(monkeypatch):
    r = client(monkeypatch, KEY).options("/sleep")
    assert r.status_code == 200
    assert r.text == "OPTIONS /sleep"


def test_open_paths_are_exact(monkeypatch):
    c = client(monkeypatch, KEY)
    for path in ("/health/x", "/healthz", "/metrics/../sleep", "/v1/health"):
        assert c.get(path).status_code == 401, path


def test_root_path_is_stripped(monkeypatch):
    c = client(monkeypatch, KEY, root_path="/engine")
    assert c.get("/engine/health").status_code == 200
    assert c.post("/engine/sleep").status_code == 401
    assert c.post("/engine/sleep", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_key_is_read_at_construction(monkeypatch):
    c = client(monkeypatch, KEY)
    monkeypatch.setenv("VLLM_API_KEY", "other")
    assert c.post("/sleep", headers={"Authorization": "Bearer other"}).status_code == 401
    assert c.post("/sleep", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_lifespan_passes_through(monkeypatch):
    with client(monkeypatch, KEY) as c:  # runs lifespan startup/shutdown through the guard
        assert c.get("/health").status_code == 200


def test_websocket_needs_the_key(monkeypatch):
    c = client(monkeypatch, KEY)
    with pytest.raises(WebSocketDisconnect), c.websocket_connect("/v1/realtime"):
        pass
    with c.websocket_connect("/v1/realtime", headers={"Authorization": f"Bearer {KEY}"}) as ws:
        assert ws.receive_text() == "hello"


def test_every_engine_is_launched_with_the_guard_it_can_import(stub_cp, model_dir):
    """Not only sleep-mode engines: a shared engine of the box service must refuse every user but the
    service on every route, so the guard is on each engine's command line, and its folder (the one
    ``PYTHONPATH`` gets) holds the module vLLM imports by name."""
    import psutil

    from sage_nb.controlplane.engines import idle

    assert (Path(idle.GUARD_DIR) / "sage_nb_engine_guard.py").is_file()
    engine = stub_cp().start_engine(str(model_dir(1)), name="guarded")
    cmdline = psutil.Process(engine["pid"]).cmdline()
    assert cmdline[cmdline.index("--middleware") + 1] == idle.GUARD_MIDDLEWARE
    env = psutil.Process(engine["pid"]).environ()
    assert idle.GUARD_DIR in env["PYTHONPATH"].split(":")
