#!/usr/bin/env bash
# Install llama-cpp-python (built from source, CPU only) plus its pinned server extra, and put
# llama.cpp's own HF -> GGUF converter (convert_hf_to_gguf.py + conversion/ + the gguf-py it was
# written against, all from the same sdist, i.e. the same llama.cpp commit as the runtime) next to
# the interpreter, where llmpipe.export.gguf looks for it. (The converter vendored by 0.3.36 needs
# gguf-py features newer than the PyPI gguf 0.19.0 release, e.g. gguf.LazyChunkedTensor, so it
# runs with its own gguf-py, as upstream intends; the PyPI `gguf` is used for reading files.)
#
# Fast and cached: the sdist and the built wheel are kept in a cache directory keyed by the
# version, CMAKE_ARGS, Python tag, platform and compiler, so the C++ build runs once per machine
# (or once per CI cache); every later run only reinstalls the cached wheel (seconds).
#
# Usage:  scripts/install_llama_cpp.sh [VENV_DIR]   # VENV_DIR/bin/python, else $PYTHON or `python`
#   scripts/install_llama_cpp.sh .venv            (what scripts/setup.sh calls)
#   PYTHON=/work/venv/bin/python scripts/install_llama_cpp.sh
# Env:   LLMPIPE_CACHE_DIR     cache root (default ${XDG_CACHE_HOME:-~/.cache}/llmpipe)
#        LLAMA_CPP_CMAKE_ARGS  override the CMake flags below (changes the cache key)
#        LLAMA_CPP_FORCE_BUILD=1  ignore a cached wheel and rebuild
set -euo pipefail

VERSION=0.3.36                      # newest on PyPI; GGUF v3, readable by the PyPI gguf 0.19.0
SKBUILD_CORE=scikit-build-core==1.1.2
# Pinned server extra of llama-cpp-python 0.3.36 (uvicorn, fastapi, pyyaml are in requirements.txt)
SERVER_DEPS=(sse-starlette==3.7.0 starlette-context==0.3.6 pydantic-settings==2.16.3)
# The converter imports sentencepiece (also pinned in requirements.txt).
CONVERTER_DEPS=(sentencepiece==0.2.1)

