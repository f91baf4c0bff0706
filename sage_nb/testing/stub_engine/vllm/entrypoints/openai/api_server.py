"""A fast stand-in for vLLM's OpenAI server, for sage_nb's tests, benchmarks and tutorials.

``PYTHONPATH=sage_nb/testing/stub_engine python -m vllm.entrypoints.openai.api_server --model M --port P
[--host H] [--served-model-name S] [--runner pooling] [--enable-sleep-mode]``: it takes vLLM's command line, so sage_nb
launches, discovers and adopts it like a real engine, and it answers at once (raw asyncio protocol,
keep-alive, precomputed replies, no framework, uvloop when importable), so what a benchmark measures
through it is the proxy in front of it. End-to-end tests use the real vLLM.

Routes: ``/health``, ``/openapi.json``, ``GET /v1/models``, ``/tokenize`` and ``/detokenize``, and chat,
completions (streaming too) or, with ``--runner pooling``, embeddings. Like vLLM, ``/v1/*`` needs
``Bearer $VLLM_API_KEY`` when that is set (401), and a bad body is a 400 ``{"error": {"message": ...}}``,
never a dropped connection. Replies and stream chunks carry ``"served_by": <port>``; a chat or completion
reply also echoes the request's ``cache_salt``, when it has one.

Sleep mode, with ``VLLM_SERVER_DEV_MODE=1`` (else these routes are 404s, like vLLM's): ``POST /sleep?level=N``
(0..2, default 1; a 400 without ``--enable-sleep-mode``) answers ``{"status": "sleeping", "level": N}``,
``POST /wake_up`` answers ``{"status": "awake", "tags": null}``, and ``GET /is_sleeping`` answers
``{"is_sleeping": bool, "wakes": <wake_ups served>}``. They need the bearer key when one is set (401), as
sage_nb's ``KeyGuard`` middleware makes vLLM do (``--middleware`` is taken and ignored here). While asleep,
chat, completions and embeddings are 503 ``{"error": {"message": "the engine is sleeping"}}`` (stricter than
vLLM, which holds them until it wakes), and ``/health`` stays 200.

Environment (a flag is on for any non-empty value):

- ``STUB_STARTUP_DELAY``: seconds to wait before binding the port (default 0).
- ``STUB_HANG``: never answer a POST, while ``/health`` keeps answering (a stuck EngineCore).
- ``STUB_BUSY``: never answer a POST either, but ``/metrics`` serves ``vllm:generation_tokens_total``,
  which keeps increasing (busy, not hung). Without it ``/metrics`` is a 404.
- ``STUB_STREAM_PARTS``: chunks per stream (default 3), ``STUB_STREAM_GAP_MS`` apart (default 50),
  then, with ``stream_options.include_usage``, a usage-only event (as vLLM's: ``choices`` empty, one completion
  token per chunk), then ``data: [DONE]``.
- ``STUB_SLEEP_MS`` / ``STUB_WAKE_MS``: how long ``/sleep`` / ``/wake_up`` take (default 0); other
  connections are served meanwhile, and the engine falls asleep or wakes even if the caller hangs up.
- ``STUB_WAKE_FAIL``: ``/wake_up`` fails, a 500, and the engine stays asleep.
- ``STUB_REPLY_MS``: how long a plain (not streamed) chat or completion takes to answer (default 0).
- LoRA adapters with ``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: ``stub_lora.py``.
- ``STUB_GPU_MEMORY``: take the GPU memory ``--gpu-memory-utilization`` says before listening (``stub_gpu.py``).
- ``STUB_METRICS``: ``current`` or ``old``: ``/metrics`` counts what the stub answered, in vLLM's names
  now or before its renames (``stub_metrics.py``).

A test injects a fault with a body field ``"stub_fault": {"port": P, "do": "die" | "drop"}``: the
engine on port P, once it has read the request, SIGKILLs itself without answering ("die"), or closes
the connection unanswered and stays alive ("drop"). Engines on other ports ignore the field.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import time

from . import stub_gpu
from .stub_http import (
    ASLEEP,
    CONTINUE,
    DONE,
    MAX_HEAD,
    NOT_ALLOWED,
    NOT_FOUND,
    STREAM_HEAD,
    UNAUTHORIZED,
    bad_request,
    bind,
    closing,
    frame,
    parse_head,
    response,
)
from .stub_lora import LORA_ROUTES, LoraAdapters
from .stub_metrics import PROMETHEUS, StubMetrics, busy_page
from .stub_sleep import DEV_ROUTES, SleepMode, SleepRoutes

CACHE_SIZE = 256  # replies precomputed per (route, model, ...); cleared when full
CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"


class BadBody(ValueError):
    """A request body that vLLM would refuse with a 400."""


class Stub(SleepMode, LoraAdapters):
    """What the engine serves: its settings from the command line and environment, and its replies,
    precomputed once (fixed ones) or on first use (those that depend on the request's model)."""

    def __init__(self, args: argparse.Namespace, env) -> None:
        self.port = args.port
        self.served = (args.served_model_name or [args.model])[0]
        self.pooling = args.runner == "pooling"
        key = args.api_key or env.get("VLLM_API_KEY")
        self.auth = f"Bearer {key}" if key else None
        self.busy = bool(env.get("STUB_BUSY"))
        self.hang = bool(env.get("STUB_HANG")) or self.busy
        self.parts = int(env.get("STUB_STREAM_PARTS") or 3)
        self.gap = float(env.get("STUB_STREAM_GAP_MS") or 50) / 1000
        self.dev_mode = env.get("VLLM_SERVER_DEV_MODE") == "1"
        self.sleep_mode = args.enable_sleep_mode
        self.sleep_delay = float(env.get("STUB_SLEEP_MS") or 0) / 1000
        self.wake_delay = float(env.get("STUB_WAKE_MS") or 0) / 1000
        self.wake_fails = bool(env.get("STUB_WAKE_FAIL"))
        self.reply_delay = float(env.get("STUB_REPLY_MS") or 0) / 1000
        self.counted = StubMetrics(env["STUB_METRICS"], self.served) if env.get("STUB_METRICS") else None
        self.sleeping = False
        self.wakes = 0  # wake_ups served
        self.ops: set[asyncio.Task] = set()  # sleeps and wake_ups under way
        self.created = int(time.time())
        self.generating = () if self.pooling else (CHAT, COMPLETIONS)
        routes = [EMBEDDINGS] if self.pooling else [CHAT, COMPLETIONS]
        self.health = response(200, b"")
        routes += sorted(DEV_ROUTES) if self.dev_mode else []
        self.openapi = response(200, {"paths": {**{r: {} for r in routes}, "/v1/models": {}, "/health": {}}})
        self.root = args.model
        self.lora = args.enable_lora and env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("true", "1")
        self.adapters: dict[str, str] = {}  # name -> path (stub_lora.py)
        self.models = None  # /v1/models, made on first use and again when the adapters change
        self.cache: dict[tuple, object] = {}

    def _cached(self, key: tuple, build):
        value = self.cache.get(key)
        if value is None:
            if len(self.cache) >= CACHE_SIZE:
                self.cache.clear()
            value = self.cache[key] = build()
        return value

    def reply(self, path: str, model: str) -> bytes:
        return self._cached((path, model), lambda: response(200, self._reply_body(path, model)))

    def _reply_body(self, path: str, model: str) -> dict:
        usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
        common = {"created": self.created, "model": model, "served_by": self.port, "usage": usage}
        if path == CHAT:
            return {"id": "chatcmpl-stub", "object": "chat.completion", **common,
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "stub"}}]}
        return {"id": "cmpl-stub", "object": "text_completion", **common,
                "choices": [{"index": 0, "finish_reason": "stop", "text": "stub", "logprobs": None}]}

    def events(self, path: str, model: str, usage: bool = False) -> list[bytes]:
        """A stream's events, each framed as a chunk (``usage``: and vLLM's usage-only event last)."""
        return self._cached(("stream", path, model, usage), lambda: self._events(path, model, usage))

    def _events(self, path: str, model: str, usage: bool = False) -> list[bytes]:
        raw = []
        for i in range(self.parts):
            finish = "stop" if i == self.parts - 1 else None
            if path == CHAT:
                delta = {"role": "assistant", "content": f"part{i}"} if i == 0 else {"content": f"part{i}"}
                event = {"id": "chatcmpl-stub", "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            else:
                event = {"id": "cmpl-stub", "object": "text_completion",
                         "choices": [{"index": 0, "text": f"part{i}", "finish_reason": finish, "logprobs": None}]}
            event.update(created=self.created, model=model, served_by=self.port)
            raw.append(frame(b"data: " + json.dumps(event).encode() + b"\n\n"))
        if usage:  # as vLLM writes it: compact JSON, no choices
            last = {"id": "chatcmpl-stub" if path == CHAT else "cmpl-stub", "created": self.created, "model": model,
                    "choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": self.parts,
                                             "total_tokens": 4 + self.parts}}
            raw.append(frame(b"data: " + json.dumps(last, separators=(",", ":")).encode() + b"\n\n"))
        return raw

    def tokenize(self, path: str, req: dict) -> dict:
        if path == "/detokenize":
            return {"prompt": "".join(chr(t) for t in req.get("tokens") or []), "served_by": self.port}
        tokens = [ord(c) for c in str(req.get("prompt", ""))]
        return {"count": len(tokens), "max_model_len": 2048, "tokens": tokens, "served_by": self.port}

    def embeddings(self, model: str, n: int) -> bytes:
        return self._cached((EMBEDDINGS, model, n), lambda: response(200, {
            "id": "embd-stub", "object": "list", "created": self.created, "model": model, "served_by": self.port,
            "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n},
            "data": [{"object": "embedding", "index": i, "embedding": [0.5, 0.5]} for i in range(n)]}))


