"""A lightweight stand-in for vLLM's OpenAI server, for control-plane tests only.

It takes vLLM's command line, needs its ``VLLM_API_KEY`` and answers ``/health``,
``/v1/models`` and ``/openapi.json``, so port, booking and state logic can be
exercised with many engines at once. End-to-end tests use the real vLLM.
"""

import argparse
import json
import os
import signal
import socket
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--host", default="0.0.0.0")
parser.add_argument("--port", type=int, default=8000)
parser.add_argument("--served-model-name", nargs="+")
parser.add_argument("--runner")
args, _ = parser.parse_known_args()
KEY = os.environ.get("VLLM_API_KEY")
SERVED = (args.served_model_name or [args.model])[0]
POOLING = args.runner == "pooling"
time.sleep(float(os.environ.get("STUB_STARTUP_DELAY", "0")))


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _send(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            return self._send(200, {})
        if self.path == "/metrics" and os.environ.get("STUB_BUSY"):  # progress counters that keep moving
            data = f"vllm:generation_tokens_total{{model_name=\"{SERVED}\"}} {time.time() * 100:.1f}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            return self.wfile.write(data)
        if self.path == "/openapi.json":
            route = "/v1/embeddings" if POOLING else "/v1/chat/completions"
            return self._send(200, {"paths": {route: {}, "/v1/models": {}}})
        if KEY and self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": "Unauthorized"})
        if self.path == "/v1/models":
            return self._send(200, {"object": "list", "data": [{"id": SERVED, "object": "model"}]})
        return self._send(404, {"detail": "Not Found"})


    def do_POST(self):
        try:
            self._post()
        except Exception as e:  # like vLLM: a bad body is a 400, never a dropped connection
            self._send(400, {"error": {"message": f"bad request: {e!r}"}})

    def _post(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(body, dict):
            raise ValueError("body must be an object")
        if KEY and self.headers.get("Authorization") != f"Bearer {KEY}":
            return self._send(401, {"error": "Unauthorized"})
        if os.environ.get("STUB_HANG") or os.environ.get("STUB_BUSY"):  # BUSY: slow, yet making progress
            time.sleep(3600)
        fault = body.pop("stub_fault", None)  # {"port": P, "do": "die"|"drop"}: injected by a test
        if isinstance(fault, dict) and fault.get("port") == args.port:
            if fault.get("do") == "die":  # the engine dies with the request read, nothing answered
                os.kill(os.getpid(), signal.SIGKILL)
            self.close_connection = True  # "drop": alive, but this request is cut off unanswered
            return self.request.shutdown(socket.SHUT_RDWR)
        route = self.path.removeprefix("/v1/")
        if route in ("chat/completions", "completions") and not POOLING:
            if body.get("stream"):
                return self._stream(body)
            return self._send(200, {"object": "chat.completion", "model": body.get("model"),
                                    "served_by": args.port,
                                    "choices": [{"index": 0, "message": {"role": "assistant",
                                                                         "content": "stub"}}]})
        if route == "embeddings" and POOLING:
            inputs = body.get("input")
            inputs = [inputs] if isinstance(inputs, str) else list(inputs)
            return self._send(200, {"object": "list", "model": body.get("model"), "served_by": args.port,
                                    "data": [{"index": i, "embedding": [0.5, 0.5]} for i in range(len(inputs))]})
        return self._send(404, {"detail": "Not Found"})

    def _stream(self, body):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(int(os.environ.get("STUB_STREAM_PARTS", "3"))):
            chunk = {"object": "chat.completion.chunk", "served_by": args.port,
                     "choices": [{"index": 0, "delta": {"content": f"part{i}"}}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
            time.sleep(0.05)
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


print(f"stub engine {SERVED} on {args.host}:{args.port}", flush=True)
ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
