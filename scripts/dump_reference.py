#!/usr/bin/env python3
"""Dump a kollava reference (reference.json + reference.safetensors) from a real checkpoint.

The Rust port is tested against tiny fixtures (tests/fixtures/llava-*). This script writes the
same two files for a checkpoint you have on disk, computed with the upstream Python code, so that

    kollava verify --model PATH --reference DIR

can check the port on the real weights. Keys, shapes and dtypes follow tests/fixtures/README.md.

Usage examples:

    # KoLLaVA-KoVicuna-7b (KoLLaVA June-2023 code, transformers 4.31)
    python scripts/dump_reference.py --family llava-v0 --model ./KoLLaVA-KoVicuna-7b \\
        --vision-tower ./clip-vit-large-patch14 --out ref/kovicuna

    # LLaVA-1.5 (haotian-liu/LLaVA, transformers 4.37.2)
    python scripts/dump_reference.py --family llava-v1.5 --model ./llava-v1.5-7b --out ref/llava15

    # llava-hf/llava-1.5-7b-hf (transformers only), own images, the query in English
    python scripts/dump_reference.py --family llava-hf --model ./llava-1.5-7b-hf --out ref/hf \\
        --images ~/pics/cat.jpg ~/pics/dog.png --query "What is in this image?"

Everything is computed in float32 (stored fp16/bf16 weights are upcast, TF32 is off). Images
default to tests/fixtures/images; they are copied to DIR/images and `images` in the JSON holds
the absolute paths of those copies. Heavy imports (torch, transformers, llava) happen in main(),
so `--help` works without them. See scripts/README.md for the install steps.
"""
import argparse
import copy
import json
import math
import re
import shutil
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_IMAGES = REPO / "tests" / "fixtures" / "images"
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff"}
IGNORE_INDEX, IMAGE_TOKEN_INDEX, MAX_NEW_TOKENS = -100, -200, 16
MODES = ("crop", "pad", "resize")

# Conversation content shared with the fixtures (only --query can be changed).
QUERY = "이 이미지에 무엇이 있나요?"
ANSWER_1 = "빨간 사각형과 파란 원이 있습니다. It is a test image."
QUERY_2 = "What color is the circle?"
ANSWER_2 = "원은 파란색입니다."
CAPTION = "A red square and a blue circle."
KO_SYSTEM = ("당신은 유용한 언어 및 시각 도우미입니다. 사용자가 제공하는 시각적 콘텐츠를 이해할 수 있으며, "
             "자연어를 사용하여 사용자에게 다양한 작업을 지원합니다.")
TEST_STRINGS = [
    "Hello world", " Hello", "  two leading spaces", "trailing space ", "\nstarts with newline",
    "line1\nline2\n\nline4", "tab\tseparated\tvalues", "이미지 속 재료들로 어떤 음식을 만들 수 있을까요?",
    "안녕하세요. 반갑습니다!", "희귀 한글: 똠방각하 뷁 쓣 햏 꿻 읊", "emoji 😀👍🏽 and 한국어 🇰🇷",
    "mixed한국어English123 4567.89", "숫자 2023년 6월 15일", "</s> appears in text",
    "<image> literal tag", "Ünïcödé ñ façade — “quotes”", "a", "",
]