if [[ $# -ge 1 && -n "$1" ]]; then
    [[ -x "$1/bin/python" ]] || { echo "[install_llama_cpp] $1/bin/python: no such virtualenv interpreter" >&2; exit 2; }
    PY="$1/bin/python"
else
    PY=${PYTHON:-python}
fi
# CPU only. GGML_NATIVE=OFF builds a portable x86-64 AVX2/FMA/F16C wheel (cacheable across
# machines of one kind); LLAVA_BUILD=OFF skips the multimodal library we do not use.
# Tests/examples/tools/server are off by default when llama.cpp is a subproject; stated anyway.
DEFAULT_CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF \
-DGGML_VULKAN=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release"
CMAKE_ARGS_USED=${LLAMA_CPP_CMAKE_ARGS:-$DEFAULT_CMAKE_ARGS}

log() { echo "[install_llama_cpp] $*" >&2; }

command -v "$PY" >/dev/null 2>&1 || { log "python interpreter '$PY' not found (set PYTHON=...)"; exit 2; }
for tool in cmake c++; do
    command -v "$tool" >/dev/null 2>&1 || { log "'$tool' not found: apt-get install -y cmake g++ ninja-build"; exit 2; }
done

CACHE_ROOT=${LLMPIPE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/llmpipe}
PYTAG=$("$PY" -c 'import sys, sysconfig; print(f"cp{sys.version_info[0]}{sys.version_info[1]}-" + sysconfig.get_platform())')
CXX_ID=$(c++ --version | head -n1)
# A -march=native build is only valid on the same CPU: then the CPU flags join the key.
CPU_ID=portable
if [[ "$CMAKE_ARGS_USED" == *GGML_NATIVE=ON* ]]; then
    CPU_ID=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m)
fi
KEY=$(printf '%s\n%s\n%s\n%s\n%s\n' "$VERSION" "$CMAKE_ARGS_USED" "$PYTAG" "$CXX_ID" "$CPU_ID" | sha256sum | cut -c1-16)
SDIST_DIR="$CACHE_ROOT/sdist"
WHEEL_DIR="$CACHE_ROOT/llama-cpp-python/$VERSION-$KEY"
SDIST="$SDIST_DIR/llama_cpp_python-$VERSION.tar.gz"
PREFIX=$("$PY" -c 'import sys; print(sys.prefix)')
CONVERTER_DIR="$PREFIX/share/llmpipe/llama.cpp-convert-$VERSION"

mkdir -p "$SDIST_DIR" "$WHEEL_DIR"

if [[ ! -f "$SDIST" ]]; then
    log "downloading sdist llama-cpp-python==$VERSION into $SDIST_DIR"
    "$PY" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SDIST_DIR"
fi

WHEEL=$(ls "$WHEEL_DIR"/llama_cpp_python-"$VERSION"-*.whl 2>/dev/null | head -n1 || true)
if [[ -z "$WHEEL" || "${LLAMA_CPP_FORCE_BUILD:-0}" == "1" ]]; then
    log "building wheel (key $KEY, CMAKE_ARGS: $CMAKE_ARGS_USED)"
    "$PY" -m pip install --quiet "$SKBUILD_CORE"
    BUILD_TMP=$(mktemp -d "$WHEEL_DIR/.build.XXXXXX")
    trap 'rm -rf "$BUILD_TMP"' EXIT
    start=$(date +%s)
    # --no-cache-dir: pip's own wheel cache ignores CMAKE_ARGS; our cache dir is keyed on them.
    CMAKE_ARGS="$CMAKE_ARGS_USED" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
        "$PY" -m pip wheel --no-deps --no-build-isolation --no-cache-dir -w "$BUILD_TMP" "$SDIST" >&2
    built=$(ls "$BUILD_TMP"/llama_cpp_python-*.whl)
    mv "$built" "$WHEEL_DIR/"                       # same filesystem: atomic
    WHEEL="$WHEEL_DIR/$(basename "$built")"
    log "built $(basename "$WHEEL") in $(( $(date +%s) - start )) s"
else
    log "using cached wheel $WHEEL"
fi

# Reinstall only when the venv holds another build (marker = cache key of the installed wheel).
MARKER="$PREFIX/share/llmpipe/llama-cpp-python.key"
if [[ "$(cat "$MARKER" 2>/dev/null)" != "$KEY" ]] || ! "$PY" -c 'import llama_cpp' 2>/dev/null; then
    "$PY" -m pip install --quiet --no-deps --force-reinstall "$WHEEL"
    mkdir -p "$(dirname "$MARKER")"
    echo "$KEY" > "$MARKER"
else
    log "llama-cpp-python $VERSION (key $KEY) already installed"
fi
"$PY" -m pip install --quiet "${SERVER_DEPS[@]}" "${CONVERTER_DEPS[@]}"

# llama.cpp's converter from the same sdist (MIT, LICENSE copied beside it); not committed.
# It imports sentencepiece even for BPE tokenizers: pinned in requirements.txt.
if [[ ! -f "$CONVERTER_DIR/convert_hf_to_gguf.py" || ! -d "$CONVERTER_DIR/gguf-py" ]]; then
    log "extracting convert_hf_to_gguf.py into $CONVERTER_DIR"
    tmp=$(mktemp -d "$PREFIX/.llmpipe-convert.XXXXXX")
    base="llama_cpp_python-$VERSION/vendor/llama.cpp"
    tar -xzf "$SDIST" -C "$tmp" "$base/convert_hf_to_gguf.py" "$base/conversion" "$base/gguf-py" "$base/LICENSE"
    mkdir -p "$(dirname "$CONVERTER_DIR")"
    rm -rf "$CONVERTER_DIR"
    mv "$tmp/$base" "$CONVERTER_DIR"
    rm -rf "$tmp"
fi

"$PY" - <<PYEOF
import llama_cpp, sys
print(f"[install_llama_cpp] llama_cpp {llama_cpp.__version__} OK; converter: $CONVERTER_DIR", file=sys.stderr)
PYEOF
