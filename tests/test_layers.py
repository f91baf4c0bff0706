"""The layers hold: no import circle under ``sage_nb/``, ``controlplane/`` imports nothing from
Jupyter, IPython, tornado or ipywidgets (statically, and at run time), no module of ``kernel/``
imports the package root or the server, and the server never imports the kernel side."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sage_nb"
JUPYTER = {"jupyter_server", "jupyter_client", "IPython", "ipykernel", "ipywidgets", "tornado", "traitlets"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if "stub_engine" not in p.parts}


def imports(name: str) -> set[str]:
    """Every dotted name a module imports, at the top or inside functions."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
    return found


def internal(name: str) -> set[str]:
    """The package modules ``name`` depends on (a submodule importing its own package does not count)."""
    deps = set()
    for target in imports(name):
        parts = target.split(".")
        for i in range(len(parts), 0, -1):
            candidate = ".".join(parts[:i])
            if candidate in MODULES:
                if candidate != name and not name.startswith(candidate + "."):
                    deps.add(candidate)
                break
    return deps


GRAPH = {name: internal(name) for name in MODULES}


def test_no_import_circle():
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            pytest.fail("import circle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done:
            return
        for dep in sorted(GRAPH[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(MODULES):
        visit(name, [])


def test_layer_rules():
    root_modules = {n for n, p in MODULES.items() if p.parent == PACKAGE}
    broken = []
    for name, deps in GRAPH.items():
        layer = name.split(".")[1] if "." in name else ""
        if layer == "controlplane":
            external = {t.split(".")[0] for t in imports(name)}
            broken += [f"{name} imports {m}" for m in sorted(external & JUPYTER)]
            broken += [f"{name} imports {d}" for d in deps if d.startswith(("sage_nb.server", "sage_nb.kernel"))]
        if layer == "kernel":
            broken += [f"{name} imports {d}" for d in deps if d in root_modules or d.startswith("sage_nb.server")]
        if layer == "server":
            broken += [f"{name} imports {d}" for d in deps if d.startswith("sage_nb.kernel")]
    assert not broken, broken


# Inside controlplane/, what each part may import (docs/design.md, "Import rules"). "top" is the
# shared vocabulary directly in controlplane/ (errors, settings, state, validation, requests, public).
PARTS = {
    "top": {"top", "gpus.visible", "gpus.sizing", "gpus.hubmeta"},
    "store": {"top", "store", "engines.process"},
    "gpus": {"top", "gpus", "engines.process"},
    "cluster": {"top", "store", "gpus", "cluster", "engines.process", "engines.scan"},
    "engines": {"top", "store", "gpus", "cluster", "engines", "adapters"},
    "adapters": {"top", "store", "adapters"},
    "routing": {"top", "store", "engines"},
    "sharing": {"top", "store", "sharing"},
    "metrics": {"top", "metrics"},
    "doctor": {"top", "store", "gpus", "engines", "doctor"},  # the facade is handed in, never imported
}


def part(name: str) -> tuple[str, str]:
    """(part, part.module) of a controlplane module: ``("engines", "engines.process")``, ``("top", "top")``."""
    rest = name.removeprefix("sage_nb.controlplane").lstrip(".").split(".")
    if rest[0] in PARTS:
        return rest[0], ".".join(rest[:2])
    return ("core", "core") if rest[0] in ("", "core") else ("top", "top")


def test_control_plane_parts_import_one_way():
    packages = {f"sage_nb.controlplane.{p}" for p in PARTS if p != "top"}
    broken = [f"{p}/__init__.py imports {sorted(GRAPH[p])} (a part's __init__ is its docstring only)"
              for p in sorted(packages) if GRAPH[p]]
    for name, deps in GRAPH.items():
        if not name.startswith("sage_nb.controlplane.") or name.endswith(".core"):
            continue
        for dep in deps - packages:  # `from ..engines import process` also names the (empty) package
            if dep == "sage_nb.controlplane.core":
                broken.append(f"{name} imports the facade")
            elif dep.startswith("sage_nb.controlplane."):
                allowed = PARTS[part(name)[0]]
                if not {part(dep)[0], part(dep)[1]} & allowed:
                    broken.append(f"{name} imports {dep}")
    assert not broken, broken


def test_the_checks_see_what_they_check():
    # guards against a walker that finds nothing: known edges must be there
    assert "sage_nb.controlplane.engines.supervisor" in GRAPH["sage_nb.controlplane.core"]
    assert "sage_nb.kernel.client" in GRAPH["sage_nb.client"]
    assert "tornado" in {t.split(".")[0] for t in imports("sage_nb.server.gateway")}


def test_control_plane_loads_nothing_from_jupyter_at_run_time():
    code = ("import sys, sage_nb.controlplane; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {sorted(JUPYTER)!r}]; "
            "print(bad); sys.exit(bool(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_kernel_client_imports_without_the_servers_dependencies():
    """Side venvs (LangChain, jupyter-ai) install sage_nb's client alone: reading metrics and drawing them
    import prometheus_client and bqplot only when they are used."""
    code = ("import sys\n"
            "class Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] in ('prometheus_client', 'bqplot', 'pandas'):\n"
            "            raise ImportError('blocked ' + name)\n"
            "sys.meta_path.insert(0, Block())\n"
            "import sage_nb.client, sage_nb.kernel.magics, sage_nb.controlplane\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
