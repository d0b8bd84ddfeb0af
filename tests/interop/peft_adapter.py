"""Loads a LoRA adapter kollava wrote into PEFT on top of its base model, as a user would, and
reports what PEFT did with it.

    python peft_adapter.py BASE ADAPTER MERGED

BASE: the checkpoint the adapter was trained on (a llava-hf repo, loaded by transformers'
`LlavaForConditionalGeneration`); ADAPTER: kollava's adapter directory; MERGED: kollava's
`merge-lora` of the two. Prints one JSON object: the adapter keys PEFT did not place
(`unexpected`), the adapted modules it found no weights for (`missing`), the modules PEFT
wrapped, and the largest logit differences on a fixed text prompt: the base with the adapter
(PEFT) against the base alone (`vs_base`), and kollava's merged checkpoint against PEFT's own
merge (`merge_and_unload`) stored in the base's dtype as kollava stores it (`merged`). The
caller decides what passes.
"""
import json
import sys

import torch
from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import LlavaForConditionalGeneration


def load(path):
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    return model.eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def main():
    base_dir, adapter_dir, merged_dir = sys.argv[1:4]
    ids = torch.tensor([[1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889]])
    base = load(base_dir)
    want_base = logits(base, ids)
    config = LoraConfig.from_pretrained(adapter_dir)
    peft_model = get_peft_model(base, config)
    wrapped = sorted(
        name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")
    )
    result = set_peft_model_state_dict(
        peft_model, load_file(f"{adapter_dir}/adapter_model.safetensors")
    )
    missing = [k for k in result.missing_keys if "lora_" in k]
    got = logits(peft_model.eval(), ids)
    # PEFT's merge, rounded to the dtype the base is stored in (and kollava writes).
    stored = LlavaForConditionalGeneration.from_pretrained(base_dir).dtype
    theirs = peft_model.merge_and_unload().to(stored).float()
    ours = load(merged_dir)
    print(
        json.dumps(
            {
                "unexpected": list(result.unexpected_keys),
                "missing": missing,
                "wrapped": wrapped,
                "vs_base": (got - want_base).abs().max().item(),
                "merged": (logits(ours, ids) - logits(theirs, ids)).abs().max().item(),
                "scale": want_base.abs().max().item(),
            }
        )
    )


if __name__ == "__main__":
    main()
