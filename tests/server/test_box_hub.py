"""The box service under a real JupyterHub, configured as docs/shared-server.md tells an admin: a
hub-managed service (``python -m sage_nb.service``) running as a Unix user of its own, users granted
``access:services!service=llm`` by a role, their servers' tokens by ``c.Spawner.server_token_scopes``,
and each user's server (spawned by the hub as that real user) linked to it by ``SAGE_NB_BOX_SERVICE``.

- the service refuses a missing, garbage or under-scoped hub token with words (401/403), and a user
  who is neither an admin nor a publisher may not publish;
- an admin publishes a real tiny vLLM engine through the service; in a kernel of a user's server,
  ``%llm backends`` lists it as shared and ``sage_nb.client.llm()`` chats with it through the user's
  own gateway; the service records the request under that user's name.

CI runs as root, which can make the users and run the hub (with configurable-http-proxy, which
./dev.sh test installs from npm); one hub and one engine serve the whole module.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from ..multiuser import make_group, make_user, remove_user, users_python
from ..serverproc import free_port

PROJECT = Path(__file__).resolve().parents[2]
SERVICE = "llm"
PUBLISHERS = "llm-publishers"  # a hub group nobody is in: only the admin may publish here
ADMIN = "boss"  # a hub admin, no Unix account (never spawns a server)
PORTS = "19200-19209"  # the service's engines

HUB_CONFIG = """\
c = get_config()  # noqa
c.JupyterHub.bind_url = "http://127.0.0.1:{proxy_port}"
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = {hub_port}
c.ConfigurableHTTPProxy.api_url = "http://127.0.0.1:{proxy_api_port}"
c.ConfigurableHTTPProxy.command = [{chp!r}]
c.JupyterHub.db_url = "sqlite:///{hub_dir}/jupyterhub.sqlite"
c.JupyterHub.cookie_secret_file = "{hub_dir}/jupyterhub_cookie_secret"
c.JupyterHub.authenticator_class = "dummy"
c.Authenticator.allowed_users = {{{user!r}}}
c.Authenticator.admin_users = {{{admin!r}}}

# --- the box service: as docs/shared-server.md says ---
c.JupyterHub.services = [{{
    "name": "llm",
    "url": "http://127.0.0.1:{service_port}",
    "command": [{python!r}, "-m", "sage_nb.service", "--state-dir", {state_dir!r}, "--publishers", {publishers!r}],
    "user": {service_user!r},
    "environment": {service_env!r},
}}]
c.JupyterHub.load_roles = [{{"name": "user", "scopes": ["self", "access:services!service=llm"]}}]
c.Spawner.server_token_scopes = ["users:activity!user", "access:servers!server", "access:services!service=llm"]
c.Spawner.environment = {{"SAGE_NB_BOX_SERVICE": "http://127.0.0.1:{proxy_port}/services/llm/"}}
# --- end ---

c.Spawner.cmd = [{python!r}, "-m", "jupyterhub.singleuser"]
c.Spawner.environment.update({user_env!r})
c.Spawner.start_timeout = 180
c.Spawner.http_timeout = 180
"""


def http(method: str, url: str, token: str | None = None, body=None, timeout: float = 60) -> tuple[int, object]:
    """One JSON request (no proxy): (status, reply)."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"token {token}"
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def until(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-6000:] if log else ""
            raise AssertionError(f"{what}: not in {timeout:.0f} s\n{tail}")
        time.sleep(0.3)


def configurable_http_proxy() -> str:
    """The proxy on PATH, or where ./dev.sh test installs it (the venv's node prefix)."""
    found = shutil.which("configurable-http-proxy") or shutil.which(
        "configurable-http-proxy", path=str(Path(sys.prefix) / "node" / "node_modules" / ".bin"))
    assert found, "configurable-http-proxy is not installed: ./dev.sh test installs it (npm, into .venv/node)"
    return found


class Hub:
    """The running hub, as its users reach it (through the proxy)."""

    def __init__(self, url: str, log: Path, user, service_user, root: Path) -> None:
        self.url, self.log, self.user, self.service_user, self.root = url, log, user, service_user, root
        self.service = f"{url}services/{SERVICE}/"

    def login(self, name: str, **body) -> str:
        """A token for ``name``, as a user gets one by logging in through the hub's API (the dummy
        authenticator takes any password); ``body``: scopes, expires_in..."""
        code, reply = http("POST", f"{self.url}hub/api/users/{name}/tokens",
                           body={"auth": {"username": name, "password": "any"}, "note": "test", **body})
        assert code == 201, (code, reply)
        return reply["token"]


