"""The stub engine's sleep mode (``--enable-sleep-mode``, ``VLLM_SERVER_DEV_MODE=1``), driven as a real process."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import subprocess
import sys
import threading
import time

from sage_nb.controlplane.engines.probes import call

from ..conftest import STUB_PATH, wait_for

HOST, KEY = "127.0.0.1", "stub-key"
CHAT_BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def stub(*flags: str, key: str | None = KEY, **env: str):
    """A stub engine process on a free port; its port once ``/health`` answers; killed at the end."""
    port = free_port()
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("STUB_", "VLLM_"))}
    full_env.update(PYTHONPATH=STUB_PATH, **env)
    if key:
        full_env["VLLM_API_KEY"] = key
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", "m",
                             "--host", HOST, "--port", str(port), *flags],
                            env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: proc.poll() is not None or call(HOST, port, "GET", "/health", timeout=0.5).status == 200,
                 timeout=15, interval=0.02)
        assert proc.poll() is None, proc.stderr.read().decode()
        yield port
    finally:
        proc.kill()
        proc.wait(5)
        proc.stderr.close()


def is_sleeping(port: int) -> dict:
    reply = call(HOST, port, "GET", "/is_sleeping", KEY)
    assert reply.status == 200, reply
    return reply.json()


def chat(port: int):
    return call(HOST, port, "POST", "/v1/chat/completions", KEY, 2.0, CHAT_BODY)


def pipelined(port: int, requests: list[bytes], timeout: float = 5.0) -> list[tuple[int, bytes]]:
    """Send all the requests at once on one connection; their ``(status, body)`` replies, in order."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(b"".join(requests))
        data, replies = b"", []
        while len(replies) < len(requests):
            end = data.find(b"\r\n\r\n")
            if end >= 0:
                head = data[:end].decode("latin-1").split("\r\n")
                length = int(next(h.split(":", 1)[1] for h in head if h.lower().startswith("content-length:")))
                if len(data) >= end + 4 + length:
                    replies.append((int(head[0].split()[1]), data[end + 4:end + 4 + length]))
                    data = data[end + 4 + length:]
                    continue
            chunk = s.recv(65536)
            assert chunk, f"connection closed after {len(replies)} replies"
            data += chunk
    return replies


