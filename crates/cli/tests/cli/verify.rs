//! `kollava verify`: passes on every fixture, and fails on exactly the key a perturbed
//! reference breaks.

use candle_core::{DType, Device, Tensor};
use kollava_testkit::CHECKPOINTS;
use serde_json::Value;

use crate::common::*;

#[test]
fn verify_passes_on_every_fixture() {
    for name in CHECKPOINTS {
        let dir = checkpoint(name);
        let o = kollava(&[&"verify", &"--model", &dir, &"--reference", &dir]);
        assert_success(&o);
        let (passed, failed, _) = verify_summary(&stdout(&o));
        assert!(passed > 0 && failed == 0, "{name}:\n{}", stdout(&o));
    }
}

#[test]
fn verify_runs_where_device_says_or_says_why_not() {
    let dir = checkpoint("llava-v1.5");
    let verify_on = |device: &str| {
        kollava(&[
            &"verify",
            &"--model",
            &dir,
            &"--reference",
            &dir,
            &"--device",
            &device,
        ])
    };
    let o = verify_on("cpu");
    assert_success(&o);
    let (passed, failed, _) = verify_summary(&stdout(&o));
    assert!(passed > 0 && failed == 0, "{}", stdout(&o));
    let o = verify_on("gpu");
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("is not cpu, cuda or cuda:N"),
        "{}",
        stderr(&o)
    );
    // Without the cuda feature a GPU is refused up front, in one line.
    #[cfg(not(feature = "cuda"))]
    {
        let o = verify_on("cuda:0");
        assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
        let err = stderr(&o);
        assert!(
            err.contains("built without CUDA") && !err.contains("panicked"),
            "{err}"
        );
        assert!(stdout(&o).is_empty(), "{}", stdout(&o));
    }
}

/// Runs `verify` on a scratch copy and checks that exactly `key` fails.
#[track_caller]
fn assert_verify_fails_only_on(scratch: &Scratch, key: &str) {
    let o = kollava(&[
        &"verify",
        &"--model",
        &scratch.ckpt,
        &"--reference",
        &scratch.ckpt,
    ]);
    let out = stdout(&o);
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(1), "{out}");
    let (_, failed, _) = verify_summary(&out);
    assert_eq!(failed, 1, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("FAIL") && l.split_whitespace().nth(1) == Some(key)),
        "no FAIL line for {key}:\n{out}"
    );
}

#[test]
fn verify_fails_on_logits_off_by_1e_2() {
    let s = Scratch::new("llava-v1.5");
    edit_safetensors(&s.file("reference.safetensors"), |t| {
        let logits = t["logits.last3"].affine(1.0, 1e-2).unwrap();
        t.insert("logits.last3".into(), logits);
    });
    assert_verify_fails_only_on(&s, "logits.last3");
}

#[test]
fn verify_fails_on_one_changed_greedy_id() {
    let s = Scratch::new("llava-v1.5");
    edit_safetensors(&s.file("reference.safetensors"), |t| {
        let want = &t["generate.greedy_ids"];
        let mut ids: Vec<i64> = want.to_dtype(DType::I64).unwrap().to_vec1().unwrap();
        ids[0] += 1;
        let ids = Tensor::new(ids, &Device::Cpu)
            .unwrap()
            .to_dtype(want.dtype())
            .unwrap();
        t.insert("generate.greedy_ids".into(), ids);
    });
    assert_verify_fails_only_on(&s, "generate.greedy_ids");
}

#[test]
fn verify_fails_on_one_changed_tokenizer_id_in_reference_json() {
    let s = Scratch::new("llava-v1.5");
    edit_json(&s.file("reference.json"), |j| {
        let ids = j["tokenizer"]["strings"][0]["ids"]
            .as_array_mut()
            .expect("ids");
        let last = ids.last_mut().expect("non-empty");
        *last = Value::from(last.as_u64().expect("id") + 1);
    });
    assert_verify_fails_only_on(&s, "tokenizer.0");
}
