"""A fast OpenAI-compatible upstream for the benchmarks, started with vLLM's command line.

``PYTHONPATH=benchmarks/faststub python -m vllm.entrypoints.openai.api_server --model M --port P
--served-model-name S --host 127.0.0.1 [--runner pooling]``: sage_nb's discovery adopts it like a
real vLLM server. It answers at once (raw asyncio protocol, keep-alive, no framework), so what a
benchmark measures through it is the proxy in front of it. Env: ``VLLM_API_KEY`` (checked like
vLLM), ``FASTSTUB_STREAM_PARTS`` (chunks per stream, default 8), ``FASTSTUB_STREAM_GAP_MS``
(pause between chunks, default 2).
"""

import argparse
import asyncio
import json
import os
import time

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="stub")
parser.add_argument("--host", default="0.0.0.0")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--served-model-name", nargs="+")
parser.add_argument("--runner")
args, _ = parser.parse_known_args()
SERVED = (args.served_model_name or [args.model])[0]
POOLING = args.runner == "pooling"
KEY = os.environ.get("VLLM_API_KEY", "")
AUTH = f"Bearer {KEY}" if KEY else None
PARTS = int(os.environ.get("FASTSTUB_STREAM_PARTS", "8"))
GAP = float(os.environ.get("FASTSTUB_STREAM_GAP_MS", "2")) / 1000
REASONS = {200: "OK", 401: "Unauthorized", 404: "Not Found"}


def response(status: int, body: dict | bytes, ctype: bytes = b"application/json") -> bytes:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (status, REASONS[status].encode(), ctype, len(data))) + data


MODELS = response(200, {"object": "list", "data": [{"id": SERVED, "object": "model", "created": 0,
                                                     "owned_by": "vllm", "root": args.model}]})
ROUTE = "/v1/embeddings" if POOLING else "/v1/chat/completions"
OPENAPI = response(200, {"paths": {ROUTE: {}, "/v1/models": {}, "/health": {}}})
HEALTH = response(200, b"")
UNAUTHORIZED = response(401, {"error": "Unauthorized"})
NOT_FOUND = response(404, {"detail": "Not Found"})
USAGE = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
               b"transfer-encoding: chunked\r\n\r\n")


def chat(model: str) -> bytes:
    return response(200, {"id": "chatcmpl-stub", "object": "chat.completion", "created": int(time.time()),
                          "model": model, "usage": USAGE,
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": "stub"}}]})


def embeddings(model: str, inputs) -> bytes:
    inputs = [inputs] if isinstance(inputs, str) else inputs or []
    return response(200, {"object": "list", "model": model, "usage": USAGE,
                          "data": [{"object": "embedding", "index": i, "embedding": [0.5] * 8}
                                   for i in range(len(inputs))]})


def sse_chunk(model: str, i: int, last: bool) -> bytes:
    event = {"id": "chatcmpl-stub", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": [{"index": 0, "delta": {"role": "assistant", "content": f"t{i} "},
                                          "finish_reason": "stop" if last else None}]}
    data = b"data: " + json.dumps(event).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


DONE = b"%x\r\n%s\r\n0\r\n\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")


class Http(asyncio.Protocol):
    def connection_made(self, transport) -> None:
        self.transport, self.buf, self.busy = transport, b"", False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while not self.busy:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self.buf[:end].decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length") or 0)
            if len(self.buf) < end + 4 + length:
                return
            body, self.buf = self.buf[end + 4:end + 4 + length], self.buf[end + 4 + length:]
            self.handle(method, path.split("?", 1)[0], headers, body)
            if headers.get("connection", "").lower() == "close" and not self.busy:
                self.transport.close()
                return

    def handle(self, method: str, path: str, headers: dict, body: bytes) -> None:
        write = self.transport.write
        if path == "/health":
            return write(HEALTH)
        if path == "/openapi.json":
            return write(OPENAPI)
        if AUTH and headers.get("authorization") != AUTH:
            return write(UNAUTHORIZED)
        if method == "GET" and path == "/v1/models":
            return write(MODELS)
        req = json.loads(body or b"{}") if method == "POST" else {}
        model = req.get("model") or SERVED
        if path in ("/v1/chat/completions", "/v1/completions") and not POOLING:
            if req.get("stream"):
                self.busy = True
                return asyncio.ensure_future(self.stream(model, headers))
            return write(chat(model))
        if path == "/v1/embeddings" and POOLING:
            return write(embeddings(model, req.get("input")))
        return write(NOT_FOUND)

    async def stream(self, model: str, headers: dict) -> None:
        self.transport.write(STREAM_HEAD + sse_chunk(model, 0, PARTS == 1))
        for i in range(1, PARTS):
            await asyncio.sleep(GAP)
            if self.transport.is_closing():
                return
            self.transport.write(sse_chunk(model, i, i == PARTS - 1))
        await asyncio.sleep(GAP)
        if self.transport.is_closing():
            return
        self.transport.write(DONE)
        self.busy = False
        if headers.get("connection", "").lower() == "close":
            self.transport.close()
        elif self.buf:
            self.data_received(b"")


async def main() -> None:
    server = await asyncio.get_running_loop().create_server(Http, args.host, args.port, backlog=1024)
    print(f"faststub {SERVED} on {args.host}:{args.port}", flush=True)
    await server.serve_forever()


try:
    import uvloop  # vLLM's own server runs on uvloop too
except ImportError:
    uvloop = None
(uvloop.run if uvloop else asyncio.run)(main())
