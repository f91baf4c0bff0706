"""A real ``jupyter server`` subprocess with the sage_nb extension, for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

TOKEN = "sage-test-token"
BASE = "/jp%40x/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A jupyter server subprocess with the sage_nb extension enabled."""

    def __init__(self, root, state_dir, port, port_range=(18900, 18949), extra_args=(), adopt=False, base=BASE,
                 python=sys.executable, run_as=(), env=None):
        self.root, self.state_dir, self.port, self.proc, self.base = root, state_dir, port, None, base
        self.port_range, self.extra_args = port_range, list(extra_args)
        self.adopt = adopt  # tests see only their own engines, not other vLLM servers of this user
        self.url = f"http://127.0.0.1:{port}{base}"
        # another user's server: its interpreter, the command that runs it as them, their environment
        self.python, self.run_as, self.env = python, list(run_as), os.environ if env is None else env

    def start(self) -> None:
        env = {**self.env, "JUPYTER_CONFIG_DIR": str(self.root / "cfg"),
               "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"), "JUPYTER_DATA_DIR": str(self.root / "data")}
        (self.root / "cfg").mkdir(exist_ok=True)  # the config-file route: c.SageNBApp.port_range
        (self.root / "cfg" / "jupyter_server_config.json").write_text(
            json.dumps({"SageNBApp": {"port_range": list(self.port_range), "adopt_unrecorded": self.adopt}}))
        self.log = open(self.root / f"server-{time.time():.0f}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.run_as, self.python, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={self.port}",
             "--ip=127.0.0.1", f"--ServerApp.base_url={self.base}", f"--IdentityProvider.token={TOKEN}",
             "--ServerApp.jpserver_extensions={'sage_nb': True}",
             f"--SageNBApp.state_dir={self.state_dir}", *self.extra_args],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.get("api/status")[0] == 200:
                    return
            except OSError:
                pass
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log_text()
            time.sleep(0.2)

    def log_text(self) -> str:
        return self.log.name and open(self.log.name, errors="replace").read()[-3000:]

    def request(self, method: str, path: str, body=None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Authorization": f"token {TOKEN}"})
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def get(self, path: str):
        return self.request("GET", path)

    def kill(self) -> None:
        """SIGKILL the server (if it still runs) and reap it."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def wait_ready(server: Server, engine_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        code, e = server.get(f"sage_nb/api/engines/{engine_id}")
        assert code == 200, e
        if e["state"] == "ready":
            return e
        assert e["state"] == "starting" and time.monotonic() < deadline, e
        time.sleep(0.5)


def stub_model(root) -> str:
    """A config-only model directory: enough for the stub engine and for sizing."""
    model = root / "stub-model"
    model.mkdir(exist_ok=True)
    (model / "config.json").write_text('{"num_hidden_layers": 1, "num_attention_heads": 1, "hidden_size": 8}')
    return str(model)


@contextmanager
def running_server(root, port_range=(18900, 18949), stub_engines=False, extra_args=(), base=BASE, env=None):
    """A started server (``env``: more of its environment); afterwards it is killed and no process of
    its engines is left."""
    from sage_nb.controlplane import ControlPlane
    from sage_nb.controlplane.engines.process import group_members

    from .conftest import STUB_PATH

    args = list(extra_args)
    if stub_engines:
        args.append(f"--SageNBApp.engine_env={json.dumps({'PYTHONPATH': STUB_PATH})}")
    server = Server(root, root / "state", free_port(), port_range=port_range, extra_args=args, base=base,
                    env={**os.environ, **env} if env else None)
    server.start()
    try:
        yield server
    finally:
        server.kill()
        cp = ControlPlane(state_dir=server.state_dir, monitor=False)
        for engine in cp.engines():
            for proc in group_members(engine["pid"]) if engine["pid"] else []:
                proc.kill()
        cp.close()
