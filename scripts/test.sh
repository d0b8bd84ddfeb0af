#!/usr/bin/env bash
# Runs every check CI runs: formatting, lints, and the whole test suite (offline, CPU-only).
# Needs a Rust toolchain (cargo, rustfmt, clippy), a C compiler (libjpeg-turbo is built
# from source by mozjpeg-sys), Python 3 and Node.js; installs what else the tests use
# (rustfmt/clippy, the `openai` package in target/client-venv, Chromium, playwright-core
# in target/client-node; under ~/.cache/kollava torch + transformers + PEFT, LLaVA's package,
# and llama.cpp built from its PyPI sdist) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if command -v rustup >/dev/null 2>&1; then
  rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt
  rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy
fi
if ! command -v cc >/dev/null 2>&1; then
  echo "installing a C compiler (needed to build libjpeg-turbo)" >&2
  apt-get update -qq && apt-get install -y -qq gcc >/dev/null
fi

# A one-off build gains nothing from incremental caches, which would double the disk used.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# The client tests drive `kollava serve` with the official `openai` Python package.
echo "== client test tools"
if [ ! -x target/client-venv/bin/python ]; then
  python3 -m venv target/client-venv
fi
# numpy: scripts/safetensors_to_pth.py, which writes the pickled checkpoint a test loads;
# jsonschema: validates the structured answers the client gets.
target/client-venv/bin/pip install -q --disable-pip-version-check "openai==3.57.0" "numpy==2.4.6" "jsonschema==4.26.0"
# ... and the chat page in headless Chromium through Playwright.
if [ ! -x /usr/bin/chromium ]; then
  echo "installing Chromium (for the chat page test)" >&2
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if [ ! -f target/client-node/node_modules/playwright-core/index.mjs ]; then
  npm install -s --no-fund --no-audit --prefix target/client-node playwright-core@1.64.1
fi
export KOLLAVA_REQUIRE_CLIENT_TESTS=1

# The interop tests load what kollava writes in the real consumers. Each Python stack is a venv
# kept by version under ~/.cache/kollava and built once per machine.
cache="${KOLLAVA_CACHE:-$HOME/.cache/kollava}"
mkdir -p "$cache"
# venv_once DIR IMPORTS PIP-ARGS...: (re)builds DIR when `import IMPORTS` fails there.
venv_once() {
  local dir="$1" imports="$2"
  shift 2
  "$dir/bin/python" -c "import $imports" 2>/dev/null && return
  echo "installing $* into $dir (once)" >&2
  rm -rf "$dir"
  python3 -m venv "$dir"
  "$dir/bin/python" -m pip install -q --disable-pip-version-check "$@"
}
echo "== interop test tools"
# The two venvs download about 10 GB the first time: they install in the background while
# llama.cpp and the workspace build, and the tests wait for them.
# transformers 5.x and PEFT (PyPI's torch wheels need CUDA's libraries to import, even on a CPU).
interop="$cache/interop-torch2.15.0-transformers5.24.0-peft0.21.2"
venv_once "$interop" "torch, transformers, peft, safetensors, PIL" "torch==2.15.0" \
  "transformers==5.24.0" "peft==0.21.2" "safetensors==0.8.0" "pillow==13.0.0" "numpy==2.4.6" \
  "sentencepiece==0.2.3" "protobuf==7.36.2" >"$cache/interop-install.log" 2>&1 &
interop_job=$!
# LLaVA's own package with the versions it pins, for what LLaVA's code loads; its other pins
# (gradio, bitsandbytes, deepspeed...) serve its web UI and training only.
llava="$cache/llava-torch1.2.2.post1"
mosaic="$cache/llava-torch1.1.1-mpt"
(
  venv_once "$llava" "torch, transformers, peft" "torch==2.0.1" "transformers==4.36.2" \
    "tokenizers==0.15.0" "sentencepiece==0.1.99" "accelerate==0.21.0" "peft==0.4.0" \
    "numpy==1.26.4" "einops==0.6.1" "einops-exts==0.0.4" "timm==0.6.13" "shortuuid==1.0.13" \
    "safetensors==0.4.5" "protobuf==4.25.3" "pillow==13.0.0"
  "$llava/bin/python" -c 'import llava.model.builder' 2>/dev/null ||
    "$llava/bin/python" -m pip install -q --disable-pip-version-check --no-deps "llava-torch==1.2.2.post1"
  # MosaicML's MPT code as LLaVA shipped it for LLaVA-MPT (llava-torch 1.1.1), the one
  # reference that applies attn_config.qk_ln; run with the venv above.
  if [ ! -f "$mosaic/mosaic_mpt/modeling_mpt.py" ]; then
    rm -rf "$mosaic" && mkdir -p "$mosaic/wheel"
    "$llava/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
      "llava-torch==1.1.1" -d "$mosaic/wheel"
    "$llava/bin/python" - "$mosaic" <<'PY'
import glob, shutil, sys, zipfile
root = sys.argv[1]
with zipfile.ZipFile(glob.glob(f"{root}/wheel/*.whl")[0]) as z:
    prefix = "llava/model/language_model/mpt/"
    z.extractall(f"{root}/wheel", [n for n in z.namelist() if n.startswith(prefix)])
shutil.move(f"{root}/wheel/{prefix}", f"{root}/mosaic_mpt")
PY
  fi
) >"$cache/llava-install.log" 2>&1 &
llava_job=$!
export KOLLAVA_INTEROP_PYTHON="$interop/bin/python" KOLLAVA_LLAVA_PYTHON="$llava/bin/python"
export KOLLAVA_MOSAIC_MPT="$mosaic"
export KOLLAVA_REQUIRE_INTEROP_TESTS=1
# llama.cpp, for what it answers on the GGUF files kollava writes (built once, ~13 minutes).
llama_cpp="$cache/llama.cpp-0.3.36"
scripts/build-llama-cpp.sh "$llama_cpp"
export KOLLAVA_LLAMA_BIN="$llama_cpp/llama-build/bin"
export KOLLAVA_LLAMA_SRC="$llama_cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
for job in "$interop_job:interop" "$llava_job:llava"; do
  wait "${job%%:*}" || { cat "$cache/${job##*:}-install.log" >&2; echo "installing the ${job##*:} venv failed" >&2; exit 1; }
done
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test --workspace --locked 2>&1 | tee "$log"
# One closing line for the whole workspace (cargo's last line is often a doc-test crate
# with 0 tests, which reads as if nothing ran).
passed=$(grep -Eo '^test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | awk '{s += $4} END {print s + 0}')
failed=$(grep -Eo '; [0-9]+ failed' "$log" | awk '{s += $2} END {print s + 0}')
echo "tests: ${passed} passed, ${failed} failed"
