"""Uses a llava-hf repo as a transformers user does: `AutoProcessor` and
`LlavaForConditionalGeneration` load it, the chat template renders one question about an
image, and the model answers greedily.

    python llava_hf_repo.py REPO IMAGE QUESTION MAX_NEW_TOKENS

Prints one JSON object: the weights transformers found missing or unexpected, the processor
classes it built, the rendered prompt, the answer's token ids and text, and, when the image
processor pads (`do_pad`), the largest difference between its pixels and those of LLaVA's
`pad` (`expand2square`: a PIL paste onto the mean colour as integers, then the CLIP processor),
and whether the repo's `tokenizer.json` is the tokenizer transformers builds from its
`tokenizer.model` when there is none. The caller decides what passes.
"""
import json
import sys

import torch
from PIL import Image
from transformers import AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration


def main():
    repo, image, question, max_new = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    processor = AutoProcessor.from_pretrained(repo)
    model, info = LlavaForConditionalGeneration.from_pretrained(
        repo, dtype=torch.float32, output_loading_info=True
    )
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(images=Image.open(image).convert("RGB"), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=max_new, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1]:].tolist()
    # The fast tokenizer the repo ships against the one transformers converts from the slow.
    import os
    import shutil
    import tempfile

    with tempfile.TemporaryDirectory() as bare:
        # The repo without its tokenizer.json (and without the weights, not needed here).
        for name in os.listdir(repo):
            if name != "tokenizer.json" and not name.endswith(".safetensors"):
                shutil.copy(os.path.join(repo, name), bare)
        converted = AutoTokenizer.from_pretrained(bare).backend_tokenizer.to_str()
    shipped = AutoTokenizer.from_pretrained(repo).backend_tokenizer.to_str()
    same_tokenizer = os.path.isfile(os.path.join(repo, "tokenizer.json")) and json.loads(
        shipped
    ) == json.loads(converted)
    pad_diff = None
    if getattr(processor.image_processor, "do_pad", False):
        from transformers import CLIPImageProcessor

        img = Image.open(image).convert("RGB")
        clip = CLIPImageProcessor.from_pretrained(repo)
        w, h = img.size
        square = Image.new("RGB", (max(w, h),) * 2, tuple(int(x * 255) for x in clip.image_mean))
        square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        llava = clip(square, return_tensors="pt")["pixel_values"]
        pad_diff = (inputs["pixel_values"] - llava).abs().max().item()
    print(
        json.dumps(
            {
                "missing": sorted(info["missing_keys"]),
                "unexpected": sorted(info["unexpected_keys"]),
                "processor": type(processor).__name__,
                "image_processor": type(processor.image_processor).__name__,
                "prompt": prompt,
                "ids": ids,
                "text": processor.tokenizer.decode(ids, skip_special_tokens=True),
                "pad_pixels_vs_llava": pad_diff,
                "tokenizer_json_as_converted": same_tokenizer,
            },
            ensure_ascii=False,
        )
    )


if __name__ == "__main__":
    main()
