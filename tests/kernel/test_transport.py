"""The client's transports: the same methods on each, chosen once when the client is built, so a
new transport needs no change to any method of the client."""

import inspect

from sage_nb.kernel.client import Client
from sage_nb.kernel.transport import EmbeddedTransport, RestTransport, Transport


def public(cls) -> dict[str, inspect.Signature]:
    return {name: inspect.signature(fn) for name, fn in vars(cls).items()
            if callable(fn) and not name.startswith("_")}


def test_transports_have_the_protocols_methods():
    wanted = public(Transport)
    assert {"engines", "start", "stop", "settings", "endpoint"} <= set(wanted)
    for cls in (RestTransport, EmbeddedTransport):
        assert {n: str(s) for n, s in public(cls).items() if n in wanted} == {n: str(s) for n, s in wanted.items()}


class OneEngineTransport:
    """A third transport, as a cluster would add: nothing of the client changes."""

    mode, server, control_plane, why_embedded = "cluster", None, None, ""
    engine_model = {"id": "e1", "name": "chat", "model": "/m", "served_model_name": "chat", "kind": "llm",
                    "state": "ready", "health_failures": 0, "port": 9, "base_url": "http://10.0.0.9:9/v1"}

    def backends(self):
        return {"llm_backends": [self.engine_model], "embedding_backends": []}

    def endpoint(self, backend):
        return backend["base_url"], "key-of-" + backend["id"]

    def http_client(self, backend):
        return None  # the OpenAI client's own

    def engine(self, id_or_name):
        return self.engine_model


def test_a_new_transport_needs_no_change_to_the_client():
    client = Client(transport=OneEngineTransport())
    oa = client.llm()
    assert client.mode == "cluster" and oa.model == "chat" and str(oa.base_url) == "http://10.0.0.9:9/v1/"
    assert oa.api_key == "key-of-e1" and client.wait_ready("chat")["state"] == "ready"
