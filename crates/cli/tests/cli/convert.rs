//! `kollava convert`, `extract-projector`, `make-delta`/`apply-delta`: rewritten
//! checkpoints keep every reference value.

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};

use crate::common::*;

/// A llava-hf checkpoint rewritten as sharded f32 PyTorch pickles (the tower inside, as
/// llava-hf keeps it; read tensor by tensor, the tower's straight into f32) loads and
/// matches every reference value, as its safetensors original does.
#[test]
fn a_pickled_llava_hf_checkpoint_keeps_every_reference_value() {
    let Some(python) = client_python() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("llava-hf");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let o = Command::new(&python)
        .arg(root.join("scripts/safetensors_to_pth.py"))
        .arg(checkpoint("llava-hf"))
        .arg(&out)
        .args(["--shard-gb", "0.001"])
        .output()
        .unwrap();
    assert_success(&o);
    let names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().filter(|n| n.ends_with(".bin")).count() > 1);
    assert!(!names
        .iter()
        .any(|n| n.starts_with("model") && n.contains("safetensors")));
    let reference = checkpoint("llava-hf");
    let o = kollava(&[&"verify", &"--model", &out, &"--reference", &reference]);
    assert_success(&o);
    let (passed, failed, _) = verify_summary(&stdout(&o));
    assert!(passed > 0);
    assert_eq!(failed, 0, "{}", stdout(&o));
}

/// The pickled (`.bin`, sharded) checkpoints, v0 and LLaVA-MPT, convert to safetensors that
/// keep every reference value.
#[test]
fn converting_the_bin_checkpoints_to_safetensors_keeps_every_reference_value() {
    for family in ["llava-v0", "llava-mpt"] {
        // A scratch fixtures tree: the converted checkpoint sits where the original did, so
        // its relative mm_vision_tower and the reference's image paths still resolve.
        let tmp = tempfile::tempdir().unwrap();
        for dir in ["images", "clip-vit-tiny-patch14-28"] {
            copy_dir(
                &checkpoint(family).parent().unwrap().join(dir),
                &tmp.path().join(dir),
            );
        }
        let out = tmp.path().join(family);
        let convert = || {
            kollava(&[
                &"convert",
                &"--input",
                &checkpoint(family),
                &"--output",
                &out,
            ])
        };
        assert_success(&convert());
        assert!(
            out.join("model.safetensors.index.json").is_file(),
            "{family}"
        );
        assert!(!std::fs::read_dir(&out).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .ends_with(".bin")));
        let o = kollava(&[&"verify", &"--model", &out, &"--reference", &out]);
        assert_success(&o);
        let (passed, failed, _) = verify_summary(&stdout(&o));
        assert!(passed > 70, "{family}: {passed}");
        assert_eq!(failed, 0, "{family}");
        // Refuses to overwrite.
        assert_one_line_error(&convert(), &["not empty"]);
    }
}

#[test]
fn extract_projector_writes_exactly_the_projector_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("mm_projector.safetensors");
    let ckpt = checkpoint("llava-v1.5");
    assert_success(&kollava(&[
        &"extract-projector",
        &"--model",
        &ckpt,
        &"--output",
        &out,
    ]));
    let got = candle_core::safetensors::load(&out, &candle_core::Device::Cpu).unwrap();
    let mut keys: Vec<&String> = got.keys().collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "model.mm_projector.0.bias",
            "model.mm_projector.0.weight",
            "model.mm_projector.2.bias",
            "model.mm_projector.2.weight"
        ]
    );
    // Values equal the checkpoint's own.
    let mut stored = HashMap::new();
    for shard in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        stored.extend(
            candle_core::safetensors::load(ckpt.join(shard), &candle_core::Device::Cpu).unwrap(),
        );
    }
    for (k, t) in &got {
        let a: Vec<f32> = t
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = stored[k]
            .flatten_all()
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b, "{k}");
    }
}

#[test]
fn a_separate_projector_file_replaces_the_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let ckpt = checkpoint("llava-v1.5");
    let same = tmp.path().join("same.safetensors");
    assert_success(&kollava(&[
        &"extract-projector",
        &"--model",
        &ckpt,
        &"--output",
        &same,
    ]));
    let base = token_ids(&run_json(&ckpt, &["--temperature", "0"]));
    let same_path = same.to_str().unwrap().to_string();
    assert_eq!(
        token_ids(&run_json(
            &ckpt,
            &["--temperature", "0", "--projector", &same_path]
        )),
        base,
        "the checkpoint's own projector changes nothing"
    );
    // A different projector (scaled weights) changes the answer.
    let changed = tmp.path().join("changed.safetensors");
    let mut t = candle_core::safetensors::load(&same, &candle_core::Device::Cpu).unwrap();
    for v in t.values_mut() {
        *v = (v.to_dtype(candle_core::DType::F32).unwrap() * 25.0).unwrap();
    }
    candle_core::safetensors::save(&t, &changed).unwrap();
    let changed_path = changed.to_str().unwrap().to_string();
    assert_ne!(
        token_ids(&run_json(
            &ckpt,
            &["--temperature", "0", "--projector", &changed_path]
        )),
        base
    );
    // A file without a projector is a clear error.
    let o = kollava(&[
        &"run",
        &"--model",
        &ckpt,
        &"--query",
        &"hi",
        &"--projector",
        &ckpt.join("model-00001-of-00002.safetensors"),
    ]);
    assert_one_line_error(&o, &["projector"]);
}

