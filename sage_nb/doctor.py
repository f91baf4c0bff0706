"""``python -m sage_nb.doctor --gpu [--json] [--launch]``: what an admin of a GPU box runs first.

``--gpu`` reports, read-only: NVML and the driver's versions; every GPU and MIG device with NVML's total,
used and free memory, next to ``torch.cuda.mem_get_info`` where torch with CUDA is installed for the engine's
Python; the devices this server may use (its ``CUDA_VISIBLE_DEVICES`` and the ``gpus`` setting, from
``c.SageNBApp`` in the Jupyter server's config files and ``SAGE_NB_*``); every process on each device, attributed
as ``%llm gpus`` attributes it; which vLLM the engine's Python runs and whether its sleep mode can work.
``--launch`` then starts stand-in CUDA engines through the real launch path (see ``docs/gpu-check.md``).

Exit status: 0 all good (a machine without an NVIDIA GPU too: engines run on the CPU), 1 a problem found
(a WARN or FAIL line, a failed launch step), 2 bad usage.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sqlite3
import sys
import tempfile
from pathlib import Path

from sage_nb.controlplane import ControlPlane, ControlPlaneError, Settings
from sage_nb.controlplane.doctor import launch, render, report

CONFIG_NAME = "jupyter_server_config"


def jupyter_settings() -> tuple[dict, list[str]]:
    """``c.SageNBApp.*`` control-plane settings from the Jupyter server's config files (``.py``, ``.json``
    and ``.d/*.json`` in Jupyter's config path, lowest priority first), and the files that set any."""
    try:
        from jupyter_core.paths import jupyter_config_dir, jupyter_config_path
        from traitlets.config import Config
        from traitlets.config.loader import ConfigFileNotFound, JSONFileConfigLoader, PyFileConfigLoader
    except ImportError:
        return {}, []
    paths = jupyter_config_path()
    if jupyter_config_dir() not in paths:
        paths.insert(0, jupyter_config_dir())
    names = {f.name for f in dataclasses.fields(Settings)}
    merged, files = Config(), []
    for path in reversed(paths):
        candidates = [(JSONFileConfigLoader, p.name, str(p.parent))
                      for p in sorted(Path(path, f"{CONFIG_NAME}.d").glob("*.json"))]
        candidates += [(JSONFileConfigLoader, f"{CONFIG_NAME}.json", path),
                       (PyFileConfigLoader, f"{CONFIG_NAME}.py", path)]
        for loader, name, where in candidates:
            try:
                config = loader(name, path=where).load_config()
            except ConfigFileNotFound:
                continue
            except Exception as e:  # a broken config file: the server would not start either
                raise ControlPlaneError(f"cannot read {Path(where, name)}: {e}") from None
            if set(config.get("SageNBApp", {})) & names:
                files.append(str(Path(where, name)))
            merged.merge(config)
    return {k: v for k, v in merged.get("SageNBApp", {}).items() if k in names and v is not None}, files


def settings_for_doctor(use_config: bool = True) -> tuple[Settings, list[str]]:
    """The settings a Jupyter server started here would run with (this machine only: no Ray cluster)."""
    values, files = jupyter_settings() if use_config else ({}, [])
    values["ray_address"] = None
    return Settings(**values), files


def control_plane(settings: Settings) -> tuple[ControlPlane, Path | None]:
    """A control plane over the user's registry, to attribute the GPUs' processes to engines; a throwaway
    one (and its folder, to remove) when the user has none yet: the doctor creates nothing of the user's."""
    if settings.db_path.exists():
        return ControlPlane(settings, monitor=False), None
    scratch = Path(tempfile.mkdtemp(prefix="sage_nb-doctor-"))
    return ControlPlane(dataclasses.replace(settings, state_dir=scratch), monitor=False), scratch


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sage_nb.doctor", description=__doc__.split("\n\n")[0],
                                epilog="Exit status: 0 all good (no GPU too), 1 a problem found, 2 bad usage. "
                                       "Details: docs/gpu-check.md.")
    p.add_argument("--gpu", action="store_true", help="check the GPUs, driver, torch and vLLM (read-only)")
    p.add_argument("--json", action="store_true", help="print the report's JSON model instead of tables")
    p.add_argument("--launch", action="store_true", help="also start stand-in CUDA engines through the real launch "
                   "path and check NVML sees their memory come and go (takes GPU memory for some seconds)")
    p.add_argument("--mib", type=int, default=1024, help="GPU memory of each stand-in engine (default 1024)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds the engine's Python may take to answer "
                   "the probe (default 60)")
    p.add_argument("--no-jupyter-config", action="store_true", help="ignore c.SageNBApp in the Jupyter server's "
                   "config files (SAGE_NB_* and the defaults only)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if not args.gpu:
        p.print_usage(sys.stderr)
        print(f"{p.prog}: error: say what to check: --gpu", file=sys.stderr)
        return 2
    if args.mib < 64 or args.timeout <= 0:
        print(f"{p.prog}: error: --mib must be at least 64 and --timeout positive", file=sys.stderr)
        return 2
    try:
        settings, files = settings_for_doctor(not args.no_jupyter_config)
        plane, scratch = control_plane(settings)
    except ControlPlaneError as e:
        print(f"sage_nb doctor: bad configuration: {e.message}", file=sys.stderr)
        return 1
    except (OSError, sqlite3.Error) as e:  # the registry or the shared ledger cannot be opened
        print(f"sage_nb doctor: cannot open the registry: {e}", file=sys.stderr)
        return 1
    try:
        model = report.collect(plane, probe_timeout=args.timeout)
    finally:
        plane.close()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    model["config_files"] = files
    if not args.json:
        print(render.text(model) + "\n", flush=True)
    code = model["exit_code"]
    if args.launch:
        def say(step: dict) -> None:
            if not args.json:
                print(f"{step['status']:<5} {step['step']:<13} {step['detail']}", flush=True)

        if not args.json:
            print(render.launch_section([])[0], flush=True)
        model["launch"] = launch.run(settings, ControlPlane, say, mib=args.mib)
        failed = sum(s["status"] == "FAIL" for s in model["launch"])
        if not args.json:
            print(render.launch_section(model["launch"])[3])
        code = max(code, 1 if failed else 0)
    if args.json:
        print(json.dumps({**model, "exit_code": code}, indent=2, default=str))
    return code


if __name__ == "__main__":
    sys.exit(main())