@pytest.fixture(scope="module")
def hub():
    root = Path(tempfile.mkdtemp(prefix="sage-box-hub-", dir="/var/tmp"))
    os.chmod(root, 0o755)
    group = make_group()
    users = []
    proc = None
    hub_dir = root / "hub"
    try:
        env = users_python(root / "env")
        # the users' environment has sage_nb installed with its server extension enabled there
        conf = env.prefix / "etc" / "jupyter" / "jupyter_server_config.d"
        conf.mkdir(parents=True, exist_ok=True)
        shutil.copy(PROJECT / "jupyter_config" / "jupyter_server_config.d" / "sage_nb.json", conf)
        subprocess.run(["chmod", "-R", "a+rX", str(env.prefix / "etc")], check=True)
        service_user, user = make_user(group, root / "home"), make_user(group, root / "home")
        users = [service_user, user]
        for u in users:  # their passwd home is where make_user made it (the spawners cd there, set HOME)
            subprocess.run(["usermod", "-d", str(u.home), u.name], check=True)
        state = root / "llm-state"  # the service's own: registry, engine keys and logs, key store
        state.mkdir(mode=0o700)
        os.chown(state, service_user.uid, service_user.gid)
        hub_dir.mkdir(mode=0o700)
        proxy_port = free_port()
        run_env = {**env.env(), "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
        config = HUB_CONFIG.format(
            proxy_port=proxy_port, hub_port=free_port(), proxy_api_port=free_port(), service_port=free_port(),
            chp=configurable_http_proxy(), hub_dir=hub_dir, user=user.name, admin=ADMIN, python=env.python,
            state_dir=str(state), publishers=PUBLISHERS, service_user=service_user.name,
            service_env={**run_env, "SAGE_NB_PORT_RANGE": PORTS}, user_env=run_env)
        (hub_dir / "jupyterhub_config.py").write_text(config)
        log = hub_dir / "hub.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(hub_dir / "jupyterhub_config.py")],
                                    cwd=hub_dir, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        h = Hub(f"http://127.0.0.1:{proxy_port}/", log, user, service_user, root)

        def up(url):
            assert proc.poll() is None, log.read_text(errors="replace")[-6000:]
            return http("GET", url, timeout=5)[0] in (200, 401)

        until("the hub answers", lambda: up(h.url + "hub/api/"), 120, log)
        until("the box service answers", lambda: up(h.service + "sage_nb/api/box"), 120, log)
        yield h
    finally:
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # the hub stops the servers, the service and the proxy
                try:
                    proc.wait(60)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            try:  # a proxy the hub left behind
                pid = int((hub_dir / "jupyterhub-proxy.pid").read_text())
                if "configurable-http-proxy" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace"):
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError):
                pass
        for u in users:  # their servers, kernels, the service and its engine; userdel refuses while any runs
            subprocess.run(["pkill", "-KILL", "-u", u.name], check=False)
            deadline = time.monotonic() + 30
            while subprocess.run(["pgrep", "-u", u.name], capture_output=True).returncode == 0 \
                    and time.monotonic() < deadline:
                time.sleep(0.2)
            remove_user(u)
        subprocess.run(["groupdel", group], check=False)
        subprocess.run(["rm", "-rf", str(root)], check=False)


def test_the_service_refuses_bad_hub_credentials_with_words(hub):
    box = hub.service + "sage_nb/api/box"
    code, reply = http("GET", box)
    assert code == 401 and "no credential" in reply["message"] and "JUPYTERHUB_API_TOKEN" in reply["message"], reply
    code, reply = http("GET", box, token="not-a-token-of-this-hub")
    assert code == 401 and "the hub does not know this token" in reply["message"], reply
    # a real token of a real user, without the service's access scope
    restricted = hub.login(hub.user.name, scopes=["read:users:name!user"])
    code, reply = http("GET", box, token=restricted)
    assert code == 403 and "access:services!service=llm" in reply["message"], reply
    code, reply = http("POST", hub.service + "sage_nb/api/engines", token=restricted, body={"model": "m"})
    assert code == 403 and "access:services!service=llm" in reply["message"], reply

    # a user's full token: they may list and use, not publish
    token = hub.login(hub.user.name)
    code, me = http("GET", box, token=token)
    assert code == 200 and (me["user"], me["via"], me["may_publish"]) == (hub.user.name, "hub", False), me
    assert http("GET", hub.service + "sage_nb/api/engines", token=token) == (200, [])
    code, reply = http("POST", hub.service + "sage_nb/api/engines", token=token, body={"model": "m", "name": "x"})
    assert code == 403 and f"{hub.user.name!r} may not" in reply["message"] and "admins" in reply["message"], reply
    admin = hub.login(ADMIN)
    code, me = http("GET", box, token=admin)
    assert code == 200 and (me["user"], me["may_publish"]) == (ADMIN, True), me
    # a member of the publishers' hub group may publish (the hub's model of every token has its groups)
    members = f"{hub.url}hub/api/groups/{PUBLISHERS}"
    assert http("POST", members, token=admin, body={"users": [hub.user.name]})[0] == 201
    try:
        code, me = http("GET", box, token=hub.login(hub.user.name, scopes=["access:services!service=llm"]))
        assert code == 200 and me["may_publish"] is True, me
    finally:
        assert http("DELETE", members, token=admin)[0] == 204


