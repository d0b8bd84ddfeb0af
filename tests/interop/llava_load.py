"""Loads what kollava trained through LLaVA's own code (the `llava-torch` package's
`load_pretrained_model`, with its pinned transformers and PEFT), as LLaVA's CLI and workers
do, and reports what it got.

    python llava_load.py BASE STAGE1 LORA MERGED

BASE: the checkpoint trained on; STAGE1: a `kollava train` stage-1 output (`mm_projector.bin`
+ config, loaded on BASE); LORA: a LoRA run's output (adapter + `non_lora_trainables.bin`,
loaded on BASE and merged by LLaVA and PEFT); MERGED: kollava's `merge-lora` of LORA (loaded
alone). Run it from a directory where the configs' `mm_vision_tower` resolves. Prints one
JSON object: how far stage 1's projector in LLaVA's model is from the file's (and from the
base's), and the largest logit differences of the LoRA model from the merged one and from the
base on a fixed prompt with an image. The caller decides what passes.
"""
import json
import sys

import torch
from llava.model.builder import load_pretrained_model


def load(path, base, name):
    _, model, _, _ = load_pretrained_model(path, base, name, device="cpu")
    model = model.float().eval()
    model.get_vision_tower().to(torch.float32)
    return model


def projector(model):
    return {k: v.float() for k, v in model.get_model().mm_projector.state_dict().items()}


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def main():
    base_dir, stage1_dir, lora_dir, merged_dir = sys.argv[1:5]
    torch.manual_seed(0)
    ids = torch.tensor([[1, 319, 13563, 3148, 1001, 29901, 29871, -200, 29871, 13, 1724, 338, 445, 29973]])
    image = torch.randn(1, 3, 42, 42)

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids, images=image).logits.float()

    base = load(base_dir, None, "llava-base")
    stage1 = load(stage1_dir, base_dir, "llava-stage1")
    want = {
        k.split("mm_projector.")[1]: v.half().float()
        for k, v in torch.load(f"{stage1_dir}/mm_projector.bin").items()
    }
    lora = load(lora_dir, base_dir, "llava-lora")
    merged = load(merged_dir, None, "llava-merged")
    b, l, m = logits(base), logits(lora), logits(merged)
    print(
        json.dumps(
            {
                "stage1_projector_vs_file": max_diff(projector(stage1), want),
                "stage1_projector_vs_base": max_diff(projector(stage1), projector(base)),
                "lora_vs_merged": (l - m).abs().max().item(),
                "lora_vs_base": (l - b).abs().max().item(),
                "scale": b.abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
