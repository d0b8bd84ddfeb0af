//! `kollava data check`.

use crate::common::*;

#[test]
fn data_check_reports_each_planted_problem_by_id() {
    let tmp = tempfile::tempdir().unwrap();
    let good = r#"{"id": "ok", "image": "wide_rgb.png", "conversations": [{"from": "human", "value": "<image>\n무엇이 보이나요?"}, {"from": "gpt", "value": "원"}]}"#;
    let lines = [
        good.to_string(),
        good.replace("\"ok\"", "\"dup\""),
        good.replace("\"ok\"", "\"dup\""),
        good.replace("\"ok\"", "\"missing\"").replace("wide_rgb.png", "nope.png"),
        good.replace("\"ok\"", "\"middle\"").replace("<image>\\n무엇이", "무엇이 <image> 보이나요"),
        r#"{"id": "noimage", "conversations": [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "x"}]}"#.to_string(),
        r#"{"id": "roles", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}"#.to_string(),
        good.replace("\"ok\"", "\"long\"").replace("\"원\"", &format!("\"{}\"", "아주 긴 답변입니다. ".repeat(20))),
    ];
    let data = write_file(&tmp, "data.jsonl", lines.join("\n").as_bytes());
    let images = crate_fixture_images();
    let o = kollava(&[
        &"data",
        &"check",
        &"--data",
        &data,
        &"--image-folder",
        &images,
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--model-max-length",
        &"40",
        &"--histogram",
        &tmp.path().join("lengths.png"),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    let out = stdout(&o);
    let png = image::open(tmp.path().join("lengths.png")).expect("the histogram is a PNG");
    assert!(png.width() > 100 && png.height() > 100);
    for needle in [
        "dup: duplicate id",
        "missing: cannot read image",
        "middle: <image> is in the middle",
        "noimage: 1 <image> placeholder",
        "#6",
        "long: ",
        "over the maximum length of 40",
    ] {
        assert!(out.contains(needle), "{needle:?} not in:\n{out}");
    }
    assert!(
        !out.contains("ok:"),
        "the good record has no problem:\n{out}"
    );
}
