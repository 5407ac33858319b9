#!/usr/bin/env bash
# The whole job on a lent NVIDIA H200 (no package registry there): llama.cpp's llama-server built
# with CUDA from its source, the Gemma 3 270M GGUF and the Python wheels carried in pieces, then
# the engine benchmark (the real flow, CLI and Prefect) against that server. One step per call:
#   bash bench/gpu/h200.sh take DIR      copy a carried folder in; builds llama-server in the background
#                                        once the source is there, installs wheels once they are
#   bash bench/gpu/h200.sh serve [N]     assemble + check the GGUF, wait for the build, start N slots
#   bash bench/gpu/h200.sh bench ARGS    python -m bench.benchmark --only engine --engine-url ... ARGS
set -euo pipefail
W=/tmp/h200
mkdir -p "$W/in" "$W/site"
export PYTHONPATH="$W/site" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
GGUF_SHA256=a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818  # the package's EXPECTED_SHA256

case "$1" in
take)
    cp -r "$2"/. "$W/in/"
    if [ -f "$W/in/llama-src.tar.xz" ] && [ ! -d "$W/llama.cpp" ]; then
        tar -xJf "$W/in/llama-src.tar.xz" -C "$W"
        (cd "$W" && setsid nohup bash -c 'cmake -S llama.cpp -B build -G Ninja -DGGML_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES=90 -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build build -j16 --target llama-server && touch built' \
            > "$W/build.log" 2>&1 < /dev/null &)
        echo "llama-server build started"
    fi
    if ls "$W"/in/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
            "$W"/in/*.whl && rm "$W"/in/*.whl && echo "wheels installed"
    fi
    python3 --version; ls "$W/in"; tail -n 2 "$W/build.log" 2>/dev/null || true
    ;;
serve)
    slots=${2:-16}
    if [ ! -f "$W/model.gguf" ]; then
        cat "$W"/in/gguf.part* > "$W/model.gguf"
        python3 -c "import hashlib,sys; h=hashlib.sha256(open('$W/model.gguf','rb').read()).hexdigest(); print('sha256', h); sys.exit(h != '$GGUF_SHA256')"
    fi
    until [ -f "$W/built" ]; do tail -n 1 "$W/build.log"; sleep 10; done
    setsid nohup "$W/build/bin/llama-server" -m "$W/model.gguf" --alias gemma3-270m --host 127.0.0.1 --port 8080 \
        --parallel "$slots" -c $((slots * 1024)) -ngl 99 -fa on --no-webui > "$W/server.log" 2>&1 < /dev/null &
    until curl -sf http://127.0.0.1:8080/health >/dev/null; do sleep 1; done
    curl -s http://127.0.0.1:8080/props | python3 -c "import json,sys; p=json.load(sys.stdin); print('slots', p['total_slots'], 'n_ctx', p['default_generation_settings']['n_ctx'])"
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,power.draw --format=csv
    ;;
bench)
    shift
    python3 -m bench.benchmark --only engine --engine-url http://127.0.0.1:8080/v1 "$@"
    ;;
esac
