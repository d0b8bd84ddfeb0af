#!/usr/bin/env python3
"""transformers (PyTorch CPU) on a llava-hf checkpoint, timed as `kollava bench` times itself.

Run by scripts/bench_peers.py (--hf-python) when a Python with torch and transformers is
given; prints one JSON line. Per run: vision = the tower and projector
(`get_image_features`), prefill = one forward of the prompt's embeddings with the image rows
spliced in at `<image>` (cache kept, last logits only), first token = vision + prefill,
decode = 63 greedy single-token steps after the first token (EOS ignored), as llama.cpp and
kollava count them. One untimed warm-up, then --repeat runs; medians. `--device cuda` runs it
on a GPU (each clock read after a synchronize); the figures then say nothing about RSS.
"""
import argparse
import json
import resource
import statistics
import time

import torch

PROMPT = "USER: <image>\nDescribe the image in detail. ASSISTANT:"


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    args = ap.parse_args()
    dev = torch.device(args.device)
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from PIL import Image
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaForConditionalGeneration

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype).eval().to(dev)
    tok = AutoTokenizer.from_pretrained(args.model)
    pixels = CLIPImageProcessor.from_pretrained(args.model)(
        images=Image.open(args.image).convert("RGB"), return_tensors="pt")["pixel_values"].to(dev, dtype)
    ids = tok(PROMPT, return_tensors="pt")["input_ids"][0].to(dev)
    at = (ids == model.config.image_token_index).nonzero()[0].item()
    embed = model.get_input_embeddings()

    def clock():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter()

    def once():
        with torch.inference_mode():
            t0 = clock()
            feats = model.get_image_features(pixel_values=pixels)
            # transformers 5 returns an output whose pooler_output holds one tensor per
            # image; older versions the tensor itself.
            feats = getattr(feats, "pooler_output", feats)
            if isinstance(feats, (list, tuple)):
                feats = torch.cat(list(feats))
            feats = feats.reshape(-1, feats.shape[-1]).to(dtype)
            t1 = clock()
            e = embed(ids)
            rows = torch.cat([e[:at], feats, e[at + 1:]]).unsqueeze(0)
            out = model(inputs_embeds=rows, use_cache=True, logits_to_keep=1)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = clock()
            cache = out.past_key_values
            for _ in range(args.gen_tokens - 1):
                out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            t3 = clock()
        return {"vision_ms": (t1 - t0) * 1e3, "prefill_ms": (t2 - t1) * 1e3,
                "decode_tokens_per_s": (args.gen_tokens - 1) / (t3 - t2),
                "prompt_tokens": rows.shape[1]}

    once()
    runs = [once() for _ in range(args.repeat)]
    m = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    m["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(m))


if __name__ == "__main__":
    main()
