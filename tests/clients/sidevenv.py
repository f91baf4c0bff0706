"""Side virtualenvs for third-party clients in tests (they never become sage_nb dependencies).

``ensure(name)`` makes ``.venv-clients/<name>`` from ``tests/clients/requirements-<name>.txt``
(exact ``==`` pins) and reuses it while that file and the Python version are unchanged (their
hash is stamped in the venv). A failed install raises :class:`SideVenvError` with the tail of
pip's log. ``SideVenv.run`` runs a script there with the repo on ``PYTHONPATH``, so the script
imports this checkout's ``sage_nb`` (whose import needs only ``psutil`` beyond the stdlib).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENVS = ROOT / ".venv-clients"
REQUIREMENTS = Path(__file__).resolve().parent
STAMP = ".requirements.sha256"


class SideVenvError(RuntimeError):
    """The side venv could not be made (the message ends with pip's log tail)."""


@dataclass
class SideVenv:
    """A ready side venv; ``install_s`` is how long making it took (0 when it was reused)."""

    name: str
    path: Path
    install_s: float

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def env(self, **extra: str) -> dict[str, str]:
        """This process's environment for the venv: the repo on ``PYTHONPATH``, nothing of ``.venv``."""
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONHOME", "PYTHONPATH", "VIRTUAL_ENV")}
        env.update(PYTHONPATH=str(ROOT), PYTHONNOUSERSITE="1", VIRTUAL_ENV=str(self.path),
                   PATH=f"{self.path / 'bin'}{os.pathsep}{env.get('PATH', '')}")
        env.update(extra)
        return env

    def run(self, args: list[str], *, env: dict[str, str] | None = None, input: str | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
        """``python ARGS`` in the venv, output captured as text (``env``: see :meth:`env`)."""
        return subprocess.run([str(self.python), *args], env=env or self.env(), cwd=ROOT, input=input,
                              capture_output=True, text=True, timeout=timeout)


def requirements_file(name: str, directory: Path = REQUIREMENTS) -> Path:
    path = directory / f"requirements-{name}.txt"
    if not path.is_file():
        raise SideVenvError(f"no requirements file for side venv {name!r}: {path}")
    return path


def digest(requirements: Path) -> str:
    """What a venv was made from: the requirements file and this Python's version."""
    return hashlib.sha256(requirements.read_bytes() + sys.version.encode()).hexdigest()


def _tail(log: Path, chars: int = 4000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def ensure(name: str, *, requirements_dir: Path = REQUIREMENTS, venvs: Path = VENVS,
           timeout: float = 1200) -> SideVenv:
    """The side venv ``name`` (``venvs/name``), made (or remade) when missing or made from other
    requirements (``requirements_dir/requirements-<name>.txt``)."""
    requirements = requirements_file(name, requirements_dir)
    wanted = digest(requirements)
    path = venvs / name
    venvs.mkdir(exist_ok=True)
    with open(venvs / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time; the others then reuse its venv
        stamp = path / STAMP
        if stamp.is_file() and stamp.read_text().strip() == wanted and (path / "bin" / "python").exists():
            return SideVenv(name, path, 0.0)
        t0 = time.monotonic()
        shutil.rmtree(path, ignore_errors=True)
        log = venvs / f"{name}.pip.log"
        with open(log, "w") as out:
            for step in ([sys.executable, "-m", "venv", str(path)],
                         [str(path / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
                          "--no-input", "-r", str(requirements)]):
                out.write(f"$ {' '.join(step)}\n")
                out.flush()
                try:
                    code = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                                          env={**os.environ, "PIP_NO_INPUT": "1"}).returncode
                except subprocess.TimeoutExpired:
                    code = f"timeout after {timeout:.0f} s"
                if code != 0:
                    raise SideVenvError(f"making side venv {name!r} from {requirements.name} failed ({code}); "
                                        f"{log}:\n{_tail(log)}")
        stamp.write_text(wanted + "\n")
        return SideVenv(name, path, time.monotonic() - t0)
