#!/usr/bin/env bash
# Builds llama.cpp's llama-bench, llama-batched-bench, llama-server and llama-quantize: the peer of
# `make bench-infer` and `make bench-serve`. The source is the copy vendored in the llama-cpp-python sdist on PyPI (pinned, SHA-256
# checked), cmake comes from PyPI too; nothing else is fetched. The build is cached under
# $MODE_HOME/peer/llama.cpp-<version> (MODE_HOME defaults to ~/.cache/mode); a second run only prints the
# path. Prints the folder holding the three binaries on its last line.
#
#   bench/peer/build_llama_cpp.sh            # about 15 minutes on 2 free cores the first time
#
# Built for this CPU (GGML_NATIVE), CPU only, without curl, without AMX tiles (on the Xeon VMs this runs
# on, the CPU reports AMX but its first tile instruction faults: llama-server and llama-bench die with
# SIGSEGV in ggml_backend_amx_mul_mat); llama.cpp's defaults otherwise. The flags are stamped beside the
# binaries, and a build made with other flags is rebuilt.
set -euo pipefail
VERSION=0.3.36
SHA256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
CMAKE_VERSION=3.31.6
MODE_HOME="${MODE_HOME:-$HOME/.cache/mode}"
DEST="$MODE_HOME/peer/llama.cpp-$VERSION"
TOOLS=(llama-bench llama-batched-bench llama-server llama-quantize)
# The source and the build folder are kept beside the binaries, so that a tool added later
# builds incrementally.
BUILD="$DEST-build"

# With GGML_NATIVE, ggml's own GGML_AMX_* switches are ignored: AMX goes off through the compiler
# (an explicit -mno-* wins over -march=native whatever the order; harmless on CPUs without AMX).
NO_AMX="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON "-DCMAKE_C_FLAGS=$NO_AMX" "-DCMAKE_CXX_FLAGS=$NO_AMX"
    -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF)
STAMP="$DEST/bin/.cmake-flags"

have_all() {
    [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "${FLAGS[*]}" ] || return 1
    for t in "${TOOLS[@]}"; do [ -x "$DEST/bin/$t" ] || return 1; done
}
if have_all; then
    echo "$DEST/bin"
    exit 0
fi

mkdir -p "$BUILD"
src="$BUILD/llama_cpp_python-$VERSION/vendor/llama.cpp"
if [ ! -f "$src/CMakeLists.txt" ]; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "build_llama_cpp: fetching llama-cpp-python $VERSION (sdist) from PyPI" >&2
    python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python --dest "$work" \
        "llama-cpp-python==$VERSION" >&2
    sdist="$work/llama_cpp_python-$VERSION.tar.gz"
    got=$(sha256sum "$sdist" | cut -d' ' -f1)
    if [ "$got" != "$SHA256" ]; then
        echo "build_llama_cpp: $sdist has SHA-256 $got, expected $SHA256; refusing to build it" >&2
        exit 1
    fi
    tar -xzf "$sdist" -C "$BUILD"
fi

cmake_venv="$MODE_HOME/venvs/cmake-$CMAKE_VERSION"
if [ ! -x "$cmake_venv/bin/cmake" ]; then
    echo "build_llama_cpp: installing cmake $CMAKE_VERSION from PyPI into $cmake_venv" >&2
    python3 -m venv "$cmake_venv"
    "$cmake_venv/bin/pip" install --quiet "cmake==$CMAKE_VERSION" >&2
fi
cmake="$cmake_venv/bin/cmake"

echo "build_llama_cpp: building ${TOOLS[*]} (this takes a while)" >&2
"$cmake" -S "$src" -B "$BUILD/out" "${FLAGS[@]}" >&2
"$cmake" --build "$BUILD/out" --config Release -j "$(nproc)" --target "${TOOLS[@]}" >&2

mkdir -p "$DEST/bin"
for t in "${TOOLS[@]}"; do cp "$BUILD/out/bin/$t" "$DEST/bin/$t.tmp" && mv "$DEST/bin/$t.tmp" "$DEST/bin/$t"; done
echo "${FLAGS[*]}" > "$STAMP"
echo "$DEST/bin"
