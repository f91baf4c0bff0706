"""A local, Hugging Face hub-compatible HTTP server for tests and demos (standard library only).

Point ``HF_ENDPOINT`` at :attr:`LocalHub.url` and huggingface_hub — sage_nb's sizing, vLLM's
download — talks to it instead of huggingface.co. It speaks the part of the hub's protocol that
huggingface_hub 2.x uses for model repositories:

- ``GET /api/models/{repo}[/revision/{rev}][?blobs=true]`` — ``model_info`` / ``repo_info``
  (``siblings`` with ``size``, ``blobId`` and ``lfs`` when ``blobs`` is asked);
- ``GET /api/models/{repo}/tree/{rev}[/{path}]`` — ``list_repo_tree`` (one page, no ``Link``);
- ``POST /api/models/{repo}/paths-info/{rev}`` — ``get_paths_info``;
- ``HEAD`` / ``GET /{repo}/resolve/{rev}/{file}`` — file metadata (``X-Repo-Commit``, ``ETag``,
  ``X-Linked-Etag`` / ``X-Linked-Size`` for LFS files, ``Content-Length``) and the bytes.

Errors carry the hub's ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``,
``EntryNotFound``, ``GatedRepo``), so the client raises its own typed errors. A model's file is
either its bytes or only a size: a made-up 70B model is a ``config.json`` and a list of sizes,
whose bytes are never served. A gated model shows its metadata (as the hub does) but answers
401 or 403 for its files. ``Range`` requests get their bytes (206). ``slow_weights`` holds back
each whole weight file that many seconds, so a download is slow enough to be watched.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["HubModel", "LocalHub"]

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
BRANCH = "main"


@dataclass
class HubModel:
    """One model repository: ``files`` maps a name to its bytes, or to a size only (metadata only)."""

    files: dict[str, bytes | int]
    gated: int | None = None     # 401 or 403: its files are refused with X-Error-Code GatedRepo
    sha: str = field(default="")  # the commit of ``main``; derived from the files when empty

    def __post_init__(self) -> None:
        if not self.sha:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(f"{name}\0{self.size(name)}\0{self.etag(name)}\n".encode())
            self.sha = digest.hexdigest()

    @classmethod
    def from_dir(cls, path: str | Path, **kw) -> HubModel:
        """Every file of a model directory (its subfolders too), served with its bytes."""
        root = Path(path)
        return cls({p.relative_to(root).as_posix(): p.read_bytes()
                    for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(".")}, **kw)

    @classmethod
    def metadata_only(cls, config: dict, weights: dict[str, int], **kw) -> HubModel:
        """A made-up model: a real ``config.json`` and weight files that are sizes only."""
        return cls({"config.json": json.dumps(config).encode(), **weights}, **kw)

    def size(self, name: str) -> int:
        data = self.files[name]
        return data if isinstance(data, int) else len(data)

    def is_lfs(self, name: str) -> bool:
        return name.endswith(LFS_SUFFIXES) or self.size(name) > 10 * 2**20

    def etag(self, name: str) -> str:
        """LFS files: the sha256 of their content; others: their git blob id (as the hub does)."""
        data = self.files[name]
        if isinstance(data, int):
            return hashlib.sha256(f"{name}:{data}".encode()).hexdigest()
        if self.is_lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()

    def blob_id(self, name: str) -> str:
        return hashlib.sha1(f"pointer:{name}:{self.etag(name)}".encode()).hexdigest() if self.is_lfs(name) \
            else self.etag(name)

    def entry(self, name: str) -> dict:
        """The file as ``list_repo_tree`` / ``get_paths_info`` describe it."""
        out = {"type": "file", "oid": self.blob_id(name), "size": self.size(name), "path": name}
        if self.is_lfs(name):
            out["lfs"] = {"oid": self.etag(name), "size": self.size(name), "pointerSize": 134}
        return out

    def info(self, repo: str, blobs: bool) -> dict:
        """The ``/api/models`` answer."""
        siblings = []
        for name in sorted(self.files):
            sibling: dict = {"rfilename": name}
            if blobs:
                sibling.update(size=self.size(name), blobId=self.blob_id(name))
                if self.is_lfs(name):
                    sibling["lfs"] = {"size": self.size(name), "sha256": self.etag(name), "pointerSize": 134}
            siblings.append(sibling)
        return {"_id": self.sha[:24], "id": repo, "modelId": repo, "author": repo.split("/")[0],
                "sha": self.sha, "private": False, "disabled": False,
                "gated": "manual" if self.gated else False, "downloads": 0, "likes": 0, "tags": [],
                "library_name": "transformers", "siblings": siblings,
                "lastModified": "2025-01-01T00:00:00.000Z", "createdAt": "2025-01-01T00:00:00.000Z"}


class LocalHub:
    """``with LocalHub({"org/name": HubModel(...)}) as hub:`` — a hub on ``hub.url`` (127.0.0.1).

    ``requests`` records each ``(method, path)`` it answered; ``slow_weights`` delays each whole
    LFS file (not a range of it) that many seconds."""

    def __init__(self, models: dict[str, HubModel] | None = None, slow_weights: float = 0.0) -> None:
        self.models = dict(models or {})
        self.slow_weights = slow_weights
        self.requests: list[tuple[str, str]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LocalHub:
        self._thread = threading.Thread(target=self._server.serve_forever, name="sage_nb-local-hub", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join()
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> LocalHub:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _split_repo(parts: list[str]) -> tuple[str, list[str]]:
    """``org/name/rest...`` (or ``name/rest...`` for a repo without an org, unknown here)."""
    return "/".join(parts[:2]), parts[2:]


def _handler(hub: LocalHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

        def log_message(self, *args) -> None:  # quiet: tests read hub.requests instead
            pass

        def do_HEAD(self) -> None:
            self._route(body=False)

        def do_GET(self) -> None:
            self._route(body=True)

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._form = self.rfile.read(length) if length else b""
            self._route(body=True)

        # ---------------------------------------------------------------- routing
        def _route(self, body: bool) -> None:
            url = urlsplit(self.path)
            hub.requests.append((self.command, url.path))
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            if parts == ["api", "agent-harnesses"]:  # huggingface_hub's agent detection: none known here
                return self._json({"standardEnvVars": [], "harnesses": {}}, body)
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo, rest = _split_repo(parts[2:])
                return self._api(repo, rest, query, body)
            if len(parts) >= 5 and parts[2] == "resolve":
                repo, rest = _split_repo(parts)
                return self._resolve(repo, rest[1], "/".join(rest[2:]), body)
            self._error(404, None, f"no route for {url.path}", body)

        def _model(self, repo: str, revision: str | None, body: bool) -> HubModel | None:
            model = hub.models.get(repo)
            if model is None:
                self._error(404, "RepoNotFound", "Repository not found", body)
            elif revision not in (None, BRANCH, model.sha):
                self._error(404, "RevisionNotFound", "Invalid rev id: " + revision, body)
            else:
                return model
            return None

        def _api(self, repo: str, rest: list[str], query: dict, body: bool) -> None:
            if not rest or rest[0] == "revision":
                model = self._model(repo, rest[1] if len(rest) > 1 else None, body)
                if model:
                    self._json(model.info(repo, query.get("blobs", ["false"])[0].lower() == "true"), body)
            elif rest[0] == "tree" and len(rest) >= 2:
                model = self._model(repo, rest[1], body)
                if model:
                    prefix = "/".join(rest[2:]).strip("/")
                    self._json(_tree(model, prefix, query.get("recursive", ["false"])[0].lower()
                                     in ("true", "1")), body)
            elif rest[0] == "paths-info" and len(rest) >= 2:
                model = self._model(repo, rest[1], body)
                if model:
                    wanted = parse_qs(self._form.decode()).get("paths", [])
                    self._json([model.entry(p) for p in wanted if p in model.files], body)
            else:
                self._error(404, None, f"no API route {'/'.join(rest)}", body)

        def _resolve(self, repo: str, revision: str, name: str, body: bool) -> None:
            model = self._model(repo, revision, body)
            if model is None:
                return
            if model.gated:
                return self._error(model.gated, "GatedRepo", f"Access to model {repo} is restricted. You must "
                                   "have access to it and be authenticated to access it. Please log in.", body)
            if name not in model.files:
                return self._error(404, "EntryNotFound", f"{name} does not exist on {revision!r}", body)
            data = model.files[name]
            if isinstance(data, int):
                return self._error(501, None, f"{name} is metadata only: its bytes are not served", body)
            headers = {"X-Repo-Commit": model.sha, "ETag": f'"{model.blob_id(name)}"',
                       "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
            if model.is_lfs(name):
                headers.update({"X-Linked-Etag": f'"{model.etag(name)}"', "X-Linked-Size": str(len(data)),
                                "ETag": f'"{model.etag(name)}"'})
            span = _byte_range(self.headers.get("Range"), len(data))
            if span is not None:  # a header read (safetensors metadata) or a resumed download
                start, end = span
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                return self._send(206, data[start:end + 1], headers, body)
            if body and model.is_lfs(name) and hub.slow_weights:
                time.sleep(hub.slow_weights)
            self._send(200, data, headers, body)

        # ---------------------------------------------------------------- answers
        def _json(self, value, body: bool) -> None:
            self._send(200, json.dumps(value).encode(), {"Content-Type": "application/json"}, body)

        def _error(self, status: int, code: str | None, message: str, body: bool) -> None:
            headers = {"Content-Type": "application/json", "X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, body)

        def _send(self, status: int, data: bytes, headers: dict, body: bool) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass

    Handler._form = b""
    return Handler


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``bytes=a-b``, ``bytes=a-`` or ``bytes=-n`` as (first, last) byte; None for the whole file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, _, last = header[6:].strip().partition("-")
    if not first:
        return max(0, size - int(last)), size - 1
    return int(first), min(int(last), size - 1) if last else size - 1


def _tree(model: HubModel, prefix: str, recursive: bool) -> list[dict]:
    """``list_repo_tree`` entries under ``prefix``: files, and folders when not recursive."""
    out, folders = [], set()
    for name in sorted(model.files):
        if prefix and not name.startswith(prefix + "/"):
            continue
        rest = name[len(prefix) + 1:] if prefix else name
        if "/" in rest and not recursive:
            folder = (prefix + "/" if prefix else "") + rest.split("/")[0]
            if folder not in folders:
                folders.add(folder)
                out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(), "size": 0,
                            "path": folder})
            continue
        if recursive and "/" in rest:
            parts = name.split("/")
            for i in range(len(prefix.split("/")) if prefix else 0, len(parts) - 1):
                folder = "/".join(parts[:i + 1])
                if folder not in folders:
                    folders.add(folder)
                    out.append({"type": "directory", "oid": hashlib.sha1(folder.encode()).hexdigest(),
                                "size": 0, "path": folder})
        out.append(model.entry(name))
    return out
