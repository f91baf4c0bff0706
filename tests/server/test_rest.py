"""Every REST route through a real jupyter_server (pytest-jupyter), engines are the lightweight stub."""

import asyncio
import json

import pytest
from tornado.httpclient import HTTPClientError

from ..conftest import BUSY_BOX

pytestmark = pytest.mark.usefixtures("cleanup_engines")


async def call(jp_fetch, *path, method="GET", body=None, **kw):
    kwargs = {"method": method, **kw}
    if body is not None:
        kwargs["body"] = body if isinstance(body, str) else json.dumps(body)
    elif method == "POST":
        kwargs["body"] = b""
        kwargs["allow_nonstandard_methods"] = True
    resp = await jp_fetch("sage_nb", *path, **kwargs)
    return resp.code, json.loads(resp.body) if resp.body else None


async def error(jp_fetch, *path, **kw):
    with pytest.raises(HTTPClientError) as exc:
        await call(jp_fetch, *path, **kw)
    body = json.loads(exc.value.response.body)
    assert isinstance(body.get("message"), str) and body["message"]
    return exc.value.code, body["message"]


async def wait_state(jp_fetch, engine_id, state="ready", timeout=20):
    for _ in range(int(timeout / 0.1)):
        _, e = await call(jp_fetch, "api", "engines", engine_id)
        if e["state"] == state:
            return e
        await asyncio.sleep(0.1)
    raise AssertionError(f"engine {engine_id} not {state}: {e}")


async def test_engine_lifecycle_over_rest(jp_fetch, model_dir):
    code, e = await call(jp_fetch, "api", "engines", method="POST",
                         body={"model": str(model_dir(1)), "name": "chat"})
    assert code == 202 and e["state"] == "starting" and "api_key" not in e
    e = await wait_state(jp_fetch, e["id"])
    code, listed = await call(jp_fetch, "api", "engines")
    assert code == 200 and [x["id"] for x in listed] == [e["id"]]
    _, by_name = await call(jp_fetch, "api", "engines", "chat")
    assert by_name["id"] == e["id"]
    code, backends = await call(jp_fetch, "api", "backends")
    assert [b["id"] for b in backends["llm_backends"]] == [e["id"]] and backends["embedding_backends"] == []
    code, logs = await call(jp_fetch, "api", "engines", e["id"], "logs", params={"lines": "5"})
    assert code == 200 and "stub engine chat" in logs["log"]
    code, stopped = await call(jp_fetch, "api", "engines", e["id"], method="DELETE")
    assert code == 200 and stopped["state"] == "stopped"
    code, pruned = await call(jp_fetch, "api", "engines", "prune", method="POST")
    assert code == 200 and pruned == {"removed": [e["id"]]}
    assert (await call(jp_fetch, "api", "engines"))[1] == []


@pytest.mark.parametrize("body,msg", [
    ("{not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ({}, "'model' is required"),
    ({"model": "m", "color": "red"}, "unknown field"),
    ({"model": "/no/such/dir"}, "does not exist"),
    ({"model": "x; rm -rf /"}, "neither"),
    ({"model": "gpt2", "kind": "vision"}, "unknown kind"),
    ({"model": "gpt2", "tensor_parallel_size": 0}, "at least 1"),
    ({"model": "gpt2", "port": 99999}, "out of range"),
    ({"model": "gpt2", "port": "80"}, "integer"),
    ({"model": "gpt2", "extra_args": "--x"}, "list of strings"),
    ({"model": 42}, "model"),
])
async def test_bad_start_bodies_are_400(jp_fetch, body, msg):
    code, message = await error(jp_fetch, "api", "engines", method="POST", body=body)
    assert code == 400 and msg in message
    assert (await call(jp_fetch, "api", "engines"))[1] == []


async def test_unknown_engine_is_404(jp_fetch):
    for method, path in (("GET", ()), ("DELETE", ()), ("GET", ("logs",))):
        code, message = await error(jp_fetch, "api", "engines", "nope", *path, method=method)
        assert code == 404 and "nope" in message


async def test_bad_logs_query_is_400(jp_fetch, model_dir):
    _, e = await call(jp_fetch, "api", "engines", method="POST", body={"model": str(model_dir(1))})
    code, message = await error(jp_fetch, "api", "engines", e["id"], "logs", params={"lines": "x"})
    assert code == 400 and "lines" in message


async def test_port_taken_is_409_naming_holder(jp_fetch, model_dir):
    _, first = await call(jp_fetch, "api", "engines", method="POST",
                          body={"model": str(model_dir(1)), "name": "holder"})
    code, message = await error(jp_fetch, "api", "engines", method="POST",
                                body={"model": str(model_dir(1)), "port": first["port"]})
    assert code == 409 and "holder" in message


@pytest.mark.parametrize("fake_gpus", [json.dumps(BUSY_BOX)])
async def test_gpus_and_nothing_fits_is_409_with_numbers(jp_fetch, model_dir, fake_gpus):
    code, gpus = await call(jp_fetch, "api", "gpus")
    assert code == 200 and gpus["source"] == "fake"
    assert [(g["index"], g["free_mib"], g["booked_mib"]) for g in gpus["devices"]] == [(0, 22528, 0), (1, 81920, 0)]
    code, message = await error(jp_fetch, "api", "engines", method="POST", body={"model": str(model_dir(140))})
    assert code == 409 and "needs" in message and "GPU0 22528 MiB, GPU1 81920 MiB" in message
    _, e = await call(jp_fetch, "api", "engines", method="POST", body={"model": str(model_dir(30))})
    _, gpus = await call(jp_fetch, "api", "gpus")
    assert gpus["devices"][1]["booked_mib"] == e["booked_mib"] > 30 * 1024


async def test_gpus_without_gpu(jp_fetch):
    code, gpus = await call(jp_fetch, "api", "gpus")
    assert code == 200 and gpus["devices"] == [] and gpus["source"] in ("none", "nvml")


@pytest.mark.parametrize("path,method", [
    (("api", "engines"), "GET"), (("api", "engines"), "POST"), (("api", "engines", "x"), "GET"),
    (("api", "engines", "x"), "DELETE"), (("api", "engines", "x", "logs"), "GET"),
    (("api", "engines", "prune"), "POST"), (("api", "backends"), "GET"), (("api", "gpus"), "GET"),
    (("v1", "models"), "GET"), (("v1", "chat", "completions"), "POST"), (("v1", "completions"), "POST"),
    (("v1", "embeddings"), "POST"),
])
async def test_every_route_needs_jupyter_auth(jp_fetch, path, method):
    for headers in ({"Authorization": "token wrong"}, {"Authorization": ""}):
        with pytest.raises(HTTPClientError) as exc:
            await call(jp_fetch, *path, method=method, headers=headers,
                       body={"model": "m"} if method == "POST" else None)
        assert exc.value.code == 403


def test_extension_is_found_and_enabled(jp_serverapp):
    assert "sage_nb" in jp_serverapp.extension_manager.extensions
    assert jp_serverapp.extension_manager.extensions["sage_nb"].enabled


async def test_unknown_sage_nb_paths_are_json_404(jp_fetch):
    for path in (("api", "nothing"), ("api", "engines", "a", "b", "c"), ("v2", "chat")):
        code, message = await error(jp_fetch, *path)
        assert code == 404 and "no sage_nb route" in message
    with pytest.raises(HTTPClientError) as exc:
        await call(jp_fetch, "api", "nothing", headers={"Authorization": "token wrong"})
    assert exc.value.code == 403
