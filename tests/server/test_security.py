"""Who may touch an engine: Jupyter auth on every route, jupyter_server's XSRF rules for browser
POSTs, keys never shown, private files."""

from __future__ import annotations

import http.cookiejar
import json
import os
import stat
import urllib.error
import urllib.request

import pytest

from sage_nb.controlplane import ControlPlane

from ..serverproc import TOKEN, Server, running_server, stub_model, wait_ready


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("security"), (18150, 18199), stub_engines=True) as srv:
        code, e = srv.request("POST", "sage_nb/api/engines", {"model": stub_model(srv.root), "name": "secret-keeper"})
        srv.engine = wait_ready(srv, e["id"])
        yield srv


def browser(server: Server):
    """A cookie session as a browser has it after opening the token URL."""
    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{server.url}lab?token={TOKEN}", timeout=30).read()
    xsrf = next(c.value for c in jar if c.name == "_xsrf")
    return opener, xsrf


def post(opener, url: str, body: dict, headers: dict) -> int:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with opener.open(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code


def test_browser_posts_follow_xsrf_rules(server):
    opener, xsrf = browser(server)
    url = server.url + "sage_nb/api/engines/prune"
    assert post(opener, url, {}, {}) == 403  # cookie auth without the XSRF token
    assert post(opener, url, {}, {"X-XSRFToken": "forged"}) == 403
    assert post(opener, url, {}, {"X-XSRFToken": xsrf}) == 200
    code = post(opener, server.url + "sage_nb/v1/chat/completions", {"messages": []}, {})
    assert code == 403  # the gateway too


def test_keys_never_leave_the_control_plane(server):
    cp = ControlPlane(state_dir=server.state_dir, monitor=False)
    key = cp.api_key(server.engine["id"])
    assert len(key) >= 24
    for path in ("sage_nb/api/engines", f"sage_nb/api/engines/{server.engine['id']}", "sage_nb/api/backends",
                 "sage_nb/v1/models", f"sage_nb/api/engines/{server.engine['id']}/logs?lines=1000"):
        code, body = server.get(path)
        assert code == 200 and key not in json.dumps(body), path
    assert key not in (server.root / "state" / "logs" / f"{server.engine['id']}.log").read_text()
    assert key not in " ".join(__import__("psutil").Process(server.engine["pid"]).cmdline())
    from sage_nb.kernel.views import engines_table

    assert key not in engines_table(cp.engines())._repr_html_()
    cp.close()


def test_state_files_are_private(server):
    state = server.root / "state"
    for path in [state / "registry.sqlite3", *(state / "logs").iterdir()]:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path
    assert stat.S_IMODE((state / "logs").stat().st_mode) & 0o077 == 0


def test_direct_call_to_an_engine_without_its_key_is_401(server):
    url = f"http://127.0.0.1:{server.engine['port']}/v1/models"
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):  # not even with the Jupyter token
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert exc.value.code == 401
    assert os.environ.get("VLLM_API_KEY") is None  # the test process never saw a key either


def tokenize(server: Server, route: str, body: dict, headers: dict) -> tuple[int, dict]:
    req = urllib.request.Request(server.url + f"sage_nb/{route}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_tokenizer_needs_the_token_by_default(server):
    body = {"model": "secret-keeper", "prompt": "hi"}
    code, reply = tokenize(server, "tokenize", body, {})
    assert code == 403 and "token" in reply["error"]["message"]
    code, reply = tokenize(server, "tokenize", body, {"Authorization": f"Bearer {TOKEN}"})
    assert code == 200 and len(reply["tokens"]) == 2


def test_open_tokenizer_serves_tokenize_without_the_token_and_nothing_else(tmp_path):
    """As vLLM serves its own (``vllm bench serve`` sends no key there); every other route still
    needs the token."""
    with running_server(tmp_path, (18200, 18219), stub_engines=True,
                        extra_args=("--SageNBApp.open_tokenizer=True",)) as srv:
        code, e = srv.request("POST", "sage_nb/api/engines", {"model": stub_model(srv.root), "name": "tok"})
        wait_ready(srv, e["id"])
        code, reply = tokenize(srv, "tokenize", {"model": "tok", "prompt": "hey"}, {})
        assert code == 200 and len(reply["tokens"]) == 3
        code, reply = tokenize(srv, "detokenize", {"model": "tok", "tokens": reply["tokens"]}, {})
        assert code == 200 and reply["prompt"] == "hey"
        opener, _ = browser(srv)  # a browser's cookie without the XSRF token: nothing to forge here
        assert post(opener, srv.url + "sage_nb/tokenize", {"model": "tok", "prompt": "x"}, {}) == 200
        for route, body in (("v1/chat/completions", {"messages": []}), ("v1/completions", {"prompt": "x"}),
                            ("v1/embeddings", {"input": "x"})):
            code, reply = tokenize(srv, route, body, {})
            assert code == 403 and "token" in reply["error"]["message"], route
        code, reply = tokenize(srv, "tokenize", {"model": "nope", "prompt": "x"}, {})
        assert code == 404  # errors as with the token
