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
        let reference = ReferenceDump::load(&dir).unwrap();
        let results = verify(&ckpt, &reference, &Tolerances::default(), &Device::Cpu).unwrap();
        let failed: Vec<_> = results
            .iter()
            .filter(|r| !r.passed())
            .map(|r| format!("{} {:?}", r.key, r.outcome))
            .collect();
        assert!(failed.is_empty(), "{name}: {failed:#?}");
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
