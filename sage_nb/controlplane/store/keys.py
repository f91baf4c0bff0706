"""Per-user keys of a standalone box service: what ``python -m sage_nb.admin add-key`` issues.

The service keeps only the keys' SHA-256 hashes, by user, in ``keys.json`` in its own state
directory (owned by the service user, 0600); revoked hashes stay listed so a revoked key is told
apart from a wrong one. Each user's key is in a file of their own (default
``/etc/sage_nb/keys/<user>``, owned by that user, 0400, in a root-owned folder of mode 0711: nobody
can list it or read another's file). The store is re-read whenever its file changes, so an issue or
a revocation takes effect with the next request.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import tempfile
import time
from pathlib import Path

from ..errors import BadRequest, StateError

KEYS_FILE = "keys.json"
KEY_PREFIX = "sk-sage-"
DEFAULT_KEY_DIR = Path("/etc/sage_nb/keys")


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStoreError(StateError):
    """The key store cannot be read as it is (503); the message says what to fix."""


class KeyStore:
    """The service's table of key hashes: ``{"users": {name: [hash, ...]}, "revoked": {hash: name}}``."""

    def __init__(self, state_dir: Path) -> None:
        self.path = Path(state_dir) / KEYS_FILE
        self._stamp: tuple | None = None
        self._by_hash: dict[str, str] = {}
        self._revoked: dict[str, str] = {}

    def _load(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {"users": {}, "revoked": {}}
        except (OSError, ValueError) as e:
            raise KeyStoreError(f"the box service's key store {self.path} cannot be read ({e}); an admin "
                                "repairs it: python -m sage_nb.admin list-keys --service-dir "
                                f"{self.path.parent}") from None
        if not (isinstance(data, dict) and isinstance(data.get("users"), dict)
                and isinstance(data.get("revoked", {}), dict)
                and all(isinstance(h, list) for h in data["users"].values())):
            raise KeyStoreError(f"the box service's key store {self.path} is malformed: expected "
                                '{"users": {name: [hash, ...]}, "revoked": {hash: name}}')
        data.setdefault("revoked", {})
        return data

    def _refresh(self) -> None:
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and stamp is not None:
            return
        data = self._load()
        self._by_hash = {h: user for user, hashes in data["users"].items() for h in hashes}
        self._revoked = dict(data["revoked"])
        self._stamp = stamp

    def user_for(self, key: str) -> tuple[str | None, str]:
        """The user a key was issued to, or ``(None, why not)``: unknown or revoked."""
        self._refresh()
        h = digest(key)
        if h in self._by_hash:
            return self._by_hash[h], ""
        if h in self._revoked:
            return None, (f"this key of {self._revoked[h]!r} was revoked; ask an admin for a new one "
                          "(python -m sage_nb.admin add-key USER)")
        return None, "unknown key: send your JupyterHub token or the key an admin issued you"

    # ---------------------------------------------------------------- admin side
    def users(self) -> dict[str, int]:
        """Users with live keys, and how many each has."""
        return {user: len(hashes) for user, hashes in self._load()["users"].items() if hashes}

    def issue(self, user: str, owner_uid: int = -1) -> str:
        """A new key for ``user`` (their earlier keys stay valid); only its hash is stored."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        data = self._load()
        data["users"].setdefault(user, []).append(digest(key))
        self._write(data, owner_uid)
        return key

    def revoke(self, user: str, owner_uid: int = -1) -> int:
        """Revoke every key of ``user``; returns how many."""
        data = self._load()
        hashes = data["users"].pop(user, [])
        for h in hashes:
            data["revoked"][h] = user
        self._write(data, owner_uid)
        return len(hashes)

    def _write(self, data: dict, owner_uid: int) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data["updated_at"] = time.time()
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1)
            os.chmod(tmp, 0o600)
            if owner_uid >= 0:
                os.chown(tmp, owner_uid, -1)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def read_key_file(path: Path) -> str:
    """A user's key from their key file; a clear error when it is missing, unreadable or malformed."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        raise BadRequest(f"no box service key file at {path}: an admin issues one with "
                         "python -m sage_nb.admin add-key YOUR_USER_NAME") from None
    except OSError as e:
        raise BadRequest(f"cannot read the box service key file {path}: {e}") from None
    if not text.startswith(KEY_PREFIX) or len(text.split()) != 1 or len(text) < len(KEY_PREFIX) + 20:
        raise BadRequest(f"the box service key file {path} is malformed: it should hold one key "
                         f"starting {KEY_PREFIX!r} (an admin reissues it: python -m sage_nb.admin add-key USER)")
    return text


def write_key_file(path: Path, key: str, uid: int, gid: int) -> None:
    """Write a user's key file (0400, theirs) in a root-owned folder that nobody may list (0711)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if os.getuid() == 0:
        os.chmod(path.parent, 0o711)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    path.unlink(missing_ok=True)
    fd = os.open(path, flags, 0o400)
    try:
        os.write(fd, (key + "\n").encode())
        if uid >= 0:
            os.fchown(fd, uid, gid)
        os.fchmod(fd, 0o400)
    finally:
        os.close(fd)
