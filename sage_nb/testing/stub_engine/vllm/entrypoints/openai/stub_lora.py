"""LoRA adapters in the stub engine, as vLLM serves them with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: ``POST /v1/load_lora_adapter {lora_name, lora_path}`` (200
with a text body; 400 when the name is loaded already or the path has no ``adapter_config.json``),
``POST /v1/unload_lora_adapter {lora_name}`` (200; 404 for an unknown name), adapters listed in
``/v1/models`` with ``parent`` = the served name, and a request whose ``model`` is neither the served
name nor an adapter a 404 (vLLM's "The model `x` does not exist."). Without those two settings the
routes are 404s. The reply's ``model`` says which adapter answered (the real engine's proof is its output)."""

from __future__ import annotations

import os

from .stub_http import NOT_FOUND, bad_request, error, response

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
LORA_ROUTES = frozenset({LOAD, UNLOAD})


class LoraAdapters:
    """The adapters one stub engine holds (mixed into its state: ``served``, ``created``, ``root``)."""

    def lora_route(self, path: str, req: dict) -> bytes:
        if not self.lora:
            return NOT_FOUND
        name = req.get("lora_name")
        if not isinstance(name, str) or not name:
            return bad_request("lora_name is required")
        if path == UNLOAD:
            if self.adapters.pop(name, None) is None:
                return error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            self.models = None
            return response(200, f"Success: LoRA adapter '{name}' removed successfully.".encode(), b"text/plain")
        where = req.get("lora_path")
        if name in self.adapters:
            return bad_request(f"The lora adapter '{name}' has already been loaded.")
        if not isinstance(where, str) or not os.path.isfile(os.path.join(where, "adapter_config.json")):
            return bad_request(f"No adapter found for {where}")
        self.adapters[name] = where
        self.models = None
        return response(200, f"Success: LoRA adapter '{name}' added successfully.".encode(), b"text/plain")

    def models_reply(self) -> bytes:
        if self.models is None:
            cards = [{"id": self.served, "object": "model", "created": self.created, "owned_by": "vllm",
                      "root": self.root, "parent": None}]
            cards += [{"id": name, "object": "model", "created": self.created, "owned_by": "vllm", "root": where,
                       "parent": self.served} for name, where in self.adapters.items()]
            self.models = response(200, {"object": "list", "data": cards})
        return self.models

    def unknown_model(self, model: str) -> bytes | None:
        """vLLM's 404 for a model it does not serve (checked only with LoRA on: the stub answers any name else)."""
        if self.lora and model != self.served and model not in self.adapters:
            return error(404, "NotFoundError", f"The model `{model}` does not exist.")
        return None
