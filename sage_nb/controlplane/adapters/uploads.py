"""Adapters that users of the box service send it: the service cannot read their homes, so a user's
own server reads the adapter's files (:func:`pack`) and sends them; the service keeps them under the
user's name (:class:`AdapterUploads`) for as long as the adapter is loaded.

Who may use an adapter on a shared engine is on its record: ``owner`` (who loaded it) and ``users``
(whom the owner shares it with: user names, ``@group``, or ``*`` for everyone); :func:`may_use` is the
one rule, used by the gateway, the model lists and the link of users' servers.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from .. import validation
from ..errors import BadRequest, NotFound
from . import check

FILES = (check.CONFIG, *check.WEIGHTS)  # what vLLM reads of an adapter: nothing else is sent or kept
MAX_BYTES = 512 * 1024 * 1024  # one adapter's files (a rank-64 LoRA of every linear layer of an 8B model: ~670 MB
#                                in fp32, ~170 MB in bf16 at rank 16)
MAX_BODY = MAX_BYTES * 4 // 3 + 2**20  # the request that carries them, base64 in JSON (the service's max_body_size)
EVERYONE = "*"


def may_use(adapter: dict, user: str, groups: tuple[str, ...] | list[str] = ()) -> bool:
    """Whether ``user`` (in ``groups``) may send requests to ``adapter``: its owner, whom it is shared with,
    everyone when it has no owner (an adapter of a private server, or one started with its engine)."""
    owner = adapter.get("owner")
    if owner is None or owner == user:
        return True
    users = adapter.get("users") or []
    return EVERYONE in users or user in users or any(f"@{g}" in users for g in groups)


def mark_usable(engines: list[dict], user: str, groups: tuple[str, ...] | list[str] = ()) -> list[dict]:
    """The engines' models with each adapter marked ``usable`` by ``user`` (a user's server links only
    those to its gateway)."""
    return [{**e, "adapters": [{**a, "usable": may_use(a, user, groups)} for a in e.get("adapters") or []]}
            for e in engines]


def share_list(value) -> list[str]:
    """The ``share`` of a load: user names, ``@group`` names, or ``*``; a clear 400 for anything else."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest("'share' must be a list of user names, '@group' names or '*' (everyone)")
    out = []
    for v in (v.strip() for v in value):
        name = v[1:] if v.startswith("@") else v
        if v != EVERYONE and not validation.USER_NAME.fullmatch(name):
            raise BadRequest(f"cannot share with {v!r}: give user names, '@group' names or '*' (everyone)")
        out.append(v)
    return sorted(set(out))


def pack(path: str) -> dict[str, str]:
    """The adapter at ``path`` as the box service takes it: each file vLLM reads, base64. Checked first
    (:func:`check.read_adapter`), so a bad directory is refused before anything is sent."""
    files = check.read_adapter(path)
    out, total = {}, 0
    for name in FILES:
        where = Path(files.path) / name
        total += where.stat().st_size
        if total > MAX_BYTES:
            raise BadRequest(f"adapter {path!r} is larger than the box service takes ({MAX_BYTES // 2**20} MiB)")
        out[name] = base64.b64encode(where.read_bytes()).decode()
    return out


def unpack(files) -> dict[str, bytes]:
    """The files a user sent (``{name: base64}``), decoded; a 400 that says what is wrong."""
    if not isinstance(files, dict) or not files:
        raise BadRequest(f"'files' must be an object of the adapter's files by name ({', '.join(FILES)}), "
                         "each base64")
    unknown = sorted(set(files) - set(FILES))
    if unknown:
        raise BadRequest(f"unexpected file(s) {', '.join(map(repr, unknown))}: send {', '.join(FILES)} only")
    missing = [n for n in FILES if n not in files]
    if missing:
        raise BadRequest(f"the adapter's {', '.join(missing)} is missing: send the directory peft's "
                         "save_pretrained wrote")
    out, total = {}, 0
    for name, text in files.items():
        if not isinstance(text, str):
            raise BadRequest(f"file {name!r} must be a base64 string")
        total += len(text) * 3 // 4
        if total > MAX_BYTES:
            raise BadRequest(f"the adapter is larger than the box service takes ({MAX_BYTES // 2**20} MiB)")
        try:
            out[name] = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(f"file {name!r} is not valid base64") from None
    return out


class AdapterUploads:
    """The users' adapter files on the box service: ``<root>/<user>/<name>-<digest>/``, readable by the
    service (and so by its engines) only. The digest of the contents is in the folder's name, so the same
    files sent again are the same adapter, and new files under a loaded name are a different one."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def save(self, user: str, name: str, files: dict[str, bytes]) -> str:
        """Store ``user``'s adapter ``name``; its folder (checked as any adapter is: :func:`check.read_adapter`)."""
        validation.adapter_name(name)
        if not validation.USER_NAME.fullmatch(user):
            raise BadRequest(f"no adapter folder for user {user!r}")
        digest = hashlib.sha256(b"".join(hashlib.sha256(files[n]).digest() for n in FILES)).hexdigest()[:16]
        home = self.root / user
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        final = home / f"{name}-{digest}"
        if final.is_dir():
            return str(final)
        work = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=home))
        try:
            for n, data in files.items():
                (work / n).write_bytes(data)
            check.read_adapter(str(work))  # a bad config or weights: refused with the reason, nothing kept
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return str(final)

    def owns(self, path: str) -> bool:
        """Whether ``path`` is an uploaded adapter's folder (and so goes when it is unloaded)."""
        try:
            return Path(path).resolve().parent.parent == self.root.resolve()
        except OSError:
            return False

    def remove(self, path: str) -> None:
        """Delete an uploaded adapter's folder (never anything outside the uploads)."""
        if not self.owns(path):
            raise NotFound(f"{path} is not an uploaded adapter")
        shutil.rmtree(path, ignore_errors=True)

    def prune(self, in_use: set[str]) -> list[str]:
        """Delete the uploaded folders no live engine's record names (their engine was stopped or removed);
        the folders deleted."""
        gone = []
        for folder in self.root.glob("*/*"):
            if folder.is_dir() and str(folder) not in in_use:
                shutil.rmtree(folder, ignore_errors=True)
                gone.append(str(folder))
        return gone
