"""Argument parsing of ``%llm`` and ``%%llm``, apart from their execution.

Bad arguments raise IPython's ``UsageError``; ``--help`` prints the help and returns ``None``.
"""

from __future__ import annotations

import argparse
import shlex
from dataclasses import dataclass

from IPython.core.error import UsageError

from sage_nb.controlplane import validation
from sage_nb.controlplane.errors import BadRequest
from sage_nb.controlplane.requests import LORA_RANKS, SCOPES


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}\n{self.format_usage().strip()}")

    def exit(self, status: int = 0, message: str | None = None):
        raise _HelpShown()


class _HelpShown(Exception):
    pass


def _checked(check, text: str):
    """An argparse type from one of the control plane's own checks (the same rule everywhere)."""
    try:
        return check(int(text))
    except ValueError as e:  # BadRequest is a ValueError
        message = e.message if isinstance(e, BadRequest) else f"expected an integer, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _positive(text: str) -> int:
    return _checked(lambda v: validation.integer("the value", v), text)


def _port(text: str) -> int:
    return _checked(validation.port, text)


def _gpu_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected GPU indices like 0,1 — got {text!r}") from None


def _keep_alive(text: str) -> str:
    """A keep-alive duration, checked by the control plane's rule and passed on as typed."""
    try:
        validation.duration("keep-alive", text)
    except BadRequest as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return text


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value <= 2:
        raise argparse.ArgumentTypeError("must be between 0 and 2")
    return value


def _lora_rank(text: str) -> int:
    rank = _positive(text)
    if rank not in LORA_RANKS:
        raise argparse.ArgumentTypeError(f"one of {', '.join(map(str, LORA_RANKS))} (vLLM's choices)")
    return rank


