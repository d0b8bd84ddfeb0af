//! `kollava bench` and `bench-serve`: every figure reported.

use std::ffi::OsStr;

use serde_json::{json, Value};

use crate::common::*;

#[test]
fn bench_json_reports_every_figure() {
    let o = kollava(&[
        &"bench",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--gen-tokens",
        &"3",
        &"--repeat",
        &"1",
        &"--threads",
        &"1",
        &"--json",
    ]);
    assert_success(&o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    for key in [
        "preprocess_ms",
        "vision_ms",
        "prefill_ms",
        "prefill_tokens_per_s",
        "time_to_first_token_ms",
        "decode_tokens_per_s",
        "peak_rss_mib",
        "decode_bytes_per_token",
        "memory_bandwidth_gb_s",
        "roofline_tokens_per_s",
        "roofline_fraction",
    ] {
        assert!(
            v[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
            "{key}: {}",
            v[key]
        );
    }
    assert_eq!(v["gen_tokens"], 3);
    assert_eq!(v["threads"], 1);
    assert_eq!(v["device"], "cpu");
}

/// `kollava bench train` on a fixture: every figure, for stage 1 and for LoRA, and nothing
/// written beside the data.
#[test]
fn bench_train_json_reports_every_figure_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let images = crate_fixture_images();
    let records: Vec<Value> = ["wide_rgb.png", "tall_rgb.png", "square_rgb.png"]
        .iter()
        .map(|img| {
            json!({"id": img, "image": img, "conversations": [
                {"from": "human", "value": "<image>\n설명해 주세요."},
                {"from": "gpt", "value": "빨간 사각형과 파란 원이 있습니다."}]})
        })
        .collect();
    let data = write_file(
        &tmp,
        "data.json",
        Value::from(records).to_string().as_bytes(),
    );
    let before: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
    for extra in [
        &["--stage", "pretrain"][..],
        &["--stage", "finetune", "--lora-r", "4"],
    ] {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![
            &"bench",
            &"train",
            &FINETUNE_MODEL,
            &"--data",
            &data,
            &"--image-folder",
            &images,
            &"--steps",
            &"2",
            &"--warmup",
            &"1",
            &"--threads",
            &"1",
            &"--json",
        ];
        args.insert(2, &"--model");
        for e in extra {
            args.push(e);
        }
        let o = kollava(&args);
        assert_success(&o);
        let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
        for key in [
            "step_s",
            "samples_per_s",
            "tokens_per_s",
            "tokens_per_step",
            "forward_s",
            "backward_s",
            "peak_rss_mib",
        ] {
            assert!(
                v[key].as_f64().is_some_and(|x| x.is_finite() && x > 0.0),
                "{key}: {}",
                v[key]
            );
        }
        for key in ["vision_s", "optimizer_s", "communication_s"] {
            assert!(
                v[key].as_f64().is_some_and(|x| x >= 0.0),
                "{key}: {}",
                v[key]
            );
        }
        assert_eq!(v["steps"], 2);
        assert!(v["trained_parameters"].as_u64().unwrap() > 0);
    }
    assert_eq!(std::fs::read_dir(tmp.path()).unwrap().count(), before.len());
}

/// `kollava bench serve` against the demo server: every level reports its streams, tokens/s
/// and time-to-first-token percentiles; a server that is down is a one-line error.
#[test]
fn bench_serve_reports_each_concurrency_level() {
    let (mut child, url) = serve_demo();
    let o = kollava(&[
        &"bench",
        &"serve",
        &"--url",
        &url,
        &"--concurrency",
        &"1,3",
        &"--requests",
        &"3",
        &"--max-tokens",
        &"6",
        &"--image",
        &image("wide_rgb.png"),
        &"--json",
    ]);
    let _ = child.kill();
    assert_success(&o);
    let v: Value = serde_json::from_str(stdout(&o).trim()).unwrap();
    let levels = v["levels"].as_array().unwrap();
    assert_eq!(levels.len(), 2);
    for (l, c) in levels.iter().zip([1, 3]) {
        assert_eq!(l["concurrency"], c);
        assert_eq!(l["requests"], 3);
        assert_eq!(l["failed"], 0, "{l}");
        assert!(l["completion_tokens"].as_u64().unwrap() > 0);
        assert!(l["tokens_per_s"].as_f64().unwrap() > 0.0);
        let p = &l["ttft_ms"];
        assert!(p["p50"].as_f64().unwrap() <= p["p99"].as_f64().unwrap());
    }
    let o = kollava(&[
        &"bench",
        &"serve",
        &"--url",
        &"http://127.0.0.1:9",
        &"--concurrency",
        &"1",
    ]);
    assert_one_line_error(&o, &["cannot reach http://127.0.0.1:9"]);
}