#[test]
fn convert_of_a_truncated_shard_fails_and_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    copy_dir(&checkpoint("llava-v1.5"), &src);
    let shard = src.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    let out = tmp.path().join("out");
    let o = kollava(&[&"convert", &"--input", &src, &"--output", &out]);
    assert_one_line_error(&o, &["model-00002-of-00002.safetensors"]);
    let left: Vec<String> = std::fs::read_dir(tmp.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["src".to_string()], "no output and no temp dir");
}

/// make-delta then apply-delta rebuild a checkpoint exactly (f32), including the rows an
/// enlarged vocabulary added and a projector the base does not have.
#[test]
fn make_delta_then_apply_delta_round_trips() {
    let tmp = tempfile::tempdir().unwrap();
    let target = checkpoint("llava-v1.5");
    let mut all: HashMap<String, Tensor> = HashMap::new();
    for e in std::fs::read_dir(&target).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("model-") && name.ends_with(".safetensors") {
            all.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
        }
    }
    // The base: the language model only, doubled, with a vocabulary 3 rows smaller.
    let base_dir = tmp.path().join("base");
    std::fs::create_dir(&base_dir).unwrap();
    let base: HashMap<String, Tensor> = all
        .iter()
        .filter(|(n, _)| !n.starts_with("model.mm_projector."))
        .map(|(n, t)| {
            let t = (t.to_dtype(DType::F32).unwrap() * 2.0).unwrap();
            let t = if n == "model.embed_tokens.weight" || n == "lm_head.weight" {
                let rows = t.dim(0).unwrap();
                t.narrow(0, 0, rows - 3).unwrap()
            } else {
                t
            };
            (n.clone(), t)
        })
        .collect();
    candle_core::safetensors::save(&base, base_dir.join("model.safetensors")).unwrap();
    std::fs::copy(target.join("config.json"), base_dir.join("config.json")).unwrap();

    let delta = tmp.path().join("delta");
    let rebuilt = tmp.path().join("rebuilt");
    assert_success(&kollava(&[
        &"make-delta",
        &"--base",
        &base_dir,
        &"--target",
        &target,
        &"--delta",
        &delta,
        &"--dtype",
        &"f32",
    ]));
    assert_success(&kollava(&[
        &"apply-delta",
        &"--base",
        &base_dir,
        &"--delta",
        &delta,
        &"--target",
        &rebuilt,
        &"--dtype",
        &"f32",
    ]));
    let mut back: HashMap<String, Tensor> = HashMap::new();
    let mut stored: HashMap<String, Tensor> = HashMap::new();
    for (dir, map) in [(&rebuilt, &mut back), (&delta, &mut stored)] {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            if name.starts_with("model") && name.ends_with(".safetensors") {
                map.extend(candle_core::safetensors::load(&p, &Device::Cpu).unwrap());
            }
        }
    }
    assert_eq!(back.len(), all.len());
    let flat = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    for (n, t) in &all {
        assert_eq!(flat(&back[n]), flat(t), "{n}");
    }
    // A delta really is a difference: t − 2t = −t for a tensor both have.
    let n = "model.norm.weight";
    assert_eq!(
        flat(&stored[n]),
        flat(&all[n]).iter().map(|x| -x).collect::<Vec<_>>()
    );
    // The rows the base lacks are stored as they are.
    let e = &stored["model.embed_tokens.weight"];
    let rows = e.dim(0).unwrap();
    assert_eq!(
        flat(&e.narrow(0, rows - 3, 3).unwrap()),
        flat(
            &all["model.embed_tokens.weight"]
                .narrow(0, rows - 3, 3)
                .unwrap()
        )
    );

    // A tensor the base lacks that is not the projector is refused; nothing is written.
    let bad_base = tmp.path().join("bad-base");
    std::fs::create_dir(&bad_base).unwrap();
    let partial: HashMap<String, Tensor> = base
        .into_iter()
        .filter(|(n, _)| n != "model.norm.weight")
        .collect();
    candle_core::safetensors::save(&partial, bad_base.join("model.safetensors")).unwrap();
    let out = tmp.path().join("never");
    let o = kollava(&[
        &"make-delta",
        &"--base",
        &bad_base,
        &"--target",
        &target,
        &"--delta",
        &out,
    ]);
    assert_one_line_error(&o, &["model.norm.weight", "base"]);
    assert!(!out.exists());
}
