"""The ``usage`` of a streamed chat or completion, read as the stream passes.

The box service asks every streamed request for its usage (``stream_options.include_usage``), so each
one can be counted. vLLM then sends one more event before ``[DONE]``: ``choices`` empty, ``usage`` set.
A client that did not ask for it never sees it. Events are passed on whole: a read that ends inside an
event holds that event's start back until its end arrives (an engine writes each event in one piece,
so this almost never holds anything).
"""

from __future__ import annotations

import json

MARK = b'"usage":{'  # compact JSON (pydantic's), as vLLM writes it; never inside a string (quotes are escaped)
END = b"\n\n"


class UsageTap:
    """Feed it the stream's reads; it returns what to pass on and keeps the last usage it saw."""

    __slots__ = ("pass_usage", "usage", "_held")

    def __init__(self, pass_usage: bool) -> None:
        self.pass_usage = pass_usage  # the client asked for the usage event itself
        self.usage: dict | None = None
        self._held = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._held + chunk if self._held else chunk
        end = data.rfind(END)
        if end < 0:
            self._held = data
            return b""
        whole, self._held = data[:end + 2], data[end + 2:]
        if MARK not in whole:
            return whole
        out, start = [], 0
        while (at := whole.find(MARK, start)) >= 0:
            head = whole.rfind(END, 0, at)
            head = 0 if head < 0 else head + 2
            tail = whole.find(END, at) + 2
            keep = self._read(whole[head:tail])
            out.append(whole[start:head] if start <= head else b"")
            if keep:
                out.append(whole[head:tail])
            start = tail
        out.append(whole[start:])
        return b"".join(out)

    def flush(self) -> bytes:
        """What is held at the stream's end (an unterminated last event), passed on as it is."""
        held, self._held = self._held, b""
        return held

    def _read(self, event: bytes) -> bool:
        """Take the usage of one event; whether the event goes on to the client."""
        line = event.strip()
        if line.startswith(b"data:"):
            line = line[5:].strip()
        try:
            body = json.loads(line)
        except ValueError:
            return True
        usage = body.get("usage") if isinstance(body, dict) else None
        if isinstance(usage, dict):
            self.usage = usage
        # the extra usage-only event goes to no client that did not ask for it
        return self.pass_usage or bool(body.get("choices")) if isinstance(body, dict) else True


def stream_options(body: dict) -> tuple[dict, bool]:
    """``(body to send, whether the client asked for usage)``: the body with ``include_usage`` on."""
    options = body.get("stream_options")
    asked = isinstance(options, dict) and options.get("include_usage") is True
    if asked:
        return body, True
    merged = {**(options if isinstance(options, dict) else {}), "include_usage": True}
    return {**body, "stream_options": merged}, False


def reply_usage(body: bytes) -> dict | None:
    """The ``usage`` of a plain (not streamed) reply, or None."""
    if MARK not in body and b'"usage": {' not in body:
        return None
    try:
        usage = json.loads(body).get("usage")
    except (ValueError, AttributeError):
        return None
    return usage if isinstance(usage, dict) else None
