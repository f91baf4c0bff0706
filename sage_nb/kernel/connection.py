"""How a kernel finds its Jupyter server: ``jpserver-<JPY_PARENT_PID>.json`` in the Jupyter
runtime dir (url, token, base_url), with ``SAGE_NB_SERVER_URL`` / ``SAGE_NB_TOKEN`` overrides; and
which kernel and notebook it is (:func:`this_kernel`)."""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sage_nb.controlplane import validation
from sage_nb.controlplane.errors import BadRequest, Conflict, ControlPlaneError, NotFound

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
ERRORS = {400: BadRequest, 404: NotFound, 409: Conflict}


@dataclass
class ServerInfo:
    """Where the server is: ``url`` ends with its base_url and a slash."""

    url: str
    token: str
    source: str

    def api(self, *parts: str) -> str:
        return self.url + "/".join(p.strip("/") for p in parts)


def runtime_dir() -> Path:
    try:
        from jupyter_core.paths import jupyter_runtime_dir

        return Path(jupyter_runtime_dir())
    except ImportError:  # pragma: no cover - jupyter_core comes with every kernel
        return Path.home() / ".local" / "share" / "jupyter" / "runtime"


def find_server(url: str | None = None, token: str | None = None) -> ServerInfo | None:
    """The server this kernel belongs to, or ``None`` (plain IPython, another front end)."""
    url = url or os.environ.get("SAGE_NB_SERVER_URL")
    token = token if token is not None else os.environ.get("SAGE_NB_TOKEN")
    if url:
        return ServerInfo(url.rstrip("/") + "/", token or "", "environment")
    parent = os.environ.get("JPY_PARENT_PID")
    if not parent:
        return None
    info_file = runtime_dir() / f"jpserver-{parent}.json"
    try:
        info = json.loads(info_file.read_text())
    except (OSError, ValueError):
        return None
    return ServerInfo(info["url"].rstrip("/") + "/", token or info.get("token", ""), str(info_file))


def this_kernel() -> tuple[str | None, str | None]:
    """This kernel's id and its notebook: the id from its connection file's name (``kernel-<id>.json``,
    as Jupyter names it), the notebook's path from ``JPY_SESSION_NAME`` (jupyter_server sets it for a
    session's kernel). ``None`` for what is not known (plain IPython, a kernel started by hand)."""
    notebook = os.environ.get("JPY_SESSION_NAME") or None
    try:
        from ipykernel.connect import get_connection_file

        name = Path(get_connection_file()).name
    except (ImportError, RuntimeError, OSError):  # not in a running kernel, or its file is gone
        return None, notebook
    match = re.fullmatch(r"kernel-(.+)\.json", name)
    try:
        return (validation.kernel_id(match.group(1)) if match else None), notebook
    except BadRequest:
        return None, notebook


def request(server: ServerInfo, method: str, path: str, body=None, timeout: float = 30.0):
    """One REST call; JSON errors of the server become the control plane's exceptions."""
    data = json.dumps(body).encode() if body is not None else (b"" if method == "POST" else None)
    req = urllib.request.Request(server.api(path), data=data, method=method,
                                 headers={"Authorization": f"token {server.token}",
                                          "Content-Type": "application/json"})
    try:
        with _OPENER.open(req, timeout=timeout) as resp:
            return json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as e:
        try:
            message = json.loads(e.read()).get("message") or e.reason
        except (ValueError, AttributeError):
            message = str(e.reason)
        error = ERRORS.get(e.code, ControlPlaneError)(message)
        error.status = e.code
        raise error from None


def reachable(server: ServerInfo, timeout: float = 2.0) -> tuple[bool, str]:
    """Whether the sage_nb extension answers with this token, and why not."""
    try:
        request(server, "GET", "sage_nb/api/backends", timeout=timeout)
        return True, "ok"
    except ControlPlaneError as e:
        if e.status == 403:
            return False, "the server refused the token (403)"
        if e.status == 404:
            return False, "the server answers but the sage_nb extension is not enabled (404)"
        return False, f"the server answered {e.status}: {e.message}"
    except (OSError, ValueError) as e:
        return False, f"cannot reach {server.url}: {e}"
