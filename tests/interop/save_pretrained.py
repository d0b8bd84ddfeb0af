"""Writes a llava-hf checkpoint as today's transformers writes it, two ways a user gets one:

    python save_pretrained.py SRC DST loaded   # from_pretrained(SRC), then save_pretrained
    python save_pretrained.py SRC DST built    # a model built from SRC's config (as a training
                                               # script builds one), SRC's weights copied in

transformers 5.x saves a loaded model under the names it was loaded from, and a model it built
under its own (the CLIP tower without its `vision_model.` level). The processor is saved beside
the model. Prints one JSON object: the transformers version and the saved tensor names.
"""
import glob
import json
import sys

import torch
import transformers
from safetensors import safe_open
from transformers import AutoProcessor, LlavaConfig, LlavaForConditionalGeneration


def main():
    src, dst, how = sys.argv[1:4]
    model = LlavaForConditionalGeneration.from_pretrained(src, dtype=torch.float32)
    if how == "built":
        built = LlavaForConditionalGeneration(LlavaConfig.from_pretrained(src))
        built.load_state_dict(model.state_dict())
        model = built
    elif how != "loaded":
        sys.exit(f"unknown mode {how!r}")
    model.save_pretrained(dst)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)
    names = []
    for path in sorted(glob.glob(f"{dst}/*.safetensors")):
        with safe_open(path, "pt") as f:
            names.extend(f.keys())
    print(json.dumps({"transformers": transformers.__version__, "names": sorted(names)}))


if __name__ == "__main__":
    main()
