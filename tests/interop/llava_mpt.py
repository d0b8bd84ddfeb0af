"""Loads LLaVA-MPT checkpoints through LLaVA's own code (the `llava-torch` package, whose
`LlavaMptForCausalLM` is transformers' `MptForCausalLM` under LLaVA's multimodal glue) and
puts kollava's LoRA adapter on one with PEFT, as a user would, and reports what it got.

    python llava_mpt.py BASE LORA MERGED STAGE1 IDS

BASE: a LLaVA-MPT checkpoint; LORA: a kollava LoRA run on it (adapter, config,
`non_lora_trainables.bin`); MERGED: kollava's `merge-lora` of the two; STAGE1: a kollava
stage-1 run on BASE (`mm_projector.bin`); IDS: token ids as JSON. Run it from a directory where
the configs' `mm_vision_tower` resolves. Prints one JSON object: the base's last-position
logits on IDS (text only: LLaVA 1.2's MPT `forward` cannot run, so transformers' is called),
what PEFT did with the adapter (`unexpected`, `missing`, `wrapped`), the largest logit
differences of the adapted model from the base and of kollava's merge from PEFT's, and which
keys of the two pickles the model has no parameter for. The caller decides what passes.
"""
import json
import sys

import torch
import transformers
from llava.model.builder import load_pretrained_model
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file


def load(path):
    # The builder picks the MPT class by "mpt" in the name.
    _, model, _, _ = load_pretrained_model(path, None, "llava-mpt", device="cpu")
    return model.float().eval()


def logits(model, ids):
    with torch.no_grad():
        return transformers.MptForCausalLM.forward(model, input_ids=ids).logits.float()


def main():
    base_dir, lora_dir, merged_dir, stage1_dir, ids = sys.argv[1:6]
    ids = torch.tensor([json.loads(ids)])
    base = load(base_dir)
    want_base = logits(base, ids)
    params = set(base.state_dict())
    pickles = {
        "non_lora": [
            k.removeprefix("base_model.").removeprefix("model.")
            for k in torch.load(f"{lora_dir}/non_lora_trainables.bin")
        ],
        "stage1": list(torch.load(f"{stage1_dir}/mm_projector.bin")),
    }
    peft_model = get_peft_model(base, LoraConfig.from_pretrained(lora_dir))
    wrapped = sorted(n for n, m in peft_model.named_modules() if hasattr(m, "lora_A"))
    result = set_peft_model_state_dict(
        peft_model, load_file(f"{lora_dir}/adapter_model.safetensors")
    )
    unexpected = getattr(result, "unexpected_keys", [])
    missing = [k for k in getattr(result, "missing_keys", []) if "lora_" in k]
    adapted = logits(peft_model.base_model.model, ids)
    theirs = peft_model.merge_and_unload().half().float()
    ours = load(merged_dir)
    print(
        json.dumps(
            {
                "base_last": want_base[0, -1].tolist(),
                "unexpected": list(unexpected),
                "missing": missing,
                "wrapped": wrapped,
                "vs_base": (adapted - want_base).abs().max().item(),
                "merged": (logits(ours, ids) - logits(theirs, ids)).abs().max().item(),
                "scale": want_base.abs().max().item(),
                "unplaced": {k: [n for n in v if n not in params] for k, v in pickles.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
