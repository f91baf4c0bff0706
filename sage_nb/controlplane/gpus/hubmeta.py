"""A model's metadata from the Hugging Face hub, for sizing a model that is not on this machine.

Asks the hub the engine would download from: ``HF_ENDPOINT`` and ``HF_TOKEN`` of the engine's
environment (the server's, with ``engine_env`` over it), else huggingface_hub's own defaults
(its token file, huggingface.co). Two requests, nothing written to the cache: the model's
info with file sizes (``model_info(files_metadata=True)``) and its ``config.json`` at that commit.

Each way this can fail has its own message (:class:`BadRequest`): offline mode, hub unreachable,
gated or private model, no such model, no ``config.json``, any other answer of the hub.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ..errors import BadRequest

TRUE = {"1", "ON", "YES", "TRUE"}


def offline(env: Mapping[str, str]) -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as huggingface_hub reads it."""
    value = env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or ""
    return value.upper() in TRUE


def endpoint_of(env: Mapping[str, str]) -> str:
    from huggingface_hub import constants

    return (env.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def fetch(model: str, env: Mapping[str, str], cache: str, timeout: float = 20.0) -> tuple[dict, dict[str, int]]:
    """``(config, {file name: size})`` of a hub model; :class:`BadRequest` saying why not.
    ``cache`` is where the model was looked for on this machine (for the messages)."""
    from huggingface_hub import HfApi, constants, hf_hub_url
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

    endpoint = endpoint_of(env)
    not_here = f"model {model!r} is not on this machine (not a directory, not in the Hugging Face cache {cache})"
    if offline(env) or constants.is_offline_mode():
        raise BadRequest(f"{not_here}, and HF_HUB_OFFLINE is set, so the hub is not asked for its size: "
                         f"download it first (`hf download {model}` where the hub is reachable), start it "
                         "from a local model directory, or unset HF_HUB_OFFLINE")
    token = env.get("HF_TOKEN") or None  # None: huggingface_hub's own (HF_TOKEN, `hf auth login`)
    try:
        info = HfApi(endpoint=endpoint, token=token).model_info(model, files_metadata=True, timeout=timeout)
        url = hf_hub_url(model, "config.json", revision=info.sha or "main", endpoint=endpoint)
        response = get_session().get(url, headers=build_hf_headers(token=token), timeout=timeout,
                                     follow_redirects=True)
        hf_raise_for_status(response)
        config = json.loads(response.content)
    except OfflineModeIsEnabled:
        raise BadRequest(f"{not_here}, and HF_HUB_OFFLINE is set, so the hub is not asked for its size: "
                         f"download it first (`hf download {model}`), start it from a local model "
                         "directory, or unset HF_HUB_OFFLINE") from None
    except Exception as e:  # noqa: BLE001 — every failure becomes one clear message
        raise BadRequest(_why(model, endpoint, not_here, e)) from None
    if not isinstance(config, dict):
        raise BadRequest(f"the config.json of {model!r} on {endpoint} is not a JSON object; cannot size it")
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return config, sizes


def _why(model: str, endpoint: str, not_here: str, error: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RemoteEntryNotFoundError, RepositoryNotFoundError

    status = getattr(getattr(error, "response", None), "status_code", None)
    login = "log in as the user running Jupyter (`hf auth login`) or set HF_TOKEN"
    if isinstance(error, GatedRepoError) or (isinstance(error, HfHubHTTPError) and status in (401, 403)
                                              and not isinstance(error, RepositoryNotFoundError)):
        return (f"model {model!r} on {endpoint} is gated or private and this server may not download it "
                f"({status}): accept its license on its hub page with your account, then {login} "
                "(for engines only: c.SageNBApp.engine_env)")
    if isinstance(error, RepositoryNotFoundError):
        return (f"no model {model!r} on the hub at {endpoint} ({status}): check the id (org/name, as on its "
                f"hub page); if it is private, {login}")
    if isinstance(error, RemoteEntryNotFoundError):
        return f"model {model!r} on {endpoint} has no config.json: vLLM cannot serve it and sage_nb cannot size it"
    if isinstance(error, HfHubHTTPError):
        first = str(error).strip().split("\n")[0]
        return f"the hub at {endpoint} could not give the metadata of {model!r}: {first}"
    if isinstance(error, ValueError):
        return f"the hub at {endpoint} gave unusable metadata for {model!r}: {error}"
    return (f"{not_here}, and the hub at {endpoint} is unreachable ({type(error).__name__}: "
            f"{error}): start it from a local model directory, download it first where the hub is reachable "
            f"(`hf download {model}`), or set HF_ENDPOINT to a reachable mirror; on a machine without "
            "internet access set HF_HUB_OFFLINE=1")