class Http(SleepRoutes, asyncio.Protocol):
    """One client connection: HTTP/1.1 keep-alive, requests answered in order."""

    def __init__(self, stub: Stub) -> None:
        self.stub = stub

    def connection_made(self, transport) -> None:
        self.transport, self.buf, self.head = transport, b"", None
        self.busy = False  # a reply is under way (a stream) or never coming: later requests wait
        self.task: asyncio.Task | None = None  # the stream or the delayed reply being sent
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.buf = self.buf + data if self.buf else data
        if not self.busy:
            self.process()

    def eof_received(self) -> bool | None:
        self.eof = True
        return self.task is not None or None  # a stream runs on to its end; otherwise close

    def connection_lost(self, exc) -> None:
        self.busy = True
        if self.task is not None:
            self.task.cancel()

    def process(self) -> None:
        while not self.busy and self.buf:
            if self.head is None:
                self.buf = self.buf.lstrip(b"\r\n")  # blank lines between requests are allowed
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > MAX_HEAD:
                        self.fail("the request head is too large")
                    return
                try:
                    self.head = parse_head(self.buf[:end])
                except ValueError as e:
                    return self.fail(f"malformed request: {e}")
                self.buf = self.buf[end + 4:]
                if self.head[4] and not self.buf and self.head[3].get("expect", "").lower() == "100-continue":
                    self.transport.write(CONTINUE)  # the client waits for this before sending its body
            method, path, keep, headers, length, query = self.head
            if len(self.buf) < length:
                return
            body, self.buf = self.buf[:length], self.buf[length:]
            self.head = None
            if path in DEV_ROUTES:
                self.dev(method, path, query, headers, keep)
            else:
                self.handle(method, path, headers, body, keep)

    def fail(self, message: str) -> None:
        """A request that cannot be parsed: 400, then close (what follows it cannot be framed)."""
        self.busy, self.buf = True, b""
        self.transport.write(closing(bad_request(message)))
        self.transport.close()

    def send(self, reply: bytes, keep: bool) -> None:
        if keep:
            self.transport.write(reply)
        else:
            self.busy = True
            self.transport.write(closing(reply))
            self.transport.close()

    def handle(self, method: str, path: str, headers: dict, body: bytes, keep: bool) -> None:
        stub = self.stub
        if path == "/health":
            return self.send(stub.health, keep)
        if path == "/openapi.json":
            return self.send(stub.openapi, keep)
        if path == "/metrics":
            page = busy_page(stub.served) if stub.busy else stub.counted and stub.counted.page()
            return self.send(response(200, page.encode(), PROMETHEUS) if page else NOT_FOUND, keep)
        if stub.auth and path.startswith("/v1") and headers.get("authorization") != stub.auth:
            return self.send(UNAUTHORIZED, keep)
        if path == "/v1/models":
            return self.send(stub.models_reply() if method == "GET" else NOT_ALLOWED, keep)
        if method != "POST":
            return self.send(NOT_ALLOWED if path in (CHAT, COMPLETIONS, EMBEDDINGS) else NOT_FOUND, keep)
        try:
            req = json.loads(body) if body.strip() else {}
            if not isinstance(req, dict):
                raise BadBody("the body must be a JSON object")
        except (ValueError, RecursionError) as e:  # like vLLM: a bad body is a 400, never a dropped connection
            why = str(e) if isinstance(e, BadBody) else f"{type(e).__name__}: {e}"
            return self.send(bad_request(f"bad request: {why}"), keep)
        if stub.hang:  # STUB_HANG / STUB_BUSY: read, never answered
            self.busy = True
            return
        fault = req.pop("stub_fault", None)  # {"port": P, "do": "die"|"drop"}: injected by a test
        if isinstance(fault, dict) and fault.get("port") == stub.port:
            if fault.get("do") == "die":  # the engine dies with the request read, nothing answered
                os.kill(os.getpid(), signal.SIGKILL)
            self.busy, self.buf = True, b""  # "drop": alive, but this request is cut off unanswered
            return self.transport.close()
        model = req.get("model") or stub.served
        if not isinstance(model, str):
            return self.send(bad_request("bad request: 'model' must be a string"), keep)
        if path in LORA_ROUTES:
            return self.send(stub.lora_route(path, req), keep)
        if path in stub.generating and (unknown := stub.unknown_model(model)):
            return self.send(unknown, keep)
        if path in ("/tokenize", "/detokenize"):  # vLLM's, at its root: one token per character here
            return self.send(response(200, stub.tokenize(path, req)), keep)
        if path in stub.generating:
            if stub.sleeping:  # never answered by a sleeping engine
                return self.send(ASLEEP, keep)
            if stub.counted:
                stub.counted.add(stub.parts if req.get("stream") else 1, stub.reply_delay)
            if req.get("stream"):
                options = req.get("stream_options")
                usage = isinstance(options, dict) and options.get("include_usage") is True
                return self.stream(stub.events(path, model, usage), keep)
            if "cache_salt" in req:  # echoed, so a test sees the salt that reached the engine
                body = {**stub._reply_body(path, model), "cache_salt": req["cache_salt"]}
                return self.send(response(200, body), keep)
            if stub.reply_delay:
                return self.delayed(stub.reply(path, model), keep)
            return self.send(stub.reply(path, model), keep)
        if path == EMBEDDINGS and stub.pooling:
            if stub.sleeping:
                return self.send(ASLEEP, keep)
            inputs = req.get("input")
            if isinstance(inputs, str):
                return self.send(stub.embeddings(model, 1), keep)
            if isinstance(inputs, list):
                return self.send(stub.embeddings(model, len(inputs)), keep)
            return self.send(bad_request("bad request: 'input' must be a string or a list"), keep)
        return self.send(NOT_FOUND, keep)

    def delayed(self, reply: bytes, keep: bool) -> None:
        """A reply that takes ``STUB_REPLY_MS`` to generate (dropped if the client goes away)."""
        async def generate() -> bytes:
            await asyncio.sleep(self.stub.reply_delay)
            return reply

        loop = asyncio.get_running_loop()
        self.busy = True
        self.task = loop.create_task(self._later(loop.create_task(generate()), keep))

    async def _later(self, op: asyncio.Task, keep: bool) -> None:
        """The reply of ``op``, once it is done; then the requests that came after it."""
        reply = await asyncio.shield(op)
        self.task = None
        if self.transport.is_closing():
            return
        if not keep or self.eof:
            self.transport.write(closing(reply))
            return self.transport.close()
        self.transport.write(reply)
        self.busy = False
        if self.buf:
            self.process()

    def stream(self, events: list[bytes], keep: bool) -> None:
        self.busy = True
        self.task = asyncio.get_running_loop().create_task(self._stream(events, keep))

    async def _stream(self, parts: list[bytes], keep: bool) -> None:
        """Chunks ``gap`` apart, then ``[DONE]``; the connection closes after it unless kept alive."""
        transport, gap = self.transport, self.stub.gap
        transport.write(STREAM_HEAD + (parts[0] if parts else b""))
        for part in parts[1:]:
            await asyncio.sleep(gap)
            if transport.is_closing():
                return
            transport.write(part)
        if parts:
            await asyncio.sleep(gap)
            if transport.is_closing():
                return
        self.task = None
        transport.write(DONE)
        if not keep or self.eof:
            return transport.close()
        self.busy = False
        if self.buf:
            self.process()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="A fast stand-in for vLLM's OpenAI server.")
    parser.add_argument("--model", default="stub")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", nargs="+")
    parser.add_argument("--runner")
    parser.add_argument("--api-key")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--middleware", action="append", default=[])  # sage_nb's KeyGuard: emulated
    return parser.parse_known_args(argv)[0]  # vLLM's other options are taken and ignored


async def serve(stub: Stub, sock: socket.socket) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: Http(stub), sock=sock, backlog=1024)
    await server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    time.sleep(float(os.environ.get("STUB_STARTUP_DELAY") or 0))
    held = stub_gpu.take(args.gpu_memory_utilization) if os.environ.get("STUB_GPU_MEMORY") else None  # noqa: F841
    stub = Stub(args, os.environ)
    sock = bind(args.host, args.port)
    print(f"stub engine {stub.served} on {args.host}:{args.port}", flush=True)
    try:
        import uvloop  # vLLM's own server runs on uvloop too
    except ImportError:
        run = asyncio.run
    else:
        run = getattr(uvloop, "run", asyncio.run)
    run(serve(stub, sock))


if __name__ == "__main__":
    main()