# Per family: prompt templates, default forward template/image, training templates.
FAMILIES = {
    "llava-v0": dict(templates=["conv_v1", "multimodal", "vicuna_v1"], template="conv_v1",
                     image="square_rgb", train=["conv_v1_signal", "vicuna_v1"],
                     semantics="legacy slow LlamaTokenizer (transformers<=4.31), <im_*> strip whitespace"),
    "llava-v1.5": dict(templates=["vicuna_v1", "llava_v1", "plain"], template="llava_v1",
                       image="wide_rgb", train=["llava_v1", "vicuna_v1", "plain"],
                       semantics="slow LlamaTokenizer + LLaVA tokenizer_image_token (-200)"),
    "llava-hf": dict(templates=["llava_hf"], template="llava_hf", image="tall_rgb",
                     train=["llava_hf"], semantics="tokenizer.json (fast tokenizer) via AutoProcessor"),
    "llava-mistral": dict(templates=["mistral_kollava", "plain"], template="mistral_kollava",
                          image="wide_rgb", train=["mistral_kollava", "plain"],
                          semantics="slow LlamaTokenizer + LLaVA tokenizer_image_token (-200)"),
}
RULES = {
    "conv_v1_signal": "v0 '### ' signal format (_add_speaker_and_signal/_mask_targets)",
    "mistral_kollava": "KoLLaVA version 'mistral' -> default '### ' signal preprocessor",
    "plain": "preprocess_plain",
    "llava_hf": "preprocess_v1 masking rule applied to the HF prompt (no system line)",
}
V1_RULE = ("preprocess_v1 with tokenizer_image_token", "preprocess_v1 (sep2 rounds, instruction_len-2)")
V0_HELP = """llava-v0 needs KoLLaVA's June-2023 code (the module llava.model.llava):
    git clone https://github.com/tabtoyou/KoLLaVA && git -C KoLLaVA checkout ae472b3
    pip install --no-deps -e KoLLaVA
    pip install torch==2.1.2 transformers==4.31.0 tokenizers==0.13.3 sentencepiece==0.1.99 \
        accelerate==0.21.0 protobuf "numpy<2" safetensors pillow
Use a separate virtualenv: haotian-liu/LLaVA installs a package with the same name `llava`."""
LLAVA_HELP = """llava-v1.5 / llava-mistral need haotian-liu/LLaVA (import name `llava`):
    pip install --no-deps llava-torch==1.2.2.post1     (or a clone of haotian-liu/LLaVA at c121f04)
    pip install torch==2.1.2 transformers==4.37.2 tokenizers==0.15.1 sentencepiece==0.1.99 \
        accelerate==0.21.0 protobuf "numpy<2" safetensors pillow"""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="checkpoint directory (or hub id)")
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True, help="output directory (created)")
    p.add_argument("--images", nargs="+", metavar="DIR_OR_FILE",
                   help=f"image files and/or folders (default: {DEFAULT_IMAGES})")
    p.add_argument("--query", default=QUERY, help="first user question (default: %(default)s)")
    p.add_argument("--template", help="template of the forward prompt (default: the family's; "
                   "llava-v0 also has `multimodal`, the one KoLLaVA's run_llava uses)")
    p.add_argument("--forward-image", metavar="STEM[/MODE]",
                   help="image (file stem) and mode for the forward pass (default: as the fixtures, "
                   "mode = the one upstream uses for this checkpoint)")
    p.add_argument("--vision-tower", help="local CLIP checkpoint to use instead of config mm_vision_tower")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="compute dtype; the reference tolerances assume float32 (default)")
    p.add_argument("--skip-train", action="store_true",
                   help="skip train_labels/train.* (saves the memory of one backward pass)")
    return p.parse_args(argv)


def log(msg):
    print(f"[dump_reference] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------- images
def collect_images(specs):
    files = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if f.suffix.lower() in IMAGE_EXTS)
        elif path.is_file():
            files.append(path)
        else:
            raise SystemExit(f"no such image file or folder: {spec}")
    images = {}
    for f in files:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", f.stem)  # keys are dot-separated: keep stems dot-free
        if stem in images:
            raise SystemExit(f"two images map to the key {stem!r}: {images[stem]} and {f}")
        images[stem] = f.resolve()
    if not images:
        raise SystemExit("no images found")
    return images


