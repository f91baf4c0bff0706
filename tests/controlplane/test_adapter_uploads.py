"""Users' adapters sent to the box service: who may use one, the ``share`` list, the files as they travel
(base64, only what vLLM reads, a size limit) and as the service keeps them (one folder per user and
contents, nothing kept of a bad one, removed with the adapter, orphans pruned)."""

from __future__ import annotations

import base64
import json

import pytest

from sage_nb.controlplane.adapters import uploads
from sage_nb.controlplane.adapters.uploads import AdapterUploads, may_use, pack, share_list, unpack
from sage_nb.controlplane.errors import BadRequest, NotFound

from ..adapterfiles import fake_adapter


def test_an_adapter_is_its_owners_and_whom_they_share_it_with():
    mine = {"owner": "bob", "users": []}
    assert may_use(mine, "bob") and not may_use(mine, "alice", ("gpu",))
    assert may_use({"owner": "bob", "users": ["alice"]}, "alice")
    assert may_use({"owner": "bob", "users": ["@team"]}, "carol", ("gpu", "team"))
    assert not may_use({"owner": "bob", "users": ["@team"]}, "carol", ("gpu",))
    assert may_use({"owner": "bob", "users": ["*"]}, "anyone")
    assert may_use({"owner": None, "users": []}, "anyone")  # a private server's, or started with its engine
    engines = uploads.mark_usable([{"name": "e", "adapters": [mine, {"owner": "alice", "users": ["bob"]}]}], "bob")
    assert [a["usable"] for a in engines[0]["adapters"]] == [True, True]
    assert [a["usable"] for a in uploads.mark_usable(engines, "carol")[0]["adapters"]] == [False, False]


def test_share_lists_take_users_groups_and_everyone_and_refuse_the_rest():
    assert share_list(None) == [] and share_list("bob, @team,bob") == ["@team", "bob"]
    assert share_list(["*"]) == ["*"]
    for bad in (["bob smith"], ["@"], [3], "a/b", {"bob": 1}):
        with pytest.raises(BadRequest, match="share"):
            share_list(bad)


def test_the_files_travel_as_base64_and_only_those_vllm_reads(tmp_path):
    folder = fake_adapter(tmp_path / "a")
    (folder / "README.md").write_text("peft writes this too")
    files = pack(str(folder))
    assert sorted(files) == ["adapter_config.json", "adapter_model.safetensors"]
    decoded = unpack(files)
    assert decoded["adapter_config.json"] == (folder / "adapter_config.json").read_bytes()
    with pytest.raises(BadRequest, match="has no adapter_config.json"):
        pack(str(tmp_path))  # checked before anything is sent
    for bad, words in ((None, "must be an object"), ({**files, "x.py": "AA=="}, "unexpected file"),
                       ({"adapter_config.json": files["adapter_config.json"]}, "is missing"),
                       ({**files, "adapter_config.json": "not base64!"}, "not valid base64"),
                       ({**files, "adapter_config.json": 3}, "base64 string")):
        with pytest.raises(BadRequest, match=words):
            unpack(bad)


def test_a_size_limit_on_both_sides(tmp_path, monkeypatch):
    files = pack(str(fake_adapter(tmp_path / "a")))
    monkeypatch.setattr(uploads, "MAX_BYTES", 1000)
    with pytest.raises(BadRequest, match="larger than the box service takes"):
        pack(str(tmp_path / "a"))
    with pytest.raises(BadRequest, match="larger than the box service takes"):
        unpack(files)


def test_the_service_keeps_each_users_adapter_by_contents_and_nothing_of_a_bad_one(tmp_path):
    store = AdapterUploads(tmp_path / "adapters")
    files = unpack(pack(str(fake_adapter(tmp_path / "a"))))
    path = store.save("bob", "mine", files)
    assert path.startswith(str(tmp_path / "adapters" / "bob" / "mine-")) and store.owns(path)
    assert store.save("bob", "mine", files) == path  # the same files: the same adapter
    other = unpack(pack(str(fake_adapter(tmp_path / "b", rank=4))))
    assert store.save("bob", "mine", other) != path  # new files under the name: another adapter
    bad = {**files, "adapter_config.json": json.dumps({"peft_type": "LORA", "use_dora": True}).encode()}
    with pytest.raises(BadRequest, match="DoRA"):
        store.save("alice", "dora", bad)
    assert list((tmp_path / "adapters" / "alice").iterdir()) == []  # nothing kept
    with pytest.raises(BadRequest, match="adapter name"):
        store.save("bob", "../x", files)
    with pytest.raises(BadRequest, match="user"):
        store.save("../bob", "x", files)
    with pytest.raises(NotFound):
        store.remove(str(tmp_path / "a"))  # never a folder outside the uploads
    assert (tmp_path / "a").is_dir()
    assert store.prune({path}) == [store.save("bob", "mine", other)]  # no engine names it any more
    store.remove(path)
    assert not (tmp_path / "adapters" / "bob" / path.rsplit("/", 1)[1]).exists()
    assert base64.b64decode(pack(str(tmp_path / "a"))["adapter_config.json"])  # the user's own files untouched
