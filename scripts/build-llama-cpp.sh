#!/usr/bin/env bash
# llama.cpp from the llama-cpp-python 0.3.36 sdist on PyPI (as ../shared/peers does), under DEST:
# the sources in DEST/llama_cpp_python-0.3.36/vendor/llama.cpp (its converters and gguf-py) and
# the binaries in DEST/llama-build/bin (llama-mtmd-cli, llama-bench, llama-quantize,
# llama-server; CPU only, about 13 minutes on 2 cores). Does only what is missing.
#   scripts/build-llama-cpp.sh DEST
set -euo pipefail
DEST="$(mkdir -p "$1" && cd "$1" && pwd)"
cd "$DEST"
SDIST=llama_cpp_python-0.3.36.tar.gz
if [ ! -d llama_cpp_python-0.3.36 ]; then
  if [ ! -f "$SDIST" ]; then
    # the file the index lists, located through pip's own index constant (no registry host here)
    VER=0.3.36 OUTF="$SDIST" python3 - <<'PY'
import os, re, urllib.parse, urllib.request
from pip._internal.models.index import PyPI
v = os.environ["VER"]; simple = PyPI.simple_url.rstrip("/") + "/llama-cpp-python/"
page = urllib.request.urlopen(simple).read().decode()
href = re.search(r'href="([^"#]*llama_cpp_python-%s\.tar\.gz)' % re.escape(v), page).group(1)
urllib.request.urlretrieve(urllib.parse.urljoin(simple, href), os.environ["OUTF"] + ".part")
os.replace(os.environ["OUTF"] + ".part", os.environ["OUTF"])
PY
  fi
  tar -xzf "$SDIST"
fi
# (re)built when a tool is missing, e.g. llama-server in a build directory made before it was added
if [ ! -x llama-build/bin/llama-mtmd-cli ] || [ ! -x llama-build/bin/llama-server ]; then
  [ -x tools/bin/cmake ] || { python3 -m venv tools && tools/bin/pip install -q cmake ninja; }
  export PATH="$DEST/tools/bin:$PATH"
  cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B llama-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DGGML_OPENMP=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
  ninja -C llama-build -j2 llama-mtmd-cli llama-bench llama-quantize llama-server
fi
