"""Checks of caller input shared by every entry point (REST, magics, Python): integers, ports,
engine names and durations. Each rule is written here once."""

from __future__ import annotations

import math
import re

from .errors import BadRequest

ENGINE_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}"  # also the REST path part of an engine id or name
_NAME = re.compile(ENGINE_NAME)
_KERNEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")  # Jupyter's are uuids
_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_PATH = 4096
# a duration as Ollama's keep_alive takes it: "90", "45s", "10m", "1h30m", "2d"
_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)([smhd]))+|\d+(?:\.\d+)?")
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_DURATION_S = 366 * 86400


def integer(name: str, value, minimum: int = 1, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) within ``minimum..maximum``, else :class:`BadRequest`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise BadRequest(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise BadRequest(f"{name} must be at most {maximum}, got {value}")
    return value


def seconds(name: str, value) -> float:
    """``value`` if it is a positive, finite number of seconds, else :class:`BadRequest`."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < float("inf"):
        raise BadRequest(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def optional_integer(name: str, value, minimum: int = 1) -> int | None:
    return None if value is None else integer(name, value, minimum)


def port(value) -> int | None:
    """A TCP port or ``None``."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"port must be an integer, got {value!r}")
    if not 1 <= value <= 65535:
        raise BadRequest(f"port {value} is out of range (1-65535)")
    return value


def is_engine_name(value) -> bool:
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def engine_name(value) -> str:
    """A name the caller chose for an engine (it must be usable as a REST path part)."""
    if not is_engine_name(value):
        raise BadRequest(f"invalid engine name {value!r}: letters, digits, '.', '_', '-' "
                         "(at most 64, starting with a letter or digit)")
    return value


def adapter_name(value) -> str:
    """A name for a LoRA adapter: what a request puts in ``model`` (a REST path part too)."""
    if not is_engine_name(value):
        raise BadRequest(f"invalid adapter name {value!r}: letters, digits, '.', '_', '-' "
                         "(at most 64, starting with a letter or digit)")
    return value


def kernel_id(value) -> str | None:
    """A Jupyter kernel id (``None``: no kernel)."""
    if value is not None and not (isinstance(value, str) and _KERNEL_ID.fullmatch(value)):
        raise BadRequest(f"invalid kernel_id {value!r}: a Jupyter kernel id such as "
                         "'5f0c7e0e-3a5d-4a31-9b8e-0e4c2f1d9a77'")
    return value


def node(value) -> str | None:
    """A node id as the GPU inventory names nodes (``None``: any node)."""
    if value is not None and not (isinstance(value, str) and _NODE.fullmatch(value)):
        raise BadRequest(f"invalid node {value!r:.80}: a node id as %llm gpus lists them (letters, digits, "
                         "'.', '_', ':', '-')")
    return value


def notebook_path(value) -> str | None:
    """The path of a notebook as Jupyter knows it (``None``: none)."""
    if value is not None and (not isinstance(value, str) or "\x00" in value or len(value) > MAX_PATH):
        raise BadRequest(f"notebook must be a path (a string of at most {MAX_PATH} characters), got {value!r:.80}")
    return value


def clean_name(text: str) -> str:
    """An engine name made from a model path or served name: its last path part, with every
    character a name may not hold replaced by ``-`` (``org/model:latest`` → ``model-latest``)."""
    base = text.rstrip("/").split("/")[-1]
    base = "".join(c if (c.isascii() and c.isalnum()) or c in "._-" else "-" for c in base)[:48].lstrip("._-")
    return base or "engine"


def duration(name: str, value) -> float | None:
    """Seconds from a number or a string such as ``"90"``, ``"45s"``, ``"10m"`` or ``"1h30m"``;
    ``None`` for forever (``None``, ``-1``, ``"-1"``, ``"forever"``). Anything else — other
    negatives, ``"abc"``, booleans, NaN, more than a year — is a :class:`BadRequest` naming it."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("-1", "forever")):
        return None
    if isinstance(value, bool):
        raise BadRequest(f"{name} must be seconds or a duration such as '10m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
        if seconds == -1:
            return None
    elif isinstance(value, str):
        text = value.strip().lower()
        if not _DURATION.fullmatch(text):
            raise BadRequest(f"{name} must be seconds or a duration such as '30s', '10m', '1h30m' "
                             f"(-1 for forever), got {value!r}")
        parts = _PART.findall(text)
        seconds = sum(float(n) * _UNIT_S[u] for n, u in parts) if parts else float(text)
    else:
        raise BadRequest(f"{name} must be seconds or a duration such as '10m', got {value!r}")
    if math.isnan(seconds) or seconds < 0:
        raise BadRequest(f"{name} must be at least 0 seconds (or -1 for forever), got {value!r}")
    if seconds > MAX_DURATION_S:
        raise BadRequest(f"{name} must be at most {MAX_DURATION_S // 86400} days (or -1 for forever), "
                         f"got {value!r}")
    return seconds


def service_url(value) -> str:
    """The box service's URL: ``http(s)://host:port/prefix/``, ending with a slash."""
    from urllib.parse import urlsplit

    text = str(value).strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(f"box_service must be an http(s) URL such as http://127.0.0.1:8765/services/llm/, "
                         f"got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a malformed port
    except ValueError:
        raise BadRequest(f"box_service has a bad port: {value!r}") from None
    return text.rstrip("/") + "/"


USER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@+-]{0,63}")


def user_name(value) -> str:
    """A user's name as the box service knows it (a Unix or JupyterHub user name)."""
    if not isinstance(value, str) or not USER_NAME.fullmatch(value):
        raise BadRequest(f"not a user name: {value!r}")
    return value
