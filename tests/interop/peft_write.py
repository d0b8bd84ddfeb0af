"""Writes a LoRA adapter with PEFT, as a transformers user trains one, for kollava to read:
a llava-hf model wrapped by `get_peft_model` (the language model's attention and MLP maps),
its adapter weights set to random values (a trained adapter's, not PEFT's zero start), saved
with `save_pretrained`.

    python peft_write.py BASE ADAPTER            # writes ADAPTER
    python peft_write.py BASE ADAPTER MERGED     # compares: kollava's merge of the two

With MERGED, prints one JSON object: the largest logit difference, on a fixed text prompt,
between PEFT's own merge (stored in the base's dtype, as kollava stores it) and MERGED, and
between PEFT's merge and the base (the adapter must matter). The caller decides what passes.
"""
import json
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlavaForConditionalGeneration

IDS = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]])


def load(path):
    return LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def main():
    base_dir, adapter_dir = sys.argv[1:3]
    if len(sys.argv) == 3:
        torch.manual_seed(0)
        config = LoraConfig(
            r=4, lora_alpha=8, lora_dropout=0.0,
            target_modules=r"model\.language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|v_proj|down_proj)",
        )
        model = get_peft_model(load(base_dir), config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn_like(p) * 0.3)
        model.save_pretrained(adapter_dir)
        print(json.dumps({"written": adapter_dir}))
        return
    merged_dir = sys.argv[3]
    stored = LlavaForConditionalGeneration.from_pretrained(base_dir).dtype
    base = load(base_dir)
    want_base = logits(base)
    theirs = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().to(stored).float()
    want = logits(theirs)
    print(
        json.dumps(
            {
                "merged": (logits(load(merged_dir)) - want).abs().max().item(),
                "vs_base": (want - want_base).abs().max().item(),
                "scale": want_base.abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
