"""An engine's public JSON model: what REST, the magics and the dashboard show of a record."""

from __future__ import annotations

from .state import EngineState

# Fields of the engine record that are never shown outside the control plane.
PRIVATE_FIELDS = frozenset({"api_key", "create_time", "launch_env", "request", "kernel_pid", "kernel_started",
                            "kernel_server"})


def public_model(record: dict) -> dict:
    """An engine's public JSON model from its stored fields (changed in place): no secrets, plus
    ``base_url``. The one place the model shown outside the control plane is made."""
    for name in PRIVATE_FIELDS:
        record.pop(name, None)
    record["base_url"] = f"http://{record['host']}:{record['port']}/v1" if record.get("port") else None
    record["idle_at"] = idle_at(record)
    return record


def idle_at(record: dict) -> float | None:
    """When a ready engine with a keep-alive goes idle (epoch seconds), else ``None``."""
    keep = record.get("keep_alive")
    if keep is None or record.get("state") != EngineState.READY:
        return None
    return max(record.get("last_used_at") or 0.0, record.get("ready_at") or 0.0) + keep
