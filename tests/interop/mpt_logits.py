"""The last-position logits of a LLaVA-MPT checkpoint's language model on token ids, in
transformers' own `MptForCausalLM` (which applies `attn_config.clip_qkv`), as one JSON list.
The checkpoint's `transformer.*` names are that class's; LLaVA's projector is left out.

    python mpt_logits.py CHECKPOINT IDS
"""
import json
import sys

import torch
from transformers import MptConfig, MptForCausalLM


def main():
    path, ids = sys.argv[1:3]
    with open(f"{path}/config.json") as f:
        raw = json.load(f)
    keep = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    model = MptForCausalLM.from_pretrained(path, config=MptConfig(**keep), dtype=torch.float32)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([json.loads(ids)]))
    print(json.dumps(out.logits[0, -1].tolist()))


if __name__ == "__main__":
    main()
