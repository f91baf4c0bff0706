"""The gateway's connections to the engines: one aiohttp session for every request, plain or
streamed. Its HTTP parser is C (llhttp) and its pool keeps connections to the engines alive, so a
stream costs no new connection and no Python-level chunk parsing (tornado's simple client, used
before, opened a connection per stream and parsed every chunk in Python: most of the server's
time under load, see docs/benchmarks.md)."""

from __future__ import annotations

import aiohttp

# Seconds a pooled connection may sit idle. Below uvicorn's 5 s keep-alive (vLLM's server), so the
# gateway never sends a request on a connection the engine is closing.
KEEPALIVE = 3.0
MAX_CONNECTIONS = 1024
CONNECT_TIMEOUT = 5.0


class Upstream:
    """One ``aiohttp.ClientSession`` made on first use, on the server's running loop."""

    def __init__(self) -> None:
        self._session: aiohttp.ClientSession | None = None

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=MAX_CONNECTIONS, keepalive_timeout=KEEPALIVE)
            # bodies pass through as the engine sent them: no decompression, no headers of aiohttp's own
            self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  skip_auto_headers=("User-Agent",))
        return self._session

    def post(self, url: str, body: bytes, api_key: str, timeout: float):
        """A POST to an engine (an aiohttp request context manager)."""
        return self.session().post(
            url, data=body, timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=CONNECT_TIMEOUT),
            headers={"Authorization": f"Bearer {api_key}", "Content-Type": "application/json",
                     "Accept-Encoding": "identity"})

    async def gone(self, host: str, port: int) -> bool:
        """True when the engine's ``/health`` cannot be reached at all: it died or was stopped. A
        port still listening is not enough (a dying process's listener takes connections for a
        moment); one that answers, even with an error, or is merely slow, is not gone."""
        timeout = aiohttp.ClientTimeout(total=1.0)
        try:  # a connection of its own: a pooled one says nothing about the engine now
            async with aiohttp.ClientSession(timeout=timeout) as fresh, fresh.get(f"http://{host}:{port}/health"):
                return False
        except TimeoutError:
            return False
        except (OSError, aiohttp.ClientError):
            return True

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def never_connected(error: BaseException) -> bool:
    """True when the engine refused or never took the connection (safe to try another replica)."""
    return isinstance(error, aiohttp.ClientConnectorError | aiohttp.ConnectionTimeoutError)
