"""Run sage_nb's benchmarks and write ``benchmarks/results/latest.{md,json}``.

    .venv/bin/python -m benchmarks.run            # everything (about 11 minutes on 2 cores)
    .venv/bin/python -m benchmarks.run --quick    # a short version of everything
    .venv/bin/python -m benchmarks.run --only gateway --only scale

See benchmarks/README.md for what each figure means and the goals.
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import Settings  # noqa: E402
from .report import write  # noqa: E402

LIMIT_S = 900  # per benchmark: a hang becomes an error in the report, and its processes are cleaned up
# name -> module; the order they run in (launch before refusal, which cites its launch time)
BENCHMARKS = {"scale": "bench_scale", "rag": "bench_rag", "gateway": "bench_gateway",
              "dashboard": "bench_dashboard", "rediscovery": "bench_rediscovery",
              "launch": "bench_engines", "engines": "bench_engines", "refusal": "bench_refusal",
              "serve": "bench_serve", "placement": "bench_placement"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and cycles (a smoke run)")
    ap.add_argument("--only", action="append", choices=list(BENCHMARKS), metavar="NAME",
                    help=f"run only these (repeatable): {', '.join(BENCHMARKS)}")
    ap.add_argument("--cycles", type=int, help="interleaved cycles (default 3; quick: 1)")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    ap.add_argument("--keep", action="store_true", help="keep the work dir (logs, registries)")
    args = ap.parse_args(argv)
    selected = [n for n in BENCHMARKS if not args.only or n in args.only]
    work = Path(tempfile.mkdtemp(prefix="sage-bench-"))
    s = Settings(quick=args.quick, cycles=args.cycles or (1 if args.quick else 3), workdir=work)
    s.shared["selected"] = selected
    t0 = time.time()
    meta = {"command": ("python -m benchmarks.run " + shlex.join(sys.argv[1:] if argv is None else argv)).strip(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "mode": "quick" if args.quick else "full",
            "cycles": s.cycles, "load_before": _load(), "python": sys.version.split()[0],
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, "
                       f"{_mem_gib()} GiB RAM, {platform.system()} {platform.release()}"}
    results: dict = {}
    done_modules: dict[str, dict] = {}
    signal.signal(signal.SIGTERM, _raise(SystemExit, "terminated"))  # so every finally: cleans up
    signal.signal(signal.SIGALRM, _raise(TimeoutError, "the benchmark ran past its time limit"))
    try:
        for name in selected:
            print(f"== {name}", flush=True)
            started = time.time()
            signal.alarm(LIMIT_S)
            try:
                module = importlib.import_module(f".{BENCHMARKS[name]}", __package__)
                if BENCHMARKS[name] in done_modules:  # one module measured both (engines + launch)
                    res = done_modules[BENCHMARKS[name]].get(name, {"figures": []})
                else:
                    res = module.run(s)
                    if "parts" in res:
                        done_modules[BENCHMARKS[name]] = res["parts"]
                        res = res["parts"].get(name, {"figures": []})
            except Exception as e:
                traceback.print_exc()
                res = {"figures": [], "error": f"{type(e).__name__}: {e}"}
            finally:
                signal.alarm(0)
            res["seconds"] = round(time.time() - started, 1)
            results[name] = res
            for f in res.get("figures", []):
                print(f"   {f.name}: {f.value:.4g} vs {f.baseline if f.baseline is None else round(f.baseline, 4)} "
                      f"{f.unit} -> {f.compared if f.compared is None else round(f.compared, 4)} "
                      f"{'' if f.met is None else ('met' if f.met else 'MISSED')}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work dir kept: {work}")
    meta.update(total_s=time.time() - t0, load_after=_load())
    md, js = write(args.out, meta, results)
    print(f"wrote {md} and {js}")
    return 1 if any(r.get("error") for r in results.values()) else 0


def _raise(exc: type[BaseException], message: str):
    def handler(signum, frame):
        raise exc(message)
    return handler


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _mem_gib() -> int:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30)
    except (ValueError, OSError):
        return 0


if __name__ == "__main__":
    sys.exit(main())
