"""A bare tornado proxy (reference path for the gateway benchmark): no auth, no routing, no counting.

``python -m benchmarks.tornado_proxy PORT UPSTREAM_PORT UPSTREAM_KEY`` forwards ``/v1/...`` POSTs to
the upstream over one keep-alive aiohttp session, as the gateway does, streams passed on chunk by
chunk — the floor a tornado-based gateway such as sage_nb's can reach on this machine.
"""

import asyncio
import sys

import aiohttp
from tornado import web

PORT, UPSTREAM, KEY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
SESSION = {}  # made inside the running loop
HEADERS = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", "Accept-Encoding": "identity"}


class Proxy(web.RequestHandler):
    async def post(self, route: str) -> None:
        stream = b'"stream": true' in self.request.body
        if stream:
            self.request.connection.stream.set_nodelay(True)  # else Nagle holds chunks back
        async with SESSION["s"].post(f"http://127.0.0.1:{UPSTREAM}/v1/{route}", data=self.request.body,
                                     headers=HEADERS) as response:
            self.set_status(response.status)
            self.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
            if stream:
                async for chunk in response.content.iter_any():
                    self.write(chunk)
                    self.flush()
            else:
                self.write(await response.read())
        self.finish()


class Health(web.RequestHandler):
    def get(self) -> None:
        self.finish("")


async def main() -> None:
    SESSION["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1024, keepalive_timeout=3.0),
                                         auto_decompress=False)
    web.Application([(r"/v1/(.*)", Proxy), (r"/health", Health)]).listen(PORT, "127.0.0.1")
    print(f"bare tornado proxy on {PORT} -> {UPSTREAM}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
