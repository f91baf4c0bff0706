"""What the extension does to the server as it starts: its routes matched first (the server's own still
answer), and the long-lived objects frozen out of full garbage collections."""

import asyncio
import gc

from tornado.httputil import HTTPHeaders, HTTPServerRequest, RequestStartLine

from sage_nb.server.gateway import ProxyHandler
from sage_nb.server.handlers import EnginesHandler


def handler_for(web_app, path: str):
    request = HTTPServerRequest(start_line=RequestStartLine("POST", path, "HTTP/1.1"),
                                headers=HTTPHeaders(Host="127.0.0.1"))
    return web_app.find_handler(request).handler_class


async def test_sage_nb_group_is_first_and_shadows_nothing(jp_serverapp, jp_base_url):
    app = next(a for a in jp_serverapp.extension_manager.extension_apps["sage_nb"])
    await app._start_jupyter_server_extension(jp_serverapp)  # what the server calls as it starts
    await app.discovery
    first = jp_serverapp.web_app.default_router.rules[0].target
    assert any(r.target is ProxyHandler for r in first.rules)
    assert handler_for(jp_serverapp.web_app, f"{jp_base_url}sage_nb/v1/chat/completions") is ProxyHandler
    assert handler_for(jp_serverapp.web_app, f"{jp_base_url}sage_nb/api/engines") is EnginesHandler
    # a Jupyter route goes past sage_nb's group to the server's own
    status = handler_for(jp_serverapp.web_app, f"{jp_base_url}api/status")
    assert status.__module__.startswith("jupyter_server")


async def test_jupyter_routes_answer_with_sage_nb_first(jp_fetch, jp_serverapp):
    app = next(a for a in jp_serverapp.extension_manager.extension_apps["sage_nb"])
    await app._start_jupyter_server_extension(jp_serverapp)
    await app.discovery
    assert any(r.target is ProxyHandler for r in jp_serverapp.web_app.default_router.rules[0].target.rules)
    assert (await jp_fetch("api", "status")).code == 200
    assert (await jp_fetch("sage_nb", "v1", "models")).code == 200


async def test_start_freezes_what_the_server_holds(jp_serverapp):
    """Full collections no longer scan the server's long-lived objects (they stalled every stream)."""
    app = next(a for a in jp_serverapp.extension_manager.extension_apps["sage_nb"])
    gc.unfreeze()
    try:
        await app._start_jupyter_server_extension(jp_serverapp)
        await app.discovery
        for _ in range(100):
            if app.frozen:
                break
            await asyncio.sleep(0.02)
        assert app.frozen > 10_000 and gc.get_freeze_count() > 10_000
        assert len(gc.get_objects()) < app.frozen  # what a full collection still scans
    finally:
        gc.unfreeze()
