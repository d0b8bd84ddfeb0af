"""Reads PyTorch pickles kollava wrote with `torch.load` (weights only, the default since
torch 2.6), as LLaVA's code reads `mm_projector.bin` and `non_lora_trainables.bin`, and
compares each with the safetensors file kollava wrote beside it.

    python torch_load.py BIN SAFETENSORS PREFIX [BIN SAFETENSORS PREFIX ...]

PREFIX is what the pickle's names carry before the safetensors file's ('' for none). Prints one
JSON object per pickle in a list: its names, and the largest difference from the safetensors
tensors of the same names (`null` where a name, dtype or shape does not match).
"""
import json
import sys

import torch
from safetensors.torch import load_file


def check(bin_path, st_path, prefix):
    got = torch.load(bin_path, map_location="cpu")
    want = load_file(st_path)
    diff = 0.0
    for name, t in got.items():
        w = want.get(name[len(prefix):]) if name.startswith(prefix) else None
        if w is None or w.dtype != t.dtype or w.shape != t.shape:
            return {"names": sorted(got), "max_diff": None}
        diff = max(diff, (t.float() - w.float()).abs().max().item() if t.numel() else 0.0)
    if len(got) != len(want):
        diff = None
    return {"names": sorted(got), "max_diff": diff}


def main():
    args = sys.argv[1:]
    print(json.dumps([check(*args[i:i + 3]) for i in range(0, len(args), 3)]))


if __name__ == "__main__":
    main()