def run_cell(url: str, token: str, code: str, timeout: float = 300) -> str:
    """Execute ``code`` in a kernel over its websocket (``url``: ws://.../api/kernels/<id>/channels);
    its text output (streams, text/plain results, tracebacks)."""
    from tornado.httpclient import HTTPRequest
    from tornado.websocket import websocket_connect

    async def run() -> str:
        ws = await websocket_connect(HTTPRequest(url, headers={"Authorization": f"token {token}"}))
        msg_id = uuid.uuid4().hex
        ws.write_message(json.dumps({
            "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": uuid.uuid4().hex,
                       "username": "test", "version": "5.3"},
            "parent_header": {}, "metadata": {}, "channel": "shell", "buffers": [],
            "content": {"code": code, "silent": False, "store_history": False, "user_expressions": {},
                        "allow_stdin": False, "stop_on_error": True}}))
        out = []
        try:
            while True:
                raw = await asyncio.wait_for(ws.read_message(), timeout)
                assert raw is not None, f"the kernel's websocket closed; so far: {''.join(out)}"
                msg = json.loads(raw)
                if msg.get("parent_header", {}).get("msg_id") != msg_id:
                    continue
                kind, content = msg["msg_type"], msg["content"]
                if kind == "stream":
                    out.append(content["text"])
                elif kind in ("execute_result", "display_data"):
                    out.append(content["data"].get("text/plain", "") + "\n")
                elif kind == "error":
                    out.append("\n".join(content["traceback"]))
                elif kind == "status" and content["execution_state"] == "idle":
                    return "".join(out)
        finally:
            ws.close()

    return asyncio.run(run())


@pytest.mark.vllm
def test_an_admin_publishes_and_a_users_kernel_lists_and_chats_through_the_hub(hub, tiny_llama):
    model = hub.root / "tiny-llama"  # where the service user can read it
    subprocess.run(["cp", "-r", str(tiny_llama), str(model)], check=True)
    subprocess.run(["chmod", "-R", "a+rX", str(model)], check=True)

    admin = hub.login(ADMIN)
    code, engine = http("POST", hub.service + "sage_nb/api/engines", token=admin,
                        body={"model": str(model), "name": "tiny"})
    assert code == 202 and engine["publisher"] == ADMIN, engine

    # meanwhile the user logs in and starts their server through the hub's API
    name = hub.user.name
    token = hub.login(name)
    code, reply = http("POST", f"{hub.url}hub/api/users/{name}/server", token=token)
    assert code in (201, 202), (code, reply)
    until("the user's server is ready",
          lambda: http("GET", f"{hub.url}hub/api/users/{name}", token=token)[1]["servers"].get("", {}).get("ready"),
          180, hub.log)
    server = f"{hub.url}user/{name}/"
    code, kernel = http("POST", server + "api/kernels", token=token, body={"name": "python3"})
    assert code == 201, (code, kernel)

    deadline = time.monotonic() + 600
    while True:
        code, engine = http("GET", hub.service + f"sage_nb/api/engines/{engine['id']}", token=admin)
        assert code == 200, engine
        if engine["state"] == "ready":
            break
        if engine["state"] != "starting" or time.monotonic() > deadline:
            logs = http("GET", hub.service + f"sage_nb/api/engines/{engine['id']}/logs", token=admin)[1]
            raise AssertionError(f"{engine}\n{json.dumps(logs)[-4000:]}")
        time.sleep(1)

    # the user's server sees it through the link, as theirs to use
    code, backends = http("GET", server + "sage_nb/api/backends", token=token)
    assert code == 200 and backends["box"]["state"] == "available" and backends["box"]["user"] == name, backends
    assert [(b["name"], b["shared"], b["publisher"]) for b in backends["llm_backends"]] == [("tiny", True, ADMIN)]

    ws = server.replace("http://", "ws://") + f"api/kernels/{kernel['id']}/channels"
    listed = run_cell(ws, token, "%load_ext sage_nb\n%llm backends")
    assert "tiny" in listed and f"shared by {ADMIN} (box service)" in listed, listed
    said = run_cell(ws, token, "from sage_nb import client\n"
                               "llm = client.llm()\n"
                               "reply = llm.chat.completions.create(model=llm.model, max_tokens=8, "
                               "messages=[{'role': 'user', 'content': 'hi'}])\n"
                               "print('MODEL', llm.model, 'TOKENS', reply.usage.completion_tokens)\n"
                               "print('TEXT', repr(reply.choices[0].message.content))")
    assert "MODEL tiny TOKENS" in said and "TEXT '" in said and "TOKENS 0" not in said, said

    code, box = http("GET", hub.service + "sage_nb/api/box", token=admin)
    assert code == 200 and box["usage"][name]["requests"] >= 1 and box["usage"][name]["models"].get("tiny"), box
    code, stopped = http("DELETE", hub.service + f"sage_nb/api/engines/{engine['id']}", token=admin)
    assert code == 200 and stopped["state"] == "stopped", stopped
