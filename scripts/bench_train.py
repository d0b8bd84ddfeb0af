#!/usr/bin/env python3
"""Training steps in kollava and in PyTorch + transformers (+ PEFT), interleaved, on the same
llava-hf checkpoint and data; see BENCHMARKS.md.

    python3 scripts/bench_train.py --torch-python PY --model DIR --data FILE --image-folder DIR

Per run and round: `kollava bench train --json` (its warm-up, then timed steps, medians) and
this script's own `--worker` under PY (torch, transformers, peft): `LlavaForConditionalGeneration`
with `torch.set_num_threads(THREADS)`, `requires_grad` only on what the run trains, AdamW,
clip-grad-norm 1.0, LLaVA's label masking (plain format for stage 1: the image and its
caption, only the caption labelled; llava_v1 for finetuning: LLaVA's preprocess_v1 masking);
forward + backward + clip + step, median after the warm-up steps. The batches are built
before the clock starts, on both sides' own tokenizer and image processor. Each side reports
its tokens per step, so the work compared is visible. Prints a Markdown table; --out JSON.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the human's questions.")


def kollava(args, run):
    cmd = [args.kollava, "bench", "train", "--model", args.model, "--data", run["data"],
           "--image-folder", args.image_folder, "--per-device-batch-size", str(args.batch),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads",
           str(args.threads), "--json", *run["kollava"]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def torch_side(args, run):
    cmd = [args.torch_python, os.path.abspath(__file__), "--worker", "--model", args.model,
           "--data", run["data"], "--image-folder", args.image_folder, "--batch",
           str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads), "--run", run["name"]]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def worker(args):
    """One PyTorch measurement; prints one JSON line."""
    import resource

    import torch
    from PIL import Image
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    bf16 = args.run.endswith("-bf16")
    kind = args.run.removesuffix("-bf16")
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.model)
    proc = AutoImageProcessor.from_pretrained(args.model)
    cfg = model.config
    n_image = (cfg.vision_config.image_size // cfg.vision_config.patch_size) ** 2
    for p in model.parameters():
        p.requires_grad_(False)
    if kind == "pretrain":
        for p in model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    elif kind == "finetune":
        # The language model with its output head (transformers 5 keeps `lm_head` beside
        # `model.language_model`), as LLaVA's full finetuning trains it.
        for p in model.model.language_model.parameters():
            p.requires_grad_(True)
        for p in model.lm_head.parameters():
            p.requires_grad_(True)
        for p in model.model.multi_modal_projector.parameters():
            p.requires_grad_(True)
    elif kind == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            exclude_modules=r".*vision_tower.*")
        model = get_peft_model(model, lcfg)
        for n, p in model.named_parameters():
            if "multi_modal_projector" in n:
                p.requires_grad_(True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)

    with open(args.data) as f:
        records = json.load(f)
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def sample(rec):
        conv = rec["conversations"]
        image_ids = [cfg.image_token_id] * n_image
        if kind == "pretrain":
            # LLaVA's plain format: the image, then the caption and "\n"; only the caption
            # is labelled.
            cap = ids(conv[1]["value"] + "\n")
            return bos + image_ids + cap, [-100] * (len(bos) + n_image) + cap
        return v1_sample(conv)

    # LLaVA subtracts one token per later round for tokenizers that give text after a
    # special token no dummy prefix (slow sentencepiece ones with legacy=False). The
    # tokenizer.json backend transformers 5 loads gives it one ("</s>USER" -> "▁US"), i.e.
    # behaves as legacy, and has no `legacy` attribute.
    legacy = getattr(tok, "legacy", None) is not False

    def toks(text):
        # tokenizer(text).input_ids, the one <image> token standing for the image's features.
        out = []
        for i in tok(text)["input_ids"]:
            out += [cfg.image_token_id] * n_image if i == cfg.image_token_id else [i]
        return out

    def v1_sample(conv):
        # LLaVA's conv_vicuna_v1 prompt (system, " ", then "USER: q ASSISTANT: a</s>" per
        # exchange) and preprocess_v1's masking: rounds split on "</s>", each round's
        # instruction measured with its own BOS (hence the -2), one token less per round
        # after the first for non-legacy tokenizers; a count that disagrees with the
        # sequence masks the whole sample, as LLaVA does.
        text = SYSTEM + " "
        for i, turn in enumerate(conv):
            role, end = ("USER", " ") if i % 2 == 0 else ("ASSISTANT", "</s>")
            text += role + ": " + turn["value"] + end
        seq = toks(text)
        lab = list(seq)
        cur = 1
        lab[0] = -100
        for i, rou in enumerate(text.split("</s>")):
            if rou == "":
                break
            parts = rou.split(" ASSISTANT: ")
            if len(parts) != 2:
                break
            round_len = len(toks(rou))
            inst_len = len(toks(parts[0] + " ASSISTANT: ")) - 2
            if i != 0 and not legacy:
                round_len -= 1
                inst_len -= 1
            for j in range(cur, min(cur + inst_len, len(lab))):
                lab[j] = -100
            cur += round_len
        for j in range(cur, len(lab)):
            lab[j] = -100
        if cur != sum(1 for t in seq if t != tok.unk_token_id):
            lab = [-100] * len(lab)
        return seq, lab

    batches = []
    for s in range(args.warmup + args.steps):
        recs = [records[(s * args.batch + i) % len(records)] for i in range(args.batch)]
        pairs = [sample(r) for r in recs]
        longest = max(len(p[0]) for p in pairs)
        input_ids = torch.tensor([p[0] + [0] * (longest - len(p[0])) for p in pairs])
        labels = torch.tensor([p[1] + [-100] * (longest - len(p[1])) for p in pairs])
        mask = torch.tensor([[1] * len(p[0]) + [0] * (longest - len(p[0])) for p in pairs])
        images = [Image.open(os.path.join(args.image_folder, r["image"])).convert("RGB")
                  for r in recs]
        pixels = proc(images=images, return_tensors="pt")["pixel_values"]
        batches.append((input_ids, labels, mask, pixels, sum(len(p[0]) for p in pairs)))

    times = []
    tokens = []
    losses = []
    model.train()
    for s, (input_ids, labels, mask, pixels, n_tokens) in enumerate(batches):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(input_ids=input_ids, attention_mask=mask, pixel_values=pixels,
                        labels=labels)
        losses.append(out.loss.item())
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= args.warmup:
            times.append(time.perf_counter() - start)
            tokens.append(n_tokens)
    step = statistics.median(times)
    print(json.dumps({
        "step_s": step,
        "samples_per_s": args.batch / step,
        "tokens_per_s": statistics.median(tokens) / step,
        "tokens_per_step": statistics.median(tokens),
        "trained_parameters": sum(p.numel() for p in params),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "first_loss": losses[0],
        "torch": torch.__version__,
    }))


RUNS = {
    "pretrain": {"data": "pretrain.json", "kollava": ["--stage", "pretrain"]},
    "finetune": {"data": "finetune.json", "kollava": ["--stage", "finetune", "--version",
                                                      "llava_v1"]},
    "lora": {"data": "finetune.json", "kollava": ["--stage", "finetune", "--version",
                                                  "llava_v1", "--lora-r", "8"]},
}
# bf16: kollava's --bf16 (frozen matrices in bf16), PyTorch's CPU autocast to bfloat16.
RUNS.update({f"{k}-bf16": dict(v, kollava=v["kollava"] + ["--bf16"]) for k, v in list(RUNS.items())})


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--run", default="pretrain", help=argparse.SUPPRESS)
    ap.add_argument("--kollava", default="target/release/kollava")
    ap.add_argument("--torch-python", default=os.environ.get("KOLLAVA_INTEROP_PYTHON"))
    ap.add_argument("--model", default="target/peers/bench-train")
    ap.add_argument("--data", default="target/peers/synth-train",
                    help="a `kollava data synth` folder (pretrain.json, finetune.json)")
    ap.add_argument("--image-folder", default=None)
    ap.add_argument("--runs", default="pretrain,finetune,lora",
                    help="comma-separated: pretrain, finetune, lora, each also with -bf16")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not args.torch_python:
        sys.exit("give --torch-python (a Python with torch, transformers and peft), or set "
                 "KOLLAVA_INTEROP_PYTHON as scripts/test.sh does")
    if args.image_folder is None:
        args.image_folder = os.path.join(args.data, "images")
    results = {}
    for name in args.runs.split(","):
        run = dict(RUNS[name], name=name)
        run["data"] = os.path.join(args.data, run["data"])
        for r in range(args.rounds):
            # Alternate which side goes first, so that drift does not favour one.
            order = [("kollava", kollava), ("pytorch", torch_side)]
            if r % 2:
                order.reverse()
            for side, fn in order:
                res = fn(args, run)
                results.setdefault(name, {}).setdefault(side, []).append(res)
                print(f"{name} round {r + 1} {side}: {res['samples_per_s']:.3f} samples/s, "
                      f"{res['tokens_per_step']:.0f} tokens/step, "
                      f"{res['peak_rss_mib']:.0f} MiB", file=sys.stderr)
    print("| run | kollava samples/s | PyTorch samples/s | ratio | tokens/step (k / pt) "
          "| peak RSS MiB (k / pt) |")
    print("|---|---|---|---|---|---|")
    for name, sides in results.items():
        k = statistics.median(x["samples_per_s"] for x in sides["kollava"])
        p = statistics.median(x["samples_per_s"] for x in sides["pytorch"])
        kt = statistics.median(x["tokens_per_step"] for x in sides["kollava"])
        pt = statistics.median(x["tokens_per_step"] for x in sides["pytorch"])
        km = max(x["peak_rss_mib"] for x in sides["kollava"])
        pm = max(x["peak_rss_mib"] for x in sides["pytorch"])
        print(f"| {name} | {k:.3f} | {p:.3f} | {k / p:.2f}x | {kt:.0f} / {pt:.0f} "
              f"| {km:.0f} / {pm:.0f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
