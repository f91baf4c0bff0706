"""A real ``jupyter server`` subprocess with the sage_nb extension (as ``tests/serverproc.py`` starts
one), timed from its launch, with a private config, runtime and data dir."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from .common import free_port, http_get, kill_group, spawn, wait_until

TOKEN = "sage-bench-token"
BASE = "/bench/"


class JServer:
    def __init__(self, root: Path, state_dir: Path, extra_args: tuple[str, ...] = ()) -> None:
        self.root, self.state_dir, self.extra_args = Path(root), Path(state_dir), list(extra_args)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{BASE}"
        self.proc = None
        self.started = 0.0

    def start(self) -> None:
        import os

        cfg = self.root / "cfg"
        cfg.mkdir(parents=True, exist_ok=True)
        (cfg / "jupyter_server_config.json").write_text(json.dumps({"SageNBApp": {"port_range": [19500, 19599]}}))
        env = {**os.environ, "JUPYTER_CONFIG_DIR": str(cfg), "JUPYTER_RUNTIME_DIR": str(self.root / "runtime"),
               "JUPYTER_DATA_DIR": str(self.root / "data"), "JUPYTER_PLATFORM_DIRS": "1"}
        cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", f"--port={self.port}",
               "--ip=127.0.0.1", f"--ServerApp.base_url={BASE}", f"--IdentityProvider.token={TOKEN}",
               "--ServerApp.jpserver_extensions={'sage_nb': True}", f"--SageNBApp.state_dir={self.state_dir}",
               *self.extra_args]
        self.started = time.perf_counter()
        self.proc = spawn(cmd, env, self.root / "server.log")

    def get(self, path: str) -> tuple[int, object]:
        code, body = http_get(self.url + path, {"Authorization": f"token {TOKEN}"}, timeout=10)
        try:
            return code, json.loads(body or b"null")
        except ValueError:
            return code, None

    def wait_up(self, timeout: float = 60.0) -> float:
        """Seconds from launch until ``sage_nb/api/backends`` answers 200."""
        def up() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited: {self.log_tail()}")
            return self.get("sage_nb/api/backends")[0] == 200
        wait_until(up, timeout, 0.02, "jupyter server up")
        return time.perf_counter() - self.started

    def wait_backends(self, names: set[str], timeout: float = 60.0) -> float:
        """Seconds from launch until every served name in ``names`` is a backend."""
        def listed() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter server exited: {self.log_tail()}")
            code, data = self.get("sage_nb/api/backends")
            if code != 200:
                return False
            have = {e["served_model_name"] for kind in data.values() for e in kind}
            return names <= have
        wait_until(listed, timeout, 0.02, f"{len(names)} backends listed")
        return time.perf_counter() - self.started

    def log_tail(self) -> str:
        try:
            return (self.root / "server.log").read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def stop(self) -> None:
        kill_group(self.proc, grace=5.0)
        self.proc = None

    def __enter__(self) -> JServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
