"""Converts a LLaVA-1.5 checkpoint to a GGUF pair with llama.cpp's own scripts, the way its
LLaVA guide does: `llava_surgery_v2.py` takes the projector out, the legacy
`convert_image_encoder_to_gguf.py` writes the CLIP tower + projector as the mmproj, and
`convert_hf_to_gguf.py` writes the language model (its config relabelled `LlamaForCausalLM`,
as the guide has users do).

    python llama_cpp_convert.py LLAMA_CPP_SRC MODEL TOWER OUT

MODEL is changed in place (use a copy). Writes OUT/<name>-f16.gguf and OUT/mmproj-model-f16.gguf
and prints one JSON object with their paths.
"""
import json
import os
import subprocess
import sys


def main():
    src, model, tower, out = sys.argv[1:5]
    env = dict(os.environ, PYTHONPATH=os.path.join(src, "gguf-py"))
    legacy = os.path.join(src, "tools", "mtmd", "legacy-models")

    def run(*args):
        subprocess.run([sys.executable, *args], env=env, check=True, stdout=subprocess.DEVNULL)

    run(os.path.join(legacy, "llava_surgery_v2.py"), "-C", "-m", model)
    run(os.path.join(legacy, "convert_image_encoder_to_gguf.py"), "-m", tower,
        "--llava-projector", os.path.join(model, "llava.projector"), "--output-dir", out,
        "--vision-only")
    config_path = os.path.join(model, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["architectures"] = ["LlamaForCausalLM"]
    config["model_type"] = "llama"
    with open(config_path, "w") as f:
        json.dump(config, f)
    llm = os.path.join(out, os.path.basename(model.rstrip("/")) + "-f16.gguf")
    run(os.path.join(src, "convert_hf_to_gguf.py"), model, "--outfile", llm, "--outtype", "f16")
    print(json.dumps({"model": llm, "mmproj": os.path.join(out, "mmproj-model-f16.gguf")}))


if __name__ == "__main__":
    main()
