"""HTTP/1.1 framing for the stub engine: whole replies, chunks, the fixed replies it sends, and the
request-head parser (``api_server`` holds what the engine serves)."""

from __future__ import annotations

import json
import socket
from http import HTTPStatus

MAX_HEAD = 64 * 1024  # bytes of request line and headers


def response(status: int, body: dict | bytes, ctype: bytes = b"application/json") -> bytes:
    """A whole HTTP/1.1 reply with a content-length (the connection stays open)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return (b"HTTP/1.1 %d %s\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n"
            % (status, HTTPStatus(status).phrase.encode(), ctype, len(data))) + data


def closing(reply: bytes) -> bytes:
    """The same reply, announcing that the connection closes after it."""
    return reply.replace(b"\r\n\r\n", b"\r\nconnection: close\r\n\r\n", 1)


def frame(data: bytes) -> bytes:
    """One chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def error(status: int, kind: str, message: str) -> bytes:
    return response(status, {"error": {"message": message, "type": kind, "param": None, "code": status}})


def bad_request(message: str) -> bytes:
    return error(400, "BadRequestError", message)


UNAUTHORIZED = response(401, {"error": "Unauthorized"})
NOT_FOUND = response(404, {"detail": "Not Found"})
NOT_ALLOWED = response(405, {"detail": "Method Not Allowed"})
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
ASLEEP = error(503, "ServiceUnavailableError", "the engine is sleeping")
WAKE_FAILED = error(500, "InternalServerError", "wake_up failed (STUB_WAKE_FAIL)")
AWAKE = response(200, {"status": "awake", "tags": None})
# like uvicorn, a stream is chunked even when the connection closes after it
STREAM_HEAD = (b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
               b"transfer-encoding: chunked\r\n\r\n")
DONE = frame(b"data: [DONE]\n\n") + b"0\r\n\r\n"


def parse_head(head: bytes) -> tuple[str, str, bool, dict, int, str]:
    """``(method, path, keep_alive, headers, body length, query)``; ValueError when malformed (a chunked
    request body too: no client of an engine sends one)."""
    lines = head.decode("latin-1").split("\r\n")
    method, target, version = lines[0].split(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"unsupported protocol {version!r}")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise ValueError(f"bad header line {line!r}")
        headers[name.lower()] = value.strip()
    connection = headers.get("connection", "").lower()
    keep = "keep-alive" in connection if version == "HTTP/1.0" else "close" not in connection
    if "transfer-encoding" in headers:
        raise ValueError(f"unsupported transfer-encoding {headers['transfer-encoding']!r}")
    length_text = headers.get("content-length", "0")
    if not (length_text.isascii() and length_text.isdigit()):
        raise ValueError(f"bad content-length {length_text!r}")
    length = int(length_text)
    path, _, query = target.partition("?")
    return method, path, keep, headers, length, query


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, bound like vLLM binds it (``OSError: [Errno 98] Address already in use``
    when the port is taken)."""
    family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
