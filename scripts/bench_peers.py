#!/usr/bin/env python3
"""kollava against llama.cpp (and transformers) on the same files, interleaved, 2 threads.

Run by scripts/bench-peers.sh after it has built llama.cpp and written the models; see
BENCHMARKS.md. Standard library only. Prints a Markdown table and writes --out JSON.

Per configuration and round: `kollava bench --json` (its own warm-up and --repeat runs,
medians) and --repeat runs of `llama-mtmd-cli` (medians), on the same image and prompt.
llama.cpp figures are parsed from its log: "mtmd batch encoding done in X ms" (vision),
"image decoded (batch 1/1) in X ms" (prefill of the image rows), llama_perf's "eval time"
(decode: 63 steps for 64 tokens, as kollava counts them). With --hf-python (a Python that
has torch and transformers), transformers in bf16 runs the BF16 configuration too
(scripts/bench_hf.py, the same phases and medians).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

PROMPT = "Describe the image in detail."


def kollava(args, model, extra):
    cmd = [args.kollava, "bench", "--model", model, "--image", args.image, "--threads",
           str(args.threads), "--repeat", str(args.repeat), "--gen-tokens", "64", "--json", *extra]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {
        "vision_ms": r["vision_ms"] + r["preprocess_ms"],
        "prefill_ms": r["prefill_ms"],
        "prefill_tok_s": r["prefill_tokens_per_s"],
        "ttft_ms": r["time_to_first_token_ms"],
        "decode_tok_s": r["decode_tokens_per_s"],
        "peak_rss_mib": r["peak_rss_mib"],
        "prompt_tokens": r["prompt_tokens"],
    }


# Models llama.cpp crashed on while repacking their weights (seen with Q4_K_M on an AMX CPU:
# a segfault in the warm-up), run with --no-repack from then on.
NO_REPACK = set()


def llama(args, model, mmproj, template="vicuna", image_rows=576):
    runs = []
    while len(runs) < args.repeat:
        cmd = ["/usr/bin/time", "-v", os.path.join(args.llama_bin, "llama-mtmd-cli"), "-m", model,
               "--mmproj", mmproj, "--image", args.image, "-p", PROMPT, "--chat-template", template,
               "-n", "64", "--ignore-eos", "--temp", "0", "-t", str(args.threads), "-c", "2048",
               "--perf", "-lv", "4"] + (["--no-repack"] if model in NO_REPACK else [])
        p = subprocess.run(cmd, capture_output=True, text=True)
        log = p.stdout + p.stderr
        if p.returncode != 0 and "terminated by signal 11" in log and model not in NO_REPACK:
            print(f"[note] llama.cpp crashed on {os.path.basename(model)}; again with --no-repack",
                  file=sys.stderr, flush=True)
            NO_REPACK.add(model)
            continue
        if p.returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)}\n{log[-2000:]}")

        def num(pattern):
            m = re.search(pattern, log)
            if not m:
                sys.exit(f"no match for {pattern!r} in llama.cpp's log")
            return float(m.group(1))

        enc = num(r"mtmd batch encoding done in ([\d.]+) ms")
        pre = num(r"image decoded \(batch 1/1\) in ([\d.]+) ms")
        eval_ms = num(r"eval time =\s+([\d.]+) ms /\s+\d+ runs")
        steps = num(r"eval time =\s+[\d.]+ ms /\s+(\d+) runs")
        prompt = num(r"prompt eval time =\s+[\d.]+ ms /\s+(\d+) tokens")
        rss = num(r"Maximum resident set size \(kbytes\): (\d+)") / 1024
        runs.append({"vision_ms": enc, "prefill_ms": pre, "prefill_tok_s": image_rows / (pre / 1e3),
                     "ttft_ms": enc + pre, "decode_tok_s": steps / (eval_ms / 1e3),
                     "peak_rss_mib": rss, "prompt_tokens": prompt})
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def llama_text(args, model, prompt_tokens):
    """llama-bench on the language model alone, for models whose image encoder llama.cpp
    cannot load (LLaVA-MPT's linear projector): prompt processing of as many tokens as
    kollava's prompt (image rows included) and 64 generated tokens after that many. Vision,
    first token and RSS have no counterpart (reported as nan)."""
    cmd = [os.path.join(args.llama_bin, "llama-bench"), "-m", model, "-t", str(args.threads),
           "-r", str(args.repeat), "-o", "json", "-p", str(prompt_tokens), "-n", "0"]
    pp = subprocess.run(cmd, capture_output=True, text=True)
    tg = subprocess.run(cmd[:-4] + ["-p", "0", "-n", "64", "-d", str(prompt_tokens)],
                        capture_output=True, text=True)
    if pp.returncode != 0 or tg.returncode != 0:
        sys.exit(f"failed: llama-bench\n{pp.stderr[-1000:]}{tg.stderr[-1000:]}")
    pp_ts, tg_ts = json.loads(pp.stdout)[0]["avg_ts"], json.loads(tg.stdout)[0]["avg_ts"]
    nan = float("nan")
    return {"vision_ms": nan, "prefill_ms": prompt_tokens / pp_ts * 1e3, "prefill_tok_s": pp_ts,
            "ttft_ms": nan, "decode_tok_s": tg_ts, "peak_rss_mib": nan,
            "prompt_tokens": prompt_tokens}


def transformers(args, model):
    cmd = [args.hf_python, os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_hf.py"),
           "--model", model, "--image", args.image, "--threads", str(args.threads),
           "--repeat", str(args.repeat), "--dtype", "bf16"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    return {"vision_ms": r["vision_ms"], "prefill_ms": r["prefill_ms"],
            "prefill_tok_s": r["prompt_tokens"] / (r["prefill_ms"] / 1e3),
            "ttft_ms": r["vision_ms"] + r["prefill_ms"], "decode_tok_s": r["decode_tokens_per_s"],
            "peak_rss_mib": r["peak_rss_mib"], "prompt_tokens": r["prompt_tokens"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kollava", default="target/release/kollava")
    ap.add_argument("--llama-bin", required=True, help="llama.cpp build/bin")
    ap.add_argument("--work", required=True, help="directory with the models bench-peers.sh wrote")
    ap.add_argument("--image", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", default="bench-peers.json")
    ap.add_argument("--only", help="run just these configurations (comma-separated labels)")
    ap.add_argument("--hf-python", help="a Python with torch + transformers: adds transformers bf16 to BF16")
    args = ap.parse_args()
    w = args.work
    # (label, kollava model + flags, llama.cpp model + mmproj or None)
    configs = [
        ("BF16", (os.path.join(w, "bench-1b"), ["--dtype", "bf16"]),
         (os.path.join(w, "gguf-bf16/bench-1b-BF16.gguf"), os.path.join(w, "gguf-bf16/mmproj-bench-1b-F16.gguf"))),
        # The F16 file computed in bf16 (weights rounded at load), against llama.cpp's F16;
        # then, for reference, the exact f16 weights with f32 compute (kollava alone).
        ("F16", (os.path.join(w, "gguf-f16"), ["--dtype", "bf16"]),
         (os.path.join(w, "gguf-f16/bench-1b-F16.gguf"), os.path.join(w, "gguf-f16/mmproj-bench-1b-F16.gguf"))),
        ("F16 --dtype f32", (os.path.join(w, "gguf-f16"), ["--dtype", "f32"]), None),
        ("Q4_K_M", (os.path.join(w, "gguf-q4km"), []),
         (os.path.join(w, "gguf-q4km/bench-1b-Q4_K_M.gguf"), os.path.join(w, "gguf-q4km/mmproj-bench-1b-F16.gguf"))),
        # LLaVA-MPT (bench-mpt-1b: ALiBi, fused Wqkv, GELU MLP), the Q4_K pair `kollava
        # quantize` writes. llama.cpp has no projector type for LLaVA-MPT's linear one, so its
        # side is llama-bench on the language model (prefill and decode only).
        ("MPT Q4_K", (os.path.join(w, "gguf-mpt-q4k"), []),
         {"text_only": os.path.join(w, "gguf-mpt-q4k/bench-mpt-1b-f16-Q4_K.gguf")}),
    ]
    if args.only:
        configs = [c for c in configs if c[0] in args.only.split(",")]
    # Per configuration, the peers that run its files: name → () → figures.
    peers = {}
    results = {}
    for label, _, theirs in configs:
        if isinstance(theirs, dict):
            # As many prompt tokens as kollava's run of this round had.
            peers[label] = {"llama.cpp": (lambda m=theirs["text_only"], l=label: llama_text(
                args, m, int(results[l]["kollava"][-1]["prompt_tokens"])))}
        else:
            peers[label] = {"llama.cpp": (lambda t=theirs: llama(args, *t))} if theirs else {}
    if args.hf_python and "BF16" in peers:
        peers["BF16"]["transformers"] = lambda: transformers(args, os.path.join(w, "bench-1b"))
    results.update({c[0]: {"kollava": [], **{p: [] for p in peers[c[0]]}} for c in configs})
    for rnd in range(args.rounds):
        for label, ours, _ in configs:
            print(f"[round {rnd + 1}] kollava {label}", file=sys.stderr, flush=True)
            results[label]["kollava"].append(kollava(args, *ours))
            for name, run in peers[label].items():
                print(f"[round {rnd + 1}] {name} {label}", file=sys.stderr, flush=True)
                results[label][name].append(run())
    summary = {}
    for label, r in results.items():
        summary[label] = {who: {k: statistics.median(x[k] for x in runs) for k in runs[0]}
                          for who, runs in r.items() if runs}
    with open(args.out, "w") as f:
        json.dump({"raw": results, "median": summary, "threads": args.threads,
                   "repeat": args.repeat, "rounds": args.rounds,
                   "llama_no_repack": sorted(os.path.basename(m) for m in NO_REPACK)}, f, indent=1)
    print("| weights | runtime | vision ms | prefill ms (tok/s) | first token ms | decode tok/s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for label, s in summary.items():
        for who, m in s.items():
            print(f"| {label} | {who} | {m['vision_ms']:.0f} | {m['prefill_ms']:.0f} ({m['prefill_tok_s']:.0f}) | "
                  f"{m['ttft_ms']:.0f} | {m['decode_tok_s']:.2f} | {m['peak_rss_mib']:.0f} |")
        k = s["kollava"]
        for who, l in s.items():
            if who == "kollava":
                continue
            print(f"| {label} | **ratio kollava/{who}** | {k['vision_ms'] / l['vision_ms']:.2f}x time | "
                  f"{k['prefill_ms'] / l['prefill_ms']:.2f}x time | {k['ttft_ms'] / l['ttft_ms']:.2f}x time | "
                  f"**{k['decode_tok_s'] / l['decode_tok_s']:.2f}x speed** | {k['peak_rss_mib'] / l['peak_rss_mib']:.2f}x |")


if __name__ == "__main__":
    main()
