"""The box service's pieces that need no process: where it listens, who may publish, cache salts."""

from __future__ import annotations

from argparse import Namespace

import pytest

from sage_nb.server.box.identity import Caller
from sage_nb.server.box.service import BoxPolicy, NotPublisher, salt_secret, where_to_listen


def args(**kw) -> Namespace:
    return Namespace(**{"ip": None, "port": None, "base_url": None, **kw})


def test_a_managed_service_listens_where_the_hub_says(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_SERVICE_URL", "http://127.0.0.1:8765")
    monkeypatch.setenv("JUPYTERHUB_SERVICE_PREFIX", "/services/llm/")
    assert where_to_listen(args()) == ("127.0.0.1", 8765, "/services/llm/")
    assert where_to_listen(args(port=9000, base_url="box")) == ("127.0.0.1", 9000, "/box/")


def test_standalone_needs_a_port(monkeypatch):
    monkeypatch.delenv("JUPYTERHUB_SERVICE_URL", raising=False)
    monkeypatch.delenv("JUPYTERHUB_SERVICE_PREFIX", raising=False)
    assert where_to_listen(args(port=8765)) == ("127.0.0.1", 8765, "/")
    with pytest.raises(SystemExit, match="--port"):
        where_to_listen(args())


def test_publishers_are_admins_root_and_the_group():
    policy = BoxPolicy("llm-publishers", b"s" * 32)
    assert policy.may_publish(Caller(username="a", admin=True))
    assert policy.may_publish(Caller(username="root"))
    assert policy.may_publish(Caller(username="b", groups=("gpu", "llm-publishers")))
    bob = Caller(username="bob", groups=("gpu",))
    assert not policy.may_publish(bob)
    with pytest.raises(NotPublisher, match="'bob' may not stop shared engines.*llm-publishers"):
        policy.require_publisher(bob, "stop")
    assert not BoxPolicy("", b"s" * 32).may_publish(Caller(username="b", groups=("",)))


def test_cache_salts_differ_by_user_stay_stable_and_are_valid_for_vllm(tmp_path):
    secret = salt_secret(tmp_path)
    assert salt_secret(tmp_path) == secret  # kept across restarts
    policy, other = BoxPolicy("", secret), BoxPolicy("", b"another secret")
    alice, bob = policy.cache_salt("alice"), policy.cache_salt("bob")
    assert alice != bob and alice == BoxPolicy("", secret).cache_salt("alice")
    assert other.cache_salt("alice") != alice  # unguessable without the secret
    for salt in (alice, bob):  # vLLM's rule: a non-empty string of at most 128 chars without @ / \\ NUL
        assert 0 < len(salt) <= 128 and not set(salt) & set("@/\\\0")


def test_users_own_adapters_are_on_unless_the_service_says_no(tmp_path):
    from sage_nb.server.box.service import server_argv

    base = args(port=8765, state_dir=str(tmp_path), hub_cache_age=60, publishers="p", limits="", allow_root=False,
                server_args=[])
    assert "--SageNBApp.box_user_adapters=True" in server_argv(Namespace(**vars(base), no_user_adapters=False))
    argv = server_argv(Namespace(**vars(base), no_user_adapters=True))
    assert "--SageNBApp.box_user_adapters=False" in argv
    body = int(next(a for a in argv if a.startswith("--ServerApp.max_body_size=")).split("=")[1])
    assert body > 512 * 2**20 * 4 // 3  # the largest adapter it takes, base64 in JSON
    assert BoxPolicy("", b"s").user_adapters and not BoxPolicy("", b"s", user_adapters=False).user_adapters