def test_sleep_and_wake_up():
    with stub("--enable-sleep-mode", "--middleware", "sage_nb_engine_guard.KeyGuard",
              VLLM_SERVER_DEV_MODE="1", STUB_WAKE_MS="300") as port:
        assert is_sleeping(port) == {"is_sleeping": False, "wakes": 0}
        assert chat(port).status == 200

        # the dev routes need the key, like every route of a KeyGuard'ed vLLM
        for method, path in (("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            for key in (None, "wrong"):
                reply = call(HOST, port, method, path, key)
                assert reply.status == 401 and reply.json() == {"error": "Unauthorized"}, (method, path, key)
        assert not is_sleeping(port)["is_sleeping"]

        for bad in ("3", "-1", "x"):
            reply = call(HOST, port, "POST", f"/sleep?level={bad}", KEY)
            assert reply.status == 400 and "level" in reply.json()["error"]["message"]
        assert call(HOST, port, "GET", "/sleep", KEY).status == 405
        assert call(HOST, port, "POST", "/is_sleeping", KEY).status == 405

        reply = call(HOST, port, "POST", "/sleep?level=1", KEY)
        assert reply.status == 200 and reply.json() == {"status": "sleeping", "level": 1}
        assert is_sleeping(port) == {"is_sleeping": True, "wakes": 0}

        # asleep: never silently answered; /health and the model list still answer
        reply = chat(port)
        assert reply.status == 503 and reply.json()["error"]["message"] == "the engine is sleeping"
        stream = call(HOST, port, "POST", "/v1/completions", KEY, 2.0, {"model": "m", "prompt": "x", "stream": True})
        assert stream.status == 503
        assert call(HOST, port, "GET", "/health").status == 200
        assert call(HOST, port, "GET", "/v1/models", KEY).status == 200

        # waking takes STUB_WAKE_MS; other connections are served meanwhile, and it is asleep until done
        woke = {}

        def wake():
            start = time.monotonic()
            woke["reply"] = call(HOST, port, "POST", "/wake_up", KEY, 5.0)
            woke["took"] = time.monotonic() - start

        waker = threading.Thread(target=wake)
        waker.start()
        time.sleep(0.05)
        start = time.monotonic()
        assert call(HOST, port, "GET", "/health").status == 200
        assert is_sleeping(port)["is_sleeping"]
        assert time.monotonic() - start < 0.2
        waker.join(5)
        assert woke["reply"].status == 200 and woke["reply"].json() == {"status": "awake", "tags": None}
        assert woke["took"] >= 0.3
        assert chat(port).status == 200
        assert is_sleeping(port) == {"is_sleeping": False, "wakes": 1}

        # the level is read; no level is level 1
        for query, level in (("?level=0", 0), ("?level=2&mode=abort", 2), ("", 1)):
            reply = call(HOST, port, "POST", f"/sleep{query}", KEY)
            assert reply.json() == {"status": "sleeping", "level": level}

        # one connection, pipelined: the request after a wake_up waits for it, then sees it awake
        auth = f"authorization: Bearer {KEY}\r\n".encode()
        replies = pipelined(port, [b"POST /wake_up HTTP/1.1\r\nhost: x\r\n" + auth + b"content-length: 0\r\n\r\n",
                                   b"GET /is_sleeping HTTP/1.1\r\nhost: x\r\n" + auth + b"\r\n"])
        assert replies[0] == (200, b'{"status": "awake", "tags": null}')
        assert replies[1] == (200, b'{"is_sleeping": false, "wakes": 2}')

        # a caller that hangs up mid-wake (a close, or a reset) does not stop the engine waking
        for wakes, reset in ((3, False), (4, True)):
            assert call(HOST, port, "POST", "/sleep", KEY).status == 200
            with socket.create_connection((HOST, port)) as s:
                s.sendall(b"POST /wake_up HTTP/1.1\r\nhost: x\r\n" + auth + b"content-length: 0\r\n\r\n")
                time.sleep(0.05)
                if reset:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            assert is_sleeping(port)["is_sleeping"]
            wait_for(lambda w=wakes: is_sleeping(port) == {"is_sleeping": False, "wakes": w}, timeout=3)


def test_dev_routes_are_404_without_dev_mode():
    with stub("--enable-sleep-mode") as port:
        for method, path in (("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            reply = call(HOST, port, method, path, KEY)
            assert reply.status == 404, (method, path)
        assert chat(port).status == 200


def test_sleep_needs_sleep_mode():
    with stub(key=None, VLLM_SERVER_DEV_MODE="1") as port:  # and no key: the dev routes are open
        reply = call(HOST, port, "POST", "/sleep?level=1")
        assert reply.status == 400 and "sleep mode is not enabled" in reply.json()["error"]["message"]
        assert call(HOST, port, "GET", "/is_sleeping").json() == {"is_sleeping": False, "wakes": 0}
        assert call(HOST, port, "POST", "/v1/chat/completions", body=CHAT_BODY).status == 200


def test_failed_wake_up_stays_asleep():
    with stub("--enable-sleep-mode", "--runner", "pooling", VLLM_SERVER_DEV_MODE="1", STUB_WAKE_FAIL="1") as port:
        embed = {"model": "m", "input": "x"}
        assert call(HOST, port, "POST", "/v1/embeddings", KEY, 2.0, embed).status == 200
        assert call(HOST, port, "POST", "/sleep?level=2", KEY).json() == {"status": "sleeping", "level": 2}
        reply = call(HOST, port, "POST", "/wake_up", KEY)
        assert reply.status == 500 and reply.json()["error"]["message"] == "wake_up failed (STUB_WAKE_FAIL)"
        assert is_sleeping(port) == {"is_sleeping": True, "wakes": 0}
        reply = call(HOST, port, "POST", "/v1/embeddings", KEY, 2.0, embed)
        assert reply.status == 503 and reply.json()["error"]["message"] == "the engine is sleeping"
