//! `kollava quantize` and GGUF models.

use crate::common::*;

/// `quantize --type q8_0` then `run` on the GGUF pair: the same greedy ids as the source on
/// every family, up to the source's first near-tie (its two most likely tokens within 0.01
/// nats, where q8_0's rounding may pick either: the random fixtures have some), and there one
/// of those two; `--report` prints its agreement figures.
#[test]
fn quantized_q8_0_models_answer_as_their_source() {
    for family in kollava_testkit::CHECKPOINTS {
        let scratch = Scratch::new(family);
        let out = scratch.file("q8");
        let o = kollava(&[
            &"quantize",
            &"--type",
            &"q8_0",
            &"--report",
            &checkpoint(family),
            &out,
        ]);
        assert_success(&o);
        let report = stdout(&o);
        let agreement: f64 = report
            .split("top-1 agreement ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no agreement figure in {report:?}"));
        assert!(agreement >= 0.9, "{family}: {report}");
        let source = run_json(
            &checkpoint(family),
            &["--temperature", "0", "--logprobs", "2"],
        );
        let quantized = run_json(&out, &["--temperature", "0"]);
        let (want, got) = (token_ids(&source), token_ids(&quantized));
        let top2 = |t: &serde_json::Value| -> Vec<(u64, f64)> {
            t["top"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| (c["id"].as_u64().unwrap(), c["logprob"].as_f64().unwrap()))
                .collect()
        };
        let steps = source["logprobs"].as_array().unwrap();
        assert_eq!(steps.len(), want.len(), "{family}");
        let tie = steps
            .iter()
            .position(|t| {
                let c = top2(t);
                c[0].1 - c[1].1 < 0.01
            })
            .unwrap_or(want.len());
        let upto = tie.min(got.len());
        assert_eq!(
            got[..upto],
            want[..upto],
            "{family}: before the near-tie at {tie}"
        );
        if tie < want.len() {
            let pick = got[tie];
            assert!(
                top2(&steps[tie]).iter().any(|c| c.0 == pick),
                "{family}: {pick} at the near-tie {tie} is neither of the source's two"
            );
        }
    }
}

#[test]
fn quantize_and_gguf_models_refuse_bad_input_in_one_line() {
    let scratch = Scratch::new("quantize-errors");
    let o = kollava(&[
        &"quantize",
        &"--type",
        &"q5_k",
        &checkpoint("llava-v1.5"),
        &scratch.file("x"),
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("q5_k"));
    let o = kollava(&[
        &"quantize",
        &"--type",
        &"q8_0",
        &scratch.file("missing"),
        &scratch.file("x"),
    ]);
    assert_one_line_error(&o, &["missing"]);
    let out = scratch.file("q");
    assert_success(&kollava(&[
        &"quantize",
        &"--type",
        &"q4_0",
        &checkpoint("llava-v1.5"),
        &out,
    ]));
    // A model file without its encoder, then with a wrong one.
    let lonely = scratch.file("lonely");
    std::fs::create_dir_all(&lonely).unwrap();
    std::fs::copy(out.join("llava-v1.5-Q4_0.gguf"), lonely.join("m.gguf")).unwrap();
    let o = kollava(&[
        &"run",
        &"--model",
        &lonely,
        &"--image",
        &image("wide_rgb.png"),
        &"--query",
        &"hi",
    ]);
    assert_one_line_error(&o, &["--mmproj"]);
    let o = kollava(&[
        &"run",
        &"--model",
        &lonely.join("m.gguf"),
        &"--mmproj",
        &lonely.join("m.gguf"),
        &"--query",
        &"hi",
    ]);
    assert_one_line_error(&o, &["image encoder"]);
}
