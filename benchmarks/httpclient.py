"""One lean HTTP/1.1 keep-alive client (asyncio streams), the same for every path measured.

Latency at concurrency 1, throughput at concurrency N and streaming chunk timings; it reads
Content-Length and chunked bodies and reconnects when the server closes the connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field


@dataclass
class Reply:
    status: int
    body: bytes
    event_times: list[float] = field(default_factory=list)  # perf_counter() when each SSE event completed


class Conn:
    """One keep-alive connection to ``host:port`` sending requests with fixed extra headers."""

    def __init__(self, host: str, port: int, headers: dict[str, str] | None = None) -> None:
        self.host, self.port = host, port
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.reader = self.writer = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: bytes = b"") -> Reply:
        if self.writer is None:
            await self._open()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n{self.extra}"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n")
        self.writer.write(head.encode() + body)
        try:
            return await self._read()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.close()
            raise

    async def _read(self) -> Reply:
        r = self.reader
        raw = await r.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        reply = Reply(status, b"")
        if "content-length" in headers:
            reply.body = await r.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding") == "chunked":
            body, events = b"", 0
            while True:
                size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await r.readuntil(b"\r\n")
                    break
                body += (await r.readexactly(size + 2))[:-2]
                now, complete = time.perf_counter(), body.count(b"\n\n")
                reply.event_times += [now] * (complete - events)  # a proxy may split or merge chunks
                events = complete
            reply.body = body
        else:
            reply.body = await r.read()
            headers["connection"] = "close"
        if headers.get("connection") == "close":
            self.close()
        return reply


@dataclass
class Target:
    """Where one path sends requests: host, port, URL prefix (ending in ``/v1``) and auth header."""

    name: str
    host: str
    port: int
    prefix: str
    headers: dict[str, str]

    def conn(self) -> Conn:
        return Conn(self.host, self.port, self.headers)


def chat_body(model: str, stream: bool = False, **extra) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hello"}],
                       "max_tokens": 8, "stream": stream, **extra}).encode()


async def latencies(target: Target, route: str, body: bytes, n: int, warmup: int = 20) -> list[float]:
    """Seconds of each of ``n`` sequential requests on one keep-alive connection."""
    conn, out = target.conn(), []
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            reply = await conn.request("POST", f"{target.prefix}/{route}", body)
            if reply.status != 200:
                raise RuntimeError(f"{target.name}: HTTP {reply.status}: {reply.body[:300]!r}")
            if i >= warmup:
                out.append(time.perf_counter() - t0)
    finally:
        conn.close()
    return out


async def throughput(target: Target, route: str, body: bytes, concurrency: int, seconds: float) -> float:
    """Requests per second with ``concurrency`` connections each sending back to back."""
    done = 0
    start = time.perf_counter()
    deadline = start + seconds

    async def worker() -> None:
        nonlocal done
        conn = target.conn()
        try:
            while time.perf_counter() < deadline:
                reply = await conn.request("POST", f"{target.prefix}/{route}", body)
                if reply.status != 200:
                    raise RuntimeError(f"{target.name}: HTTP {reply.status}: {reply.body[:300]!r}")
                done += 1
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - start)


async def stream_timings(target: Target, body: bytes, n: int, warmup: int = 5) -> dict[str, list[float]]:
    """Per stream (seconds): ``ttfc`` time to the first SSE event, ``delay`` mean time from the request
    to each event, ``gap`` the largest pause between two events (a proxy that holds chunks back,
    e.g. through Nagle's algorithm, delivers them in bursts: larger delay and gap)."""
    conn, out = target.conn(), {"ttfc": [], "delay": [], "gap": []}
    try:
        for i in range(warmup + n):
            t0 = time.perf_counter()
            reply = await conn.request("POST", f"{target.prefix}/chat/completions", body)
            if reply.status != 200 or b"[DONE]" not in reply.body:
                raise RuntimeError(f"{target.name}: stream HTTP {reply.status}: {reply.body[:300]!r}")
            if i >= warmup:
                times = reply.event_times
                out["ttfc"].append(times[0] - t0)
                out["delay"].append(sum(t - t0 for t in times) / len(times))
                out["gap"].append(max(b - a for a, b in zip(times, times[1:], strict=False)))
    finally:
        conn.close()
    return out
