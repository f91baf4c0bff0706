"""The box service: ``python -m sage_nb.service``, one sage_nb per machine that owns the *shared*
engines and serves them to every user of the box.

It is a jupyter_server with the sage_nb extension, like a user's own server (same control plane,
placement, supervisor, router and gateway; the same machine-wide ledger), run as a system user of
its own, with three differences: every request is authenticated by its caller's own credential
(:mod:`.identity`) instead of one server token; only sage_nb's routes are served (no kernels,
contents or terminals: nobody runs code as the service user); and the policy here applies —
admins and the publishers' group may start, stop, sleep, change keep-alive of and read logs of
shared engines, everyone may list and use them, and every request to an engine carries the
caller's own ``cache_salt``.

Started by JupyterHub as a managed service it reads where to listen from ``JUPYTERHUB_SERVICE_URL``
and ``JUPYTERHUB_SERVICE_PREFIX``; standalone (systemd or by hand) from its flags.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import os
import secrets
import sys
from pathlib import Path
from urllib.parse import urlsplit

from jupyter_server.auth.authorizer import Authorizer

from sage_nb.controlplane.adapters.uploads import MAX_BODY
from sage_nb.controlplane.errors import ControlPlaneError

from .identity import Caller

AUTH_RESOURCE = "sage_nb"


class BoxAuthorizer(Authorizer):
    """Only sage_nb's own routes: the service's kernels, contents, terminals and other extensions
    are refused to everyone (they would run code as the service user, which holds the engines' keys)."""

    def is_authorized(self, handler, user, action: str, resource: str) -> bool:
        return resource == AUTH_RESOURCE and isinstance(user, Caller)


class NotPublisher(ControlPlaneError):
    status = 403


class BoxPolicy:
    """What the service allows whom."""

    def __init__(self, publishers: str, salt_secret: bytes, user_adapters: bool = True) -> None:
        self.publishers = publishers  # a group (hub group or Unix group); "" : admins only
        self.user_adapters = user_adapters  # users may load their own LoRA adapters onto shared engines
        self._secret = salt_secret

    def may_administer(self, caller: Caller) -> bool:
        """Admins (the hub's, or root): they see every user's usage and the whole limits file."""
        return caller.admin or caller.username == "root"

    def may_publish(self, caller: Caller) -> bool:
        return caller.admin or caller.username == "root" or bool(self.publishers and self.publishers in caller.groups)

    def require_publisher(self, caller: Caller, what: str) -> None:
        """A :class:`NotPublisher` (403) with words unless ``caller`` may ``what`` shared engines."""
        if not self.may_publish(caller):
            who = f"admins and members of the group {self.publishers!r}" if self.publishers else "admins"
            raise NotPublisher(f"{caller.username!r} may not {what} shared engines: only {who} may. Start a "
                               "private engine instead (%llm start without --shared), or ask them")

    def cache_salt(self, user: str) -> str:
        """The ``cache_salt`` of every request of ``user``: one user cannot time another's prompts
        through the prefix cache (CVE-2025-46570). Stable per user, unguessable without the secret."""
        return hmac.new(self._secret, user.encode(), hashlib.sha256).hexdigest()[:32]


def salt_secret(state_dir: Path) -> bytes:
    """The service's secret for cache salts, made once and kept (0600) so salts survive a restart."""
    path = state_dir / "cache_salt.secret"
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError):
        state_dir.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_bytes(32)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secret.hex())
        return secret


def where_to_listen(args) -> tuple[str, int, str]:
    """(ip, port, base_url): the flags, else what JupyterHub gives a managed service."""
    ip, port, base = args.ip, args.port, args.base_url
    hub_url = os.environ.get("JUPYTERHUB_SERVICE_URL")
    if hub_url and port is None:
        parts = urlsplit(hub_url)
        ip, port = parts.hostname or "127.0.0.1", parts.port or 80
    if base is None:
        base = os.environ.get("JUPYTERHUB_SERVICE_PREFIX", "/")
    if port is None:
        raise SystemExit("sage_nb service: say where to listen (--port), or let JupyterHub start it as a managed "
                         "service with a url")
    return ip or "127.0.0.1", port, "/" + base.strip("/") + "/" if base.strip("/") else "/"


