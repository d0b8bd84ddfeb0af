"""A LLaVA-MPT checkpoint with `attn_config.qk_ln` on, written by MosaicML's own MPT code as
LLaVA shipped it (llava-torch 1.1.1, `llava/model/language_model/mpt/`; neither transformers'
`MptForCausalLM` nor LLaVA 1.2 applies `qk_ln`), and the last-position logits that code
computes on token ids, as one JSON list. The source's weights are kept; the q/k LayerNorms'
weights are drawn at random (seeded) so that they matter.

    python mosaic_mpt_logits.py MPT_PACKAGE_PARENT SOURCE OUT IDS

MPT_PACKAGE_PARENT holds that `mpt` directory, renamed `mosaic_mpt`. Its prefix-LM
converter imports helpers later transformers releases dropped; prefix LM is not used here,
so that one module is replaced by a stub that refuses to run.
"""
import glob
import json
import os
import shutil
import sys
import types

import torch


def main():
    parent, src, out, ids = sys.argv[1:5]
    sys.path.insert(0, parent)
    stub = types.ModuleType("mosaic_mpt.hf_prefixlm_converter")

    def refuse(*_, **__):
        raise RuntimeError("prefix LM is not part of this check")

    stub.add_bidirectional_mask_if_missing = refuse
    stub.convert_hf_causal_lm_to_prefix_lm = refuse
    sys.modules["mosaic_mpt.hf_prefixlm_converter"] = stub
    from mosaic_mpt.configuration_mpt import MPTConfig
    from mosaic_mpt.modeling_mpt import MPTForCausalLM

    with open(f"{src}/config.json") as f:
        raw = json.load(f)
    raw["attn_config"]["qk_ln"] = True
    keep = {k: v for k, v in raw.items() if k not in ("model_type", "architectures")}
    keep["attn_config"] = dict(keep["attn_config"], attn_impl="torch")
    keep["init_device"] = "cpu"
    model = MPTForCausalLM(MPTConfig(**keep)).float().eval()
    stored = {}
    for shard in sorted(glob.glob(f"{src}/pytorch_model*.bin")):
        stored.update(torch.load(shard, map_location="cpu"))
    gen = torch.Generator().manual_seed(7)
    for name, p in model.state_dict().items():
        if ".q_ln." in name or ".k_ln." in name:
            stored[name] = (1.0 + 0.5 * torch.randn(p.shape, generator=gen)).to(torch.float16)
    lm = {
        k: v.float()
        for k, v in stored.items()
        if k.startswith("transformer.") and "mm_projector" not in k and "vision_tower" not in k
    }
    missing, unexpected = model.load_state_dict(lm, strict=False)
    if missing or unexpected:
        raise SystemExit(f"missing {missing}, unexpected {unexpected}")
    os.makedirs(out)
    for f in os.listdir(src):
        if not f.startswith("pytorch_model") and not f.startswith("reference"):
            shutil.copy(os.path.join(src, f), out)
    torch.save(stored, f"{out}/pytorch_model.bin")
    with open(f"{out}/config.json", "w") as f:
        json.dump(raw, f)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([json.loads(ids)])).logits
    print(json.dumps(logits[0, -1].tolist()))


if __name__ == "__main__":
    main()