def _adapter(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH, got {text!r}")
    try:
        validation.adapter_name(name)
    except BadRequest as e:
        raise argparse.ArgumentTypeError(e.message) from None
    return name, path


DURATIONS = "seconds or 30s, 10m, 1h30m, 2d; forever or -1 for never"


def line_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%llm", description="Manage vLLM engines from a notebook.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    start = sub.add_parser("start", help="start an engine", description="Start a vLLM engine. Arguments after "
                           "'--' go to vLLM unchanged.")
    start.add_argument("model", help="Hugging Face model id or local model directory")
    start.add_argument("--embedding", action="store_true", help="an embedding engine (default: an LLM)")
    start.add_argument("--name", help="engine name (also its served model name)")
    start.add_argument("--tp", type=_positive, default=1, dest="tensor_parallel_size", help="tensor parallel GPUs")
    start.add_argument("--gpus", type=_gpu_list, dest="gpu_ids", help="GPU indices to use, e.g. 0,1")
    start.add_argument("--node", help="the cluster node to run on, as %%llm gpus lists it (default: best fit)")
    start.add_argument("--port", type=_port, help="port to serve on (default: a free leased one)")
    start.add_argument("--max-model-len", type=_positive, help="context length (default: the model's, "
                       "shrunk to fit free GPU memory)")
    start.add_argument("--dtype", help="auto, float16, bfloat16, float32")
    start.add_argument("--keep-alive", type=_keep_alive, help=f"idle time before the engine gives its GPU "
                       f"memory back: {DURATIONS} (default: the server's)")
    start.add_argument("--scope", choices=SCOPES, help="kernel: stop the engine when this kernel shuts down "
                       "(or restarts); server (default): it outlives the kernel")
    start.add_argument("--shared", action="store_true", help="publish it through the box service to every user "
                       "of the box (admins and the publishers' group)")
    start.add_argument("--lora", action="store_true", help="take LoRA adapters while it runs (%%llm adapter load)")
    start.add_argument("--max-loras", type=_positive, help="adapters in one batch (default 4; implies --lora)")
    start.add_argument("--max-lora-rank", type=_lora_rank, help="the largest adapter rank it takes (default 16; "
                       f"one of {', '.join(map(str, LORA_RANKS))}; implies --lora)")
    start.add_argument("--adapter", action="append", type=_adapter, dest="adapters", metavar="NAME=PATH",
                       help="an adapter to load once it is ready (repeatable; implies --lora)")
    start.add_argument("--no-wait", action="store_true", help="return at once while vLLM loads")
    commands = {"stop": "stop an engine (frees its port and GPU memory)", "logs": "show the tail of an engine's log",
                "sleep": "give an engine's GPU memory back now (it wakes on the next request)",
                "wake": "load a sleeping or unloaded engine again",
                "keep-alive": "set how long an engine stays loaded once idle"}
    for name, text in commands.items():
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("engine", help="engine id or name")
        if name == "logs":
            p.add_argument("-n", "--lines", type=_positive, default=40, help="how many lines")
        elif name == "sleep":
            p.add_argument("--unload", action="store_true", help="stop the process (default: vLLM sleep mode "
                           "where the engine supports it, else unload)")
        elif name == "wake":
            p.add_argument("--no-wait", action="store_true", help="return at once while it loads")
        elif name == "keep-alive":
            p.add_argument("value", type=_keep_alive, help=DURATIONS)
    for name, text in (("engines", "list engines"), ("backends", "ready backends by kind"),
                       ("gpus", "GPU memory: used, booked, free"), ("dashboard", "live dashboard widget")):
        sub.add_parser(name, help=text, description=text)
    doctor = sub.add_parser("doctor", help="check the setup and say what to fix", description="Check the setup "
                            "and say what to fix; --gpu: the server's GPUs, driver, torch and vLLM (docs/gpu-check.md)")
    doctor.add_argument("--gpu", action="store_true", help="the GPU report of python -m sage_nb.doctor --gpu, as "
                        "the server sees its GPUs (its CUDA_VISIBLE_DEVICES and gpus setting)")
    adapter = sub.add_parser("adapter", help="load or unload a LoRA adapter on a running engine",
                             description="Load a LoRA adapter (a directory peft's save_pretrained wrote) into an "
                             "engine started with --lora, or unload it. Requests then use it by its name as the "
                             "model.")
    verbs = adapter.add_subparsers(dest="verb", metavar="load|unload", required=True, parser_class=_Parser)
    load = verbs.add_parser("load", help="load an adapter", description="Load an adapter; it is loaded again "
                            "wherever the engine comes back (wake, relaunch, server restart).")
    load.add_argument("name", help="the adapter's name: what requests put in 'model'")
    load.add_argument("path", help="the adapter's directory (adapter_config.json, adapter_model.safetensors)")
    load.add_argument("--engine", help="the engine (default: the one engine started with --lora)")
    load.add_argument("--share", metavar="WHO", help="on a shared engine of the box service: who else may use it "
                      "(user names, @group, or '*' for everyone; comma separated; default: only you)")
    unload = verbs.add_parser("unload", help="unload an adapter", description="Unload an adapter and forget it.")
    unload.add_argument("name", help="the adapter's name")
    unload.add_argument("--engine", help="only from this engine (default: from every engine holding it)")
    sub.add_parser("adapters", help="LoRA adapters on the engines", description="Every adapter, its engine, "
                   "rank, state and path.")
    usage = sub.add_parser("usage", help="use of the box's shared engines: yours (an admin: everyone's), and each "
                           "engine's share by user", description="Requests, tokens and time queued on the box "
                           "service's shared engines by user, engine and day (UTC), each engine's share of work by "
                           "user, and your limits.")
    usage.add_argument("--days", type=_positive, default=1, help="how many days back, today included (default 1)")
    usage.add_argument("--user", help="one user's rows (admins only)")
    top = sub.add_parser("top", help="what each engine is doing: requests, KV cache, tokens/s, latency",
                         description="Each engine's running and waiting requests, KV cache in use, prompt and "
                         "generated tokens per second and TTFT / inter-token latency (p50/p95) over the last "
                         "minute, from its own /metrics.")
    top.add_argument("--window", type=_positive, default=60, help="seconds the rates and latencies cover (default 60)")
    top.add_argument("--watch", type=_positive, nargs="?", const=2, metavar="SECONDS",
                     help="refresh every SECONDS (default 2) until interrupted")
    metrics = sub.add_parser("metrics", help="live plots of one engine: tokens/s, KV cache, queue, latency",
                             description="One engine's prompt and generated tokens/s, KV cache in use and waiting "
                             "requests over time, and its latencies over the window, refreshed live.")
    metrics.add_argument("engine", help="engine id or name")
    metrics.add_argument("--window", type=_positive, default=600, help="seconds shown (default 600)")
    prune = sub.add_parser("prune", help="remove this notebook's stopped/failed engines (--all: everyone's)",
                           description="Remove the stopped and failed engine records this notebook started (from "
                           "this kernel or an earlier kernel of it), freeing what they still hold; the records of "
                           "other notebooks are kept (their users may need the error) and listed.")
    prune.add_argument("--all", action="store_true", help="remove every stopped and failed engine, whoever "
                       "started it")
    return parser


def cell_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="%%llm", description="Send the cell as a chat message to an LLM backend; "
                     "{name} is filled from the notebook's variables.")
    parser.add_argument("--model", help="served name, model or engine name (default: any LLM)")
    parser.add_argument("--system", help="system prompt")
    parser.add_argument("--max-tokens", type=_positive, default=256)
    parser.add_argument("--temperature", type=_temperature, default=0.7)
    return parser


@dataclass
class Parsed:
    args: argparse.Namespace
    vllm_args: list[str]


def _split(line: str) -> list[str]:
    try:
        return shlex.split(line, comments=True)  # "%llm start m  # a note" as in Python
    except ValueError as e:
        raise UsageError(f"%llm: cannot parse arguments: {e}") from None


def parse_line(line: str) -> Parsed | None:
    """Parse ``%llm`` arguments; ``None`` when only help was asked for."""
    words = _split(line)
    vllm_args: list[str] = []
    if "--" in words:
        cut = words.index("--")
        words, vllm_args = words[:cut], words[cut + 1:]
    if not words:
        words = ["--help"]
    try:
        args = line_parser().parse_args(words)
    except _HelpShown:
        return None
    if vllm_args and args.command != "start":
        raise UsageError("%llm: arguments after '--' are only for 'start'")
    return Parsed(args, vllm_args)


def parse_cell(line: str) -> argparse.Namespace | None:
    try:
        return cell_parser().parse_args(_split(line))
    except _HelpShown:
        return None