def server_argv(args) -> list[str]:
    """The jupyter_server command line of the service."""
    ip, port, base = where_to_listen(args)
    state = Path(args.state_dir).expanduser().resolve()
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    extensions = {"sage_nb": True, "jupyterlab": False, "notebook_shim": False, "jupyter_lsp": False,
                  "jupyter_server_terminals": False, "notebook": False, "jupyterhub": False}
    return [f"--ServerApp.ip={ip}", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
            "--ServerApp.open_browser=False", f"--ServerApp.base_url={base}",
            f"--ServerApp.root_dir={state}", f"--ServerApp.jpserver_extensions={extensions!r}",
            "--ServerApp.terminals_enabled=False",
            "--ServerApp.identity_provider_class=sage_nb.server.box.identity.BoxIdentityProvider",
            "--ServerApp.authorizer_class=sage_nb.server.box.service.BoxAuthorizer",
            f"--BoxIdentityProvider.keys_dir={state}", f"--BoxIdentityProvider.hub_cache_age={args.hub_cache_age}",
            f"--SageNBApp.state_dir={state}", "--SageNBApp.box_mode=True",
            f"--SageNBApp.box_publishers={args.publishers}", f"--SageNBApp.share_limits={args.limits}",
            f"--SageNBApp.box_user_adapters={not args.no_user_adapters}",
            f"--ServerApp.max_body_size={MAX_BODY}", f"--ServerApp.max_buffer_size={MAX_BODY}",  # users' adapters
            *(["--allow-root"] if args.allow_root else []),
            *args.server_args]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sage_nb.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--ip", default=None, help="address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=None, help="port (default: from JUPYTERHUB_SERVICE_URL)")
    parser.add_argument("--base-url", default=None, help="URL prefix (default: $JUPYTERHUB_SERVICE_PREFIX or /)")
    parser.add_argument("--state-dir", default=os.environ.get("SAGE_NB_STATE_DIR") or str(Path.home() / "state"),
                        help="the service's registry, engine logs and key store (default $SAGE_NB_STATE_DIR)")
    parser.add_argument("--publishers", default="", help="the group whose members may publish shared engines "
                                                         "(besides admins)")
    parser.add_argument("--limits", default="", help="the limits file (default: limits.toml in the state dir)")
    parser.add_argument("--no-user-adapters", action="store_true", help="only publishers load LoRA adapters onto "
                                                                        "shared engines (default: users their own too)")
    parser.add_argument("--hub-cache-age", type=int, default=60, help="seconds a hub token's check is cached")
    parser.add_argument("--allow-root", action="store_true", help=argparse.SUPPRESS)  # tests and benchmarks only
    parser.add_argument("server_args", nargs="*", help="more jupyter_server/SageNBApp options (after --)")
    args = parser.parse_args(argv)
    if os.getuid() == 0 and not args.allow_root:
        raise SystemExit("sage_nb service: do not run it as root; run it as a system user of its own "
                         "(useradd --system sage-llm), see docs/shared-server.md")
    from jupyter_server.serverapp import ServerApp

    command = server_argv(args)
    # its engines inherit its working directory; the hub's (e.g. /root, /srv/jupyterhub) may be closed to it
    os.chdir(Path(args.state_dir).expanduser().resolve())
    app = ServerApp.instance()
    app.initialize(argv=command)
    if app.web_app.settings.get("sage_nb_box") is None:  # never serve as a half-configured box service
        raise SystemExit("sage_nb service: the sage_nb extension did not load as the box service; see the "
                         "errors above (a bad option?)")
    app.start()


if __name__ == "__main__":
    sys.exit(main())
