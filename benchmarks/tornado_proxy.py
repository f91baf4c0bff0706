"""A bare tornado proxy (reference path for the gateway benchmark): no auth, no routing, no counting.

``python -m benchmarks.tornado_proxy PORT UPSTREAM_PORT UPSTREAM_KEY`` forwards ``/v1/...`` POSTs to
the upstream with tornado's curl client (keep-alive) and streams with the simple client — the
floor a tornado-based gateway such as sage_nb's can reach on this machine.
"""

import asyncio
import sys

from tornado import httpclient, web
from tornado.curl_httpclient import CurlAsyncHTTPClient
from tornado.simple_httpclient import SimpleAsyncHTTPClient

PORT, UPSTREAM, KEY = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
CLIENTS = {}  # made inside the running loop (a client binds to the loop current at its creation)


class Proxy(web.RequestHandler):
    async def post(self, route: str) -> None:
        stream = b'"stream": true' in self.request.body

        def on_chunk(chunk: bytes) -> None:
            self.write(chunk)
            self.flush()

        if stream:
            self.set_header("Content-Type", "text/event-stream")
            self.request.connection.stream.set_nodelay(True)  # else Nagle holds chunks back
        request = httpclient.HTTPRequest(
            f"http://127.0.0.1:{UPSTREAM}/v1/{route}", method="POST", body=self.request.body,
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            streaming_callback=on_chunk if stream else None, decompress_response=False)
        response = await CLIENTS["stream" if stream else "plain"].fetch(request, raise_error=False)
        if not stream:
            self.set_status(response.code)
            self.set_header("Content-Type", response.headers.get("Content-Type", "application/json"))
            self.write(response.body)
        self.finish()


class Health(web.RequestHandler):
    def get(self) -> None:
        self.finish("")


async def main() -> None:
    CLIENTS.update(plain=CurlAsyncHTTPClient(force_instance=True, max_clients=256),
                   stream=SimpleAsyncHTTPClient(force_instance=True, max_clients=256))
    web.Application([(r"/v1/(.*)", Proxy), (r"/health", Health)]).listen(PORT, "127.0.0.1")
    print(f"bare tornado proxy on {PORT} -> {UPSTREAM}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