def pad_square(img, colour):
    """LLaVA-1.5 expand2square: centre the image on a square canvas of its longer side."""
    from PIL import Image
    w, h = img.size
    if w == h:
        return img.copy()
    canvas = Image.new(img.mode, (max(w, h),) * 2, colour)
    canvas.paste(img, (0, (w - h) // 2) if w > h else ((h - w) // 2, 0))
    return canvas


def resize_crop(img, edge, crop):
    """CLIPImageProcessor resize (short side = edge, long side truncated) + centre crop, as u8 HWC."""
    import numpy as np
    from PIL import Image
    w, h = img.size
    size = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    arr = np.asarray(img.resize(size, Image.BICUBIC))
    top, left = (arr.shape[0] - crop) // 2, (arr.shape[1] - crop) // 2
    return np.ascontiguousarray(arr[top:top + crop, left:left + crop])


def mode_input(img, mode, crop, colour, expand2square):
    """The PIL image handed to the CLIP processor for `mode` (pad uses the upstream helper if any)."""
    from PIL import Image
    if mode == "pad":
        return expand2square(img, colour)
    return img.resize((crop, crop), Image.BICUBIC) if mode == "resize" else img


def normalize(u8, proc):
    import numpy as np
    x = (u8.astype(np.float64) * proc.rescale_factor).astype(np.float32)
    x = (x - np.asarray(proc.image_mean, np.float32)) / np.asarray(proc.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))


def processor_sizes(proc):
    def field(value, key):  # a dict (4.x), a SizeDict with attributes (5.x), or a number
        if isinstance(value, dict):
            return value[key]
        return getattr(value, key, value)
    return int(field(proc.size, "shortest_edge")), int(field(proc.crop_size, "height"))


# ------------------------------------------------------------------------------ templates
def render_conv(conv, turns):
    """Render turns [(role_index, text_or_None), ...] with an upstream Conversation template."""
    conv = conv.copy()
    for role, text in turns:
        conv.append_message(conv.roles[role], text)
    return conv.get_prompt()


def dialogue(first_user, with_answer=False):
    turns = [(0, first_user), (1, ANSWER_1), (0, QUERY_2), (1, ANSWER_2 if with_answer else None)]
    return turns


def train_sources(first_user, plain):
    if plain:
        return [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": CAPTION}]
    return [{"from": "human" if r == 0 else "gpt", "value": t} for r, t in dialogue(first_user, True)]


def signal_text(conv, sources):
    """The text LLaVA's default ('### ') preprocessor builds (_add_speaker_and_signal)."""
    turns = "".join(f"### {conv.roles[0 if s['from'] == 'human' else 1]}: {s['value']}\n" for s in sources)
    return f"{conv.system}\n\n{turns}### "


def v1_labels(text, tokenize, sep=" ASSISTANT: ", sep2="</s>"):
    """LLaVA preprocess_v1 masking (rounds split on sep2, instruction length - 2), no -1 correction."""
    ids = tokenize(text)
    labels, cur = list(ids), 1
    labels[0] = IGNORE_INDEX
    for rou in text.split(sep2):
        parts = rou.split(sep)
        if rou == "" or len(parts) != 2:
            break
        n_instr = len(tokenize(parts[0] + sep)) - 2
        labels[cur:cur + n_instr] = [IGNORE_INDEX] * len(labels[cur:cur + n_instr])
        cur += len(tokenize(rou))
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    mismatch = cur != len(ids)
    return ids, [IGNORE_INDEX] * len(ids) if mismatch else labels, mismatch


def resolve_tower(model, name, override):
    """mm_vision_tower may be relative to the checkpoint (as in the fixtures); --vision-tower wins."""
    if override:
        return str(Path(override).expanduser().resolve())
    local = Path(model) / name
    return str(local.resolve()) if not Path(name).is_absolute() and local.is_dir() else name


def version_tuple(v):
    return tuple(int(x) for x in re.findall(r"\d+", v)[:2])


# ------------------------------------------------------------------------------- backends
# Each loader returns a namespace with: tok, proc, model, projector, expand2square, N,
# image_tokens, mode, info, first_user(q), render(name, turns), tokenize(text), vision(pixel),
# logits(ids, pixel), loss(ids, labels, pixel), train_labels(name, first_user).
def load_v0(args, torch, dtype, device):
    try:
        from llava import conversation as conv_lib
        from llava.model.llava import LlavaLlamaForCausalLM
    except ImportError as err:
        raise SystemExit(f"{V0_HELP}\n(import error: {err})")
    import transformers
    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionModel
    if version_tuple(transformers.__version__) >= (4, 34):
        raise SystemExit(f"transformers {transformers.__version__}: the v0 tokenizer semantics need "
                         f"transformers<=4.33 (tested 4.31.0).\n{V0_HELP}")
    cfg = LlavaLlamaForCausalLM.config_class.from_pretrained(args.model)
    cfg.mm_vision_tower = resolve_tower(args.model, cfg.mm_vision_tower, args.vision_tower)
    cfg.use_cache = True  # training saved use_cache=false; run_llava passes use_cache=True
    tok = AutoTokenizer.from_pretrained(args.model, use_fast=False)
    with warnings.catch_warnings():  # the tower built inside __init__ lands on `meta`: reloaded below
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        model = LlavaLlamaForCausalLM.from_pretrained(args.model, config=cfg, torch_dtype=dtype,
                                                      low_cpu_mem_usage=True)
    # The June code keeps the tower in a plain list (not a sub-module; possibly on `meta` after a
    # low-memory load). Like run_llava, reload it from mm_vision_tower, here in the compute dtype.
    tower = CLIPVisionModel.from_pretrained(cfg.mm_vision_tower, torch_dtype=dtype).to(device).eval()
    model.get_model().vision_tower = [tower]
    model.to(device).eval()
    proc = CLIPImageProcessor.from_pretrained(cfg.mm_vision_tower)
    use_se = bool(getattr(cfg, "mm_use_im_start_end", False))
    tok.add_tokens(["<im_patch>"], special_tokens=True)  # as run_llava: no-ops for saved tokenizers
    if use_se:
        tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    if len(tok) != model.get_input_embeddings().weight.shape[0]:
        raise SystemExit(f"tokenizer has {len(tok)} tokens but the embedding has "
                         f"{model.get_input_embeddings().weight.shape[0]} rows")
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # the label code counts non-pad tokens
    vc = tower.config
    vc.use_im_start_end, vc.im_patch_token = use_se, tok.convert_tokens_to_ids("<im_patch>")
    n = (vc.image_size // vc.patch_size) ** 2
    image_tokens = {"N": n, "im_patch": vc.im_patch_token, "style": "<im_patch>*N"}
    image_str = "<im_patch>" * n
    if use_se:
        vc.im_start_token, vc.im_end_token = tok.convert_tokens_to_ids(["<im_start>", "<im_end>"])
        image_tokens.update(im_start=vc.im_start_token, im_end=vc.im_end_token,
                            style="<im_start> + <im_patch>*N + <im_end>, N=(image_size/14)^2")
        image_str = f"<im_start>{image_str}<im_end>"
    keys = {"conv_v1": "v1", "conv_v1_signal": "v1", "multimodal": "multimodal", "vicuna_v1": "vicuna_v1_1"}

    def conv(name):
        c = conv_lib.conv_templates[keys[name]].copy()
        if keys[name] == "v1":  # conv_v1_2 without its few-shot example
            c.messages, c.offset = [], 0
        return c

    layer = getattr(cfg, "mm_vision_select_layer", -1)
    ids_t = lambda ids: torch.tensor([ids], device=device)

    def train_labels(name, first_user):
        from llava.train import train as upstream  # June train.py: preprocess(sources, tokenizer)
        conv_lib.default_conversation = conv_lib.conv_templates[keys[name]]  # keeps `version`
        sources = train_sources(first_user, False)
        out = upstream.preprocess([copy.deepcopy(sources)], tok)
        text = signal_text(conv_lib.default_conversation, sources) if name == "conv_v1_signal" \
            else render_conv(conv(name), dialogue(first_user, True))
        return text, sources, out["input_ids"][0].tolist(), out["labels"][0].tolist()

    return dict(
        tok=tok, proc=proc, model=model, projector=model.get_model().mm_projector, N=n,
        expand2square=pad_square, image_tokens=image_tokens, mode="crop", info={},
        first_user=lambda q: f"{q}\n{image_str}",  # run_llava puts the image after the question
        render=lambda name, turns: render_conv(conv(name), turns),
        tokenize=lambda text: tok(text).input_ids,
        vision=lambda px: tower(px[None], output_hidden_states=True).hidden_states[layer][0, 1:],
        logits=lambda ids, px: model(input_ids=ids_t(ids), images=px[None]).logits[0],
        loss=lambda ids, labels, px: model(input_ids=ids_t(ids), labels=ids_t(labels), images=px[None]).loss,
        train_labels=train_labels)


def load_llava(args, torch, dtype, device):
    try:
        import llava.model as llava_model
        from llava import conversation as conv_lib
        from llava.mm_utils import expand2square, tokenizer_image_token
    except ImportError as err:
        raise SystemExit(f"{LLAVA_HELP}\n(import error: {err})")
    if not hasattr(llava_model, "LlavaLlamaForCausalLM"):  # llava/model/__init__.py hides the error
        raise SystemExit("llava.model could not import its model classes; run `python -c 'import "
                         "llava.model.language_model.llava_llama'` to see why.\n" + LLAVA_HELP)
    import transformers
    from transformers import AutoTokenizer, PretrainedConfig
    if transformers.__version__ not in ("4.36.2", "4.37.2"):
        log(f"WARNING: transformers {transformers.__version__}; LLaVA was tested with 4.37.2")
    model_type = PretrainedConfig.get_config_dict(args.model)[0].get("model_type")
    cls = llava_model.LlavaMistralForCausalLM if model_type == "llava_mistral" else llava_model.LlavaLlamaForCausalLM
    cfg = cls.config_class.from_pretrained(args.model)
    cfg.mm_vision_tower = resolve_tower(args.model, cfg.mm_vision_tower, args.vision_tower)
    # Same steps as llava.model.builder.load_pretrained_model, except that the builder hard-codes
    # float16 (lossy for bf16/fp32 weights and for the fp32 CLIP tower): we load in `dtype`.
    # Eager attention: 4.37's sdpa path ignores Mistral's sliding window (and the attn_implementation
    # kwarg is ignored when config= is given, hence the attribute).
    cfg._attn_implementation = "eager"
    tok = AutoTokenizer.from_pretrained(args.model, use_fast=False)
    model = cls.from_pretrained(args.model, config=cfg, torch_dtype=dtype, low_cpu_mem_usage=True)
    if getattr(cfg, "mm_use_im_patch_token", True):
        tok.add_tokens(["<im_patch>"], special_tokens=True)
    use_se = bool(getattr(cfg, "mm_use_im_start_end", False))
    if use_se:
        tok.add_tokens(["<im_start>", "<im_end>"], special_tokens=True)
    model.resize_token_embeddings(len(tok))
    vt = model.get_vision_tower()
    vt.is_loaded = False  # always load the tower named by mm_vision_tower, never the bundled copy
    vt.load_model()
    model.to(device=device, dtype=dtype).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token  # train.py does this for every non-v0 version
    n = (vt.config.image_size // vt.config.patch_size) ** 2 + (getattr(vt, "select_feature", "") == "cls_patch")
    ko = conv_lib.conv_templates.get("mistral")
    if ko is None or ko.system != KO_SYSTEM:  # KoLLaVA's `mistral` template (not in upstream LLaVA)
        ko = conv_lib.Conversation(system=KO_SYSTEM, roles=("<|im_start|>user\n", "<|im_start|>assistant\n"),
                                   messages=[], offset=0, sep_style=conv_lib.SeparatorStyle.TWO,
                                   sep=" ", sep2="<|im_end|>", version="mistral")
    convs = {"vicuna_v1": conv_lib.conv_templates["vicuna_v1"], "llava_v1": conv_lib.conv_templates["llava_v1"],
             "mistral_kollava": ko, "plain": conv_lib.conv_templates["plain"]}
    image_str = "<im_start><image><im_end>" if use_se else "<image>"
    ids_t = lambda ids: torch.tensor([ids], device=device)

    def render(name, turns):
        if name == "plain":  # preprocess_plain's text: the image, then (two-turn) the caption and sep
            return "<image>" + (CAPTION + "\n" if len(turns) > 2 else "")
        return render_conv(convs[name], turns)

    def train_labels(name, first_user):
        from llava.train import train as upstream
        conv_lib.default_conversation = convs[name]
        sources = train_sources(first_user, name == "plain")
        out = upstream.preprocess([copy.deepcopy(sources)], tok, has_image=True)
        text = signal_text(ko, sources) if name == "mistral_kollava" else render(name, dialogue(first_user, True))
        return text, sources, out["input_ids"][0].tolist(), out["labels"][0].tolist()

    info = {"sliding_window": cfg.sliding_window,
            "sliding_window_rule": "query i attends key j iff 0 <= i-j < sliding_window"} \
        if model_type == "llava_mistral" and getattr(cfg, "sliding_window", None) else {}
    return dict(
        tok=tok, proc=vt.image_processor, model=model, projector=model.get_model().mm_projector, N=n,
        expand2square=expand2square, mode="pad" if getattr(cfg, "image_aspect_ratio", None) == "pad" else "crop",
        image_tokens={"N": n, "index": IMAGE_TOKEN_INDEX, "style": "IMAGE_TOKEN_INDEX -200 in ids; replaced by N feature rows"},
        info=info, first_user=lambda q: f"{image_str}\n{q}", render=render,
        tokenize=lambda text: tokenizer_image_token(text, tok),
        vision=lambda px: vt(px[None])[0],  # CLIPVisionTower: hidden_states[select_layer], CLS dropped
        logits=lambda ids, px: model(input_ids=ids_t(ids), images=px[None]).logits[0],
        loss=lambda ids, labels, px: model(input_ids=ids_t(ids), labels=ids_t(labels), images=px[None]).loss,
        train_labels=train_labels)


def load_hf(args, torch, dtype, device):
    import transformers
    from transformers import AutoProcessor, LlavaForConditionalGeneration
    if version_tuple(transformers.__version__) < (4, 47):
        raise SystemExit("llava-hf needs transformers>=4.47 (its processor must expand <image> to N tokens)")
    model = LlavaForConditionalGeneration.from_pretrained(args.model, torch_dtype=dtype, low_cpu_mem_usage=True,
                                                          attn_implementation="eager").to(device).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    tok, cfg = processor.tokenizer, model.config
    try:  # the PIL-based processor (a "fast" torchvision one may be the AutoProcessor default)
        proc = transformers.CLIPImageProcessor.from_pretrained(args.model)
    except Exception:  # noqa: BLE001 - fall back to whatever the processor uses
        proc = processor.image_processor
    vc, strategy = cfg.vision_config, cfg.vision_feature_select_strategy
    n = (vc.image_size // vc.patch_size) ** 2 + (strategy != "default")
    image_id = getattr(cfg, "image_token_index", None) or getattr(cfg, "image_token_id", None)
    tokenize = lambda text: tok(text.replace("<image>", "<image>" * n)).input_ids

    def render(name, turns):  # llava-1.5-hf format: "USER: <image>\n... ASSISTANT: ...</s>USER: ..."
        out = ""
        for role, text in turns:
            speaker = ("USER", "ASSISTANT")[role]
            out += f"{speaker}:" if text is None else f"{speaker}: {text}" + (" ", "</s>")[role]
        return out

    def train_labels(name, first_user):
        text = render(name, dialogue(first_user, True))
        ids, labels, mismatch = v1_labels(text, tokenize)
        return text, None, ids, labels, mismatch

    # transformers 5.x keeps the parts under `model.model`; 4.x on the top-level model.
    part = lambda name: getattr(model, name, None) or getattr(model.model, name)
    tower, projector = part("vision_tower"), part("multi_modal_projector")

    def vision(px):
        hs = tower(px[None], output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
        return hs[0, 1:] if strategy == "default" else hs[0]

    ids_t = lambda ids: torch.tensor([ids], device=device)

    def loss(ids, labels, px):
        logits = model(input_ids=ids_t(ids), pixel_values=px[None]).logits[0].float()
        return torch.nn.functional.cross_entropy(logits[:-1], ids_t(labels)[0, 1:], ignore_index=IGNORE_INDEX)

    def self_check(text, image, px, last3):
        enc = processor(images=image, text=text, return_tensors="pt")
        if enc["input_ids"][0].tolist() != tokenize(text):
            raise SystemExit("the processor's input_ids differ from tokenizer(<image> x N); check transformers")
        logits = model(**{k: v.to(device) for k, v in enc.items()}).logits[0, -3:]
        return {"processor_pixel_values_check": float((enc["pixel_values"][0].to(px) - px).abs().max()),
                "transformers_reload_logits_max_abs_diff": float((logits - last3).abs().max())}

    return dict(
        tok=tok, proc=proc, model=model, projector=projector, N=n,
        expand2square=pad_square, mode="crop", info={}, self_check=self_check,
        image_tokens={"N": n, "image_token_index": image_id, "pad_token_id": getattr(cfg, "pad_token_id", None),
                      "style": "<image> (id image_token_index) repeated N times by the processor"},
        first_user=lambda q: f"<image>\n{q}", render=render, tokenize=tokenize, vision=vision,
        logits=lambda ids, px: model(input_ids=ids_t(ids), pixel_values=px[None]).logits[0],
        loss=loss, train_labels=train_labels, expanded=lambda text: text.replace("<image>", "<image>" * n))


LOADERS = {"llava-v0": load_v0, "llava-v1.5": load_llava, "llava-mistral": load_llava, "llava-hf": load_hf}


# ----------------------------------------------------------------------------------- main
def dump_pixels(b, images, out, tensors):
    """pixel/pixel_u8 for every image and mode, image.*.decoded_rgb_u8 for JPEGs; copies images."""
    import numpy as np
    from PIL import Image
    edge, size = processor_sizes(b.proc)
    colour = tuple(int(m * 255) for m in b.proc.image_mean)  # (122, 116, 104) for CLIP
    copies, rgb_images = {}, {}
    for stem, path in images.items():
        copies[stem] = str((out / "images" / f"{stem}{path.suffix.lower()}").resolve())
        shutil.copyfile(path, copies[stem])
        with Image.open(path) as img:
            rgb = rgb_images[stem] = img.convert("RGB")  # RGBA: alpha dropped; L: grey copied
            if img.format == "JPEG":
                tensors[f"image.{stem}.decoded_rgb_u8"] = np.ascontiguousarray(np.asarray(rgb))
        for mode in MODES:
            u8 = resize_crop(mode_input(rgb, mode, size, colour, pad_square), edge, size)
            pixel = normalize(u8, b.proc)
            want = b.proc.preprocess(mode_input(rgb, mode, size, colour, b.expand2square),
                                     return_tensors="np")["pixel_values"][0]
            if want.shape != pixel.shape or not np.array_equal(want, pixel):
                raise SystemExit(f"pixel.{stem}.{mode}: the PIL re-implementation differs from the "
                                 "image processor; is it a CLIPImageProcessor?")
            tensors[f"pixel_u8.{stem}.{mode}"], tensors[f"pixel.{stem}.{mode}"] = u8, pixel
    return size, copies, rgb_images


def dump_prompts(b, templates, first_user):
    prompts = {}
    for name in templates:
        prompts[name] = {}
        for key, turns in (("single_turn", [(0, first_user), (1, None)]), ("two_turn", dialogue(first_user))):
            text = b.render(name, turns)
            prompts[name][key] = {"text": text, "ids": b.tokenize(text)}
            if hasattr(b, "expanded"):
                prompts[name][key]["expanded_text"] = b.expanded(text)
    return prompts


def dump_train(b, args, fam, first_user, pixel, tensors):
    """train_labels.* for each training template, then loss and projector gradient of the first."""
    import numpy as np
    labels_json = {}
    for name in fam["train"]:
        text, sources, ids, labels, *mismatch = b.train_labels(name, first_user)
        if ids != b.tokenize(text):
            raise SystemExit(f"train_labels.{name}: ids differ from the tokenized text")
        entry = {"text": text, "ids": ids, "labels": labels,
                 "rule": RULES.get(name, V1_RULE[args.family == "llava-v0"])}
        if sources is not None:
            entry["turns"] = [[0 if s["from"] == "human" else 1, s["value"]] for s in sources]
        if "signal" not in entry["rule"] and name != "plain":  # preprocess_v1 masks all on mismatch
            entry["tokenization_mismatch"] = mismatch[0] if mismatch else set(labels) == {IGNORE_INDEX}
        labels_json[name] = entry
        tensors[f"train_labels.{name}.ids"] = np.array(ids, np.int64)
        tensors[f"train_labels.{name}.labels"] = np.array(labels, np.int64)
    sample = fam["train"][0]
    ids, labels = labels_json[sample]["ids"], labels_json[sample]["labels"]
    b.model.requires_grad_(False)
    b.projector.requires_grad_(True)  # LLM and vision tower frozen, projector trainable
    loss = b.loss(ids, labels, pixel)
    loss.backward()
    per_param = {k: float(p.grad.double().norm()) for k, p in b.projector.named_parameters()}
    grad_norm = math.sqrt(sum(v * v for v in per_param.values()))
    tensors["train.loss"] = np.array([loss.item()], np.float32)
    tensors["train.projector_grad_norm"] = np.array([grad_norm], np.float32)
    return {"train_labels": labels_json, "train_sample": f"train_labels.{sample}", "train": {
        "loss": float(loss.item()), "projector_grad_norm": grad_norm,
        "projector_grad_norm_per_param": per_param,
        "n_target_tokens": sum(x != IGNORE_INDEX for x in labels[1:]),
        "expanded_len": len(ids) + (b.N - 1) * ids.count(IMAGE_TOKEN_INDEX)}}


def main(argv=None):
    args = parse_args(argv)
    from types import SimpleNamespace
    import numpy as np
    import torch
    import transformers
    from safetensors.numpy import save_file

    fam = FAMILIES[args.family]
    template = args.template or fam["template"]
    if template not in fam["templates"]:
        raise SystemExit(f"--template for {args.family} must be one of {fam['templates']}")
    images = collect_images(args.images or [DEFAULT_IMAGES])
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 means float32, also on Ampere+
    torch.backends.cudnn.allow_tf32 = False  # (CLIP's patch embedding is a convolution)
    torch.manual_seed(0)
    log(f"loading {args.model} as {args.family} on {device} ({args.dtype})")
    b = SimpleNamespace(**LOADERS[args.family](args, torch, dtype, device))
    tensors, out = {}, Path(args.out)
    (out / "images").mkdir(parents=True, exist_ok=True)

    log("pixels, tokenizer strings and prompts")
    size, copies, rgb_images = dump_pixels(b, images, out, tensors)
    first_user = b.first_user(args.query)
    prompts = dump_prompts(b, fam["templates"], first_user)
    strings = [{"text": s, "ids": b.tok(s).input_ids} for s in TEST_STRINGS]

    stem, _, mode = (args.forward_image or "").partition("/")
    stem = stem or (fam["image"] if fam["image"] in images else next(iter(images)))
    mode = mode or b.mode
    if stem not in images or mode not in MODES:
        raise SystemExit(f"--forward-image: unknown image {stem!r} or mode {mode!r}")
    pixel = torch.from_numpy(tensors[f"pixel.{stem}.{mode}"]).to(device=device, dtype=dtype)
    ids = prompts[template]["single_turn"]["ids"]

    log(f"vision features, logits and greedy generation ({stem}/{mode}, {template})")
    with torch.no_grad():
        features = b.vision(pixel)
        projected = b.projector(features)
        logits = b.logits(ids, pixel)
        generated, step_logits = [], logits
        for _ in range(MAX_NEW_TOKENS):  # greedy, full recompute each step, no eos stop
            generated.append(int(step_logits[-1].argmax()))
            if len(generated) < MAX_NEW_TOKENS:
                step_logits = b.logits(ids + generated, pixel)
        checks = b.self_check(prompts[template]["single_turn"]["text"], rgb_images[stem], pixel,
                              logits[-3:]) if hasattr(b, "self_check") else {}
    f32 = lambda t: t.detach().float().cpu().numpy()
    tensors.update({"vision.select_layer_features": f32(features), "vision.projector_output": f32(projected),
                    "prompt.forward_ids": np.array(ids, np.int64), "logits.last3": f32(logits[-3:]),
                    "generate.greedy_ids": np.array(generated, np.int64)})
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    ref = {
        "checkpoint": {"format": args.family, "vocab_size": int(logits.shape[-1]), **b.info,
                       "image_mode_used_upstream": "crop (processor default)" if args.family == "llava-hf" else b.mode,
                       "dumped_with": {"model": args.model, "dtype": args.dtype, "device": str(device), **versions}},
        "image_size": size, "images": copies, "image_tokens": b.image_tokens,
        "tokenizer": {"add_bos": b.tok("a").input_ids[0] == b.tok.bos_token_id, "strings": strings,
                      "semantics": f"{fam['semantics']}; dumped with {type(b.tok).__name__} "
                                   f"legacy={getattr(b.tok, 'legacy', None)}"},
        "prompts": prompts, "forward_prompt": f"prompts.{template}.single_turn", "forward_image": f"{stem}/{mode}",
        "logits_positions": "last 3 rows of the spliced (image-expanded) sequence, in order",
        "logits_seq_len": int(logits.shape[0]),
        "generate": {"ids": generated, "max_new_tokens": MAX_NEW_TOKENS,
                     "note": "greedy argmax, no stopping criterion, no eos check"},
        **checks,
    }
    if args.skip_train:
        log("--skip-train: no train_labels / train.* keys")
    else:
        log("training labels, loss and projector gradient")
        ref.update(dump_train(b, args, fam, first_user, pixel, tensors))

    ref["tensor_keys"] = sorted(tensors)
    save_file(tensors, str(out / "reference.safetensors"))
    with open(out / "reference.json", "w", encoding="utf-8") as f:
        json.dump(ref, f, indent=1, sort_keys=True)
        f.write("\n")
    log(f"wrote {out}/reference.json and reference.safetensors ({len(tensors)} tensors); generated {generated}")


if __name__ == "__main__":
    main()
