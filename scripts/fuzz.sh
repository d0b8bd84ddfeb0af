#!/usr/bin/env bash
# Fuzzes one parser that takes outside bytes with AFL++ for MINUTES minutes.
#
#   scripts/fuzz.sh TARGET MINUTES      # TARGET: image, openai_request, training_data,
#                                       # safetensors, gguf, torch_pickle, tokenizer_model
#   scripts/fuzz.sh all MINUTES         # each target in turn
#
# The targets are in fuzz/src/lib.rs, their seeds in fuzz/corpus/TARGET. Installs
# cargo-afl (which builds AFL++) through cargo the first time. The instrumented build goes
# to target/afl, each run's findings to target/fuzz/TARGET. Prints the executions, paths
# and any crashes or hangs; exits 1 if there were any. A crash, once fixed, goes into
# fuzz/regressions/TARGET, which `cargo test -p kollava-fuzz` replays.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ $# -ne 2 ] || ! [[ $2 =~ ^[0-9]+$ ]]; then
  sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
fi
target=$1
minutes=$2
targets="image openai_request training_data safetensors gguf torch_pickle tokenizer_model"
if [ "$target" = all ]; then
  rc=0
  for t in $targets; do "$0" "$t" "$minutes" || rc=1; done
  exit $rc
fi
if ! [[ " $targets " == *" $target "* ]]; then
  echo "unknown target $target (one of: $targets, all)" >&2
  exit 2
fi

if ! cargo afl --version >/dev/null 2>&1; then
  echo "installing cargo-afl (builds AFL++ once)" >&2
  cargo install cargo-afl --locked --version 0.18.2
  cargo afl config --build
fi
CARGO_TARGET_DIR=target/afl cargo afl build --release -p kollava-fuzz --features afl

work=target/fuzz/$target
rm -rf "$work"
mkdir -p "$work/in"
cp -L fuzz/corpus/"$target"/* "$work/in/"
if [ -d fuzz/regressions/"$target" ]; then
  cp -L fuzz/regressions/"$target"/* "$work/in/" 2>/dev/null || true
fi
# No UI, no CPU-governor or core-pattern checks (containers cannot change them). A run
# counts as hung after 20 s: a legitimate 100-megapixel picture takes seconds to fit.
export AFL_NO_UI=1 AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_AFFINITY=1
cargo afl fuzz -i "$work/in" -o "$work/out" -V $((minutes * 60)) -t 20000 -m none \
  -- target/afl/release/kollava-fuzz "$target" >"$work/afl.log" 2>&1 || {
    tail -20 "$work/afl.log" >&2
    exit 1
  }

stats=$work/out/default/fuzzer_stats
get() { awk -F: -v k="$1" '$1 ~ "^"k" *$" {gsub(/ /, "", $2); print $2}' "$stats"; }
crashes=$(get saved_crashes)
hangs=$(get saved_hangs)
echo "$target: $(get execs_done) executions in $(get run_time) s ($(get execs_per_sec)/s), $(get corpus_count) paths, $crashes crashes, $hangs hangs"
if [ "${crashes:-0}" != 0 ] || [ "${hangs:-0}" != 0 ]; then
  ls "$work"/out/default/crashes "$work"/out/default/hangs >&2
  exit 1
fi
