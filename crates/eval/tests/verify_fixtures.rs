//! `verify` on every fixture checkpoint: every key, training ones included, within
//! tolerance. (The CLI tests check that a perturbed reference value is caught and named.)

use candle_core::Device;
use kollava_checkpoint::OpenOptions;
use kollava_eval::verify::{verify, Outcome, ReferenceDump, Tolerances};
use kollava_testkit::{checkpoint_dir, CHECKPOINTS};

#[test]
fn every_fixture_checkpoint_matches_its_reference() {
    for name in CHECKPOINTS {
        let dir = checkpoint_dir(name);
        let ckpt =
            kollava_checkpoint::open(dir.to_str().unwrap(), &OpenOptions::default()).unwrap();
        let results = verify_all(&ckpt, &dir, name);
        let compared = |prefix: &str| {
            results
                .iter()
                .any(|r| r.key.starts_with(prefix) && matches!(r.outcome, Outcome::Compared { .. }))
        };
        for prefix in [
            "pixel.",
            "pixel_u8.",
            "tokenizer.",
            "prompt.",
            "vision.select_layer_features",
            "vision.projector_output",
            "logits.last3",
            "generate.greedy_ids",
            "train_labels.",
            "train.loss",
            "train.projector_grad_norm",
        ] {
            assert!(compared(prefix), "{name}: {prefix} was not compared");
        }
    }
}

/// llava-hf with its tower named as transformers 5.x's `save_pretrained` names it
/// (`vision_tower.encoder…`, no `vision_model.` level; interop spec): the fixture's tensors
/// renamed so, verified against the same reference. (Read back from transformers' own
/// writing in the interop suite once it runs transformers.)
#[test]
fn llava_hf_with_the_tower_as_transformers_5_names_it_matches_its_reference() {
    let src = checkpoint_dir("llava-hf");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("llava-hf-5x");
    std::fs::create_dir(&dir).unwrap();
    let rename = |n: &str| n.replacen("vision_tower.vision_model.", "vision_tower.", 1);
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        if name.ends_with(".safetensors") && name.starts_with("model-") {
            let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
            let renamed: std::collections::HashMap<String, candle_core::Tensor> =
                tensors.into_iter().map(|(k, v)| (rename(&k), v)).collect();
            candle_core::safetensors::save(&renamed, dir.join(&name)).unwrap();
        } else if name == "model.safetensors.index.json" {
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(dir.join(&name), rename_all(&text)).unwrap();
        } else {
            std::fs::copy(&path, dir.join(&name)).unwrap();
        }
    }
    let index = std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap();
    assert!(!index.contains("vision_model") && index.contains("vision_tower.encoder."));
    let ckpt = kollava_checkpoint::open(dir.to_str().unwrap(), &OpenOptions::default()).unwrap();
    // The reference (and the images it names) stays where the fixture is.
    let results = verify_all(&ckpt, &src, "llava-hf as transformers 5.x names it");
    assert!(results
        .iter()
        .any(|r| r.key == "generate.greedy_ids" && matches!(r.outcome, Outcome::Compared { .. })));
}

fn rename_all(text: &str) -> String {
    text.replace("vision_tower.vision_model.", "vision_tower.")
}

/// `verify` of `ckpt` against the reference in `reference_dir`; every key must pass.
fn verify_all(
    ckpt: &kollava_checkpoint::Checkpoint,
    reference_dir: &std::path::Path,
    what: &str,
) -> Vec<kollava_eval::verify::KeyResult> {
    let reference = ReferenceDump::load(reference_dir).unwrap();
    let results = verify(ckpt, &reference, &Tolerances::default(), &Device::Cpu).unwrap();
    let failed: Vec<_> = results
        .iter()
        .filter(|r| !r.passed())
        .map(|r| format!("{} {:?}", r.key, r.outcome))
        .collect();
    assert!(failed.is_empty(), "{what}: {failed:#?}");
    results
}
