"""The box service's key store and users' key files (``python -m sage_nb.admin add-key``)."""

from __future__ import annotations

import json
import os
import stat

import pytest

from sage_nb.controlplane.errors import BadRequest
from sage_nb.controlplane.store.keys import KEY_PREFIX, KeyStore, KeyStoreError, read_key_file, write_key_file


def test_issue_check_and_revoke(tmp_path):
    store = KeyStore(tmp_path)
    first, second = store.issue("alice"), store.issue("alice")
    bob = store.issue("bob")
    assert first.startswith(KEY_PREFIX) and len({first, second, bob}) == 3
    assert store.user_for(first) == ("alice", "") and store.user_for(bob) == ("bob", "")
    assert stat.S_IMODE(os.stat(tmp_path / "keys.json").st_mode) == 0o600
    assert first not in (tmp_path / "keys.json").read_text()  # only hashes are kept
    assert store.users() == {"alice": 2, "bob": 1}
    assert store.revoke("alice") == 2
    name, why = store.user_for(second)
    assert name is None and "revoked" in why and "alice" in why
    name, why = store.user_for(KEY_PREFIX + "x" * 43)
    assert name is None and "unknown key" in why
    assert KeyStore(tmp_path).user_for(bob) == ("bob", "")  # another process sees the same store


def test_a_change_by_another_process_is_seen_at_the_next_check(tmp_path):
    store, admin = KeyStore(tmp_path), KeyStore(tmp_path)
    key = admin.issue("carol")
    assert store.user_for(key)[0] == "carol"
    admin.revoke("carol")
    assert store.user_for(key)[0] is None


@pytest.mark.parametrize("text", ["{not json", '["a list"]', '{"users": {"a": "not a list"}}'])
def test_a_malformed_store_is_an_error_with_words(tmp_path, text):
    (tmp_path / "keys.json").write_text(text)
    with pytest.raises(KeyStoreError) as e:
        KeyStore(tmp_path).user_for(KEY_PREFIX + "x" * 43)
    assert "keys.json" in e.value.message and e.value.status == 503


def test_key_files(tmp_path):
    path = tmp_path / "keys" / "alice"
    key = KeyStore(tmp_path).issue("alice")
    write_key_file(path, key, os.getuid(), os.getgid())
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400
    assert read_key_file(path) == key
    with pytest.raises(BadRequest, match="no box service key file"):
        read_key_file(tmp_path / "nobody")
    (tmp_path / "bad").write_text(json.dumps({"key": key}))
    with pytest.raises(BadRequest, match="malformed"):
        read_key_file(tmp_path / "bad")
