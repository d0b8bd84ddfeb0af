//! `kollava eval`: VQA answering and resuming, ScienceQA conversion and scoring, GPT-review
//! with a local judge, summaries.

use std::ffi::OsStr;

use serde_json::{json, Value};

use crate::common::*;

#[test]
fn eval_vqa_answers_like_run_and_resumes_without_duplicates() {
    let tmp = tempfile::tempdir().unwrap();
    let questions = write_file(
        &tmp,
        "q.jsonl",
        format!(
            "{{\"question_id\": 1, \"image\": \"wide_rgb.png\", \"text\": \"{QUERY}\", \"category\": \"conv\"}}\n{{\"question_id\": \"q2\", \"image\": \"tall_rgb.png\", \"text\": \"What is it?\"}}\n"
        )
        .as_bytes(),
    );
    let answers = tmp.path().join("out/answers.jsonl");
    let images = crate_fixture_images();
    let ckpt = checkpoint("llava-v1.5");
    let args: Vec<&dyn AsRef<OsStr>> = vec![
        &"eval",
        &"vqa",
        &"--model",
        &ckpt,
        &"--question-file",
        &questions,
        &"--image-folder",
        &images,
        &"--answers-file",
        &answers,
        &"--temperature",
        &"0",
        &"--max-new-tokens",
        &"8",
    ];
    assert_success(&kollava(&args));
    let lines: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["question_id"], 1);
    assert_eq!(lines[1]["question_id"], "q2");
    assert_eq!(lines[0]["prompt"], QUERY);
    assert_eq!(lines[0]["answer_id"].as_str().unwrap().len(), 22);
    // Same answer as `kollava run` for the same question and image.
    let run = run_json(&ckpt, &["--temperature", "0"]);
    assert_eq!(lines[0]["text"], run["text"]);

    // Simulate an interruption: keep the first answer and half of the second line.
    let text = std::fs::read_to_string(&answers).unwrap();
    let first_end = text.find('\n').unwrap() + 1;
    std::fs::write(&answers, &text[..first_end + 20]).unwrap();
    assert_success(&kollava(&args));
    // Every line parses (the torn one was cut), every id appears once.
    let ids: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["question_id"].clone())
        .collect();
    assert_eq!(ids, vec![json!(1), json!("q2")], "every id exactly once");
}

/// `eval review` with a local `kollava serve` (the demo model) as the judge: a complete
/// review file in the reference format; a rerun asks nothing again; a judge that is down
/// is a clear error that keeps what was written.
#[test]
fn eval_review_with_a_local_judge_resumes_and_survives_a_dead_judge() {
    let tmp = tempfile::tempdir().unwrap();
    let mut q = String::new();
    let mut a1 = String::new();
    let mut a2 = String::new();
    for i in 0..3 {
        q.push_str(&format!("{}\n", json!({"question_id": i, "image": "x.jpg", "text": "무엇이 있나요?", "category": if i == 2 { "detail" } else { "conv" }})));
        a1.push_str(&format!(
            "{}\n",
            json!({"question_id": i, "text": "원입니다.", "answer_id": format!("a{i}")})
        ));
        a2.push_str(&format!(
            "{}\n",
            json!({"question_id": i, "text": "사각형입니다."})
        ));
    }
    let q = write_file(&tmp, "q.jsonl", q.as_bytes());
    let a1 = write_file(&tmp, "a1.jsonl", a1.as_bytes());
    let a2 = write_file(&tmp, "a2.jsonl", a2.as_bytes());
    let ctx = write_file(&tmp, "ctx.jsonl", format!("{}\n", json!({"image": "x.jpg", "captions": ["원 하나."], "instances": [{"category": "circle", "bbox": [0.1, 0.2, 0.3, 0.4]}]})).as_bytes());
    let rule = write_file(&tmp, "rule.json", json!({"conv": {"role": "Assistant", "prompt": "두 답을 1-10으로 평가하세요."}, "detail": {"role": "Assistant", "prompt": "자세히 평가하세요."}}).to_string().as_bytes());
    let out = tmp.path().join("review.jsonl");
    let (mut server, url) = serve_demo();
    let judge = format!("{url}/v1");
    let args = |judge: &str| -> Vec<std::ffi::OsString> {
        let mut v: Vec<std::ffi::OsString> = vec![
            "eval".into(),
            "review".into(),
            "-q".into(),
            q.clone().into(),
            "-c".into(),
            ctx.clone().into(),
            "-a".into(),
            a1.clone().into(),
            a2.clone().into(),
            "-r".into(),
            rule.clone().into(),
            "-o".into(),
            out.clone().into(),
        ];
        for a in [
            "--judge-url",
            judge,
            "--judge-model",
            "kollava-demo",
            "--retries",
            "1",
        ] {
            v.push(a.into());
        }
        v
    };
    let o = kollava(&as_args(&args(&judge)));
    assert_success(&o);
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    let mut ids: Vec<u64> = lines
        .iter()
        .map(|l| l["question_id"].as_u64().unwrap())
        .collect();
    ids.sort();
    assert_eq!(ids, [0, 1, 2]);
    for l in &lines {
        let qid = l["question_id"].as_u64().unwrap();
        assert_eq!(l["id"], qid + 1);
        assert_eq!(l["answer1_id"], format!("a{qid}"));
        assert_eq!(l["answer2_id"], qid);
        let content = l["content"].as_str().unwrap();
        let expected = kollava_eval::review::parse_score(content);
        assert_eq!(
            l["tuple"],
            json!(expected),
            "the reference's parse of {content:?}"
        );
    }
    let before = std::fs::read_to_string(&out).unwrap();
    let o = kollava(&as_args(&args(&judge)));
    assert_success(&o);
    assert!(stderr(&o).contains("wrote 0 reviews"), "{}", stderr(&o));
    server.kill().unwrap();
    server.wait().unwrap();

    // A dead judge: one more question to ask, a clear error, the old reviews intact.
    std::fs::write(
        &q,
        format!(
            "{}{}\n",
            std::fs::read_to_string(&q).unwrap(),
            json!({"question_id": 3, "image": "x.jpg", "text": "?", "category": "conv"})
        ),
    )
    .unwrap();
    for f in [&a1, &a2] {
        std::fs::write(
            f,
            format!(
                "{}{}\n",
                std::fs::read_to_string(f).unwrap(),
                json!({"question_id": 3, "text": "?"})
            ),
        )
        .unwrap();
    }
    let o = kollava(&as_args(&args("http://127.0.0.1:9/v1")));
    assert_one_line_error(&o, &["judge", "127.0.0.1:9", "rerun"]);
    assert_eq!(std::fs::read_to_string(&out).unwrap(), before);
}

/// `eval summarize` prints the reference's lines (hand-computed here) and, with --chart,
/// draws one bar per category.
#[test]
fn eval_summarize_prints_the_reference_summary_and_a_chart() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("reviews");
    std::fs::create_dir(&dir).unwrap();
    let lines = [
        ("conv", [8.0, 6.0]),
        ("conv", [6.0, 6.0]),
        ("detail", [5.0, 10.0]),
    ]
    .iter()
    .map(|(c, t)| json!({"category": c, "tuple": t}).to_string() + "\n")
    .collect::<String>();
    std::fs::write(dir.join("reviews_x.jsonl"), lines).unwrap();
    let chart = tmp.path().join("chart.png");
    let o = kollava(&[&"eval", &"summarize", &"-d", &dir, &"--chart", &chart]);
    assert_success(&o);
    assert_eq!(
        stdout(&o),
        "reviews_x\nconv [7.0, 6.0] 85.7\nall [6.333, 7.333] 115.8\ndetail [5.0, 10.0] 200.0\n=================================\n"
    );
    let img = image::open(&chart).unwrap().to_rgb8();
    // Three bars: three runs of bar-coloured pixels along a row just above the axis.
    let y = img.height() - 45;
    let bar = image::Rgb([31u8, 119, 180]);
    let runs = (1..img.width())
        .filter(|&x| *img.get_pixel(x, y) == bar && *img.get_pixel(x - 1, y) != bar)
        .count();
    assert_eq!(runs, 3);
}

fn sqa_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let problems = serde_json::json!({
        "1": {"question": "Which is a mammal?", "choices": ["frog", "whale"], "answer": 1,
              "hint": "", "image": null, "lecture": "Mammals have fur.", "solution": "A whale is a mammal.",
              "subject": "natural science", "grade": "grade3"},
        "2": {"question": "Which word is a noun?", "choices": ["run", "dog", "fast"], "answer": 1,
              "hint": "Read the words.", "image": null, "lecture": "", "solution": "",
              "subject": "language science", "grade": "grade8"},
        "3": {"question": "Which country is highlighted?", "choices": ["Korea", "Japan"], "answer": 0,
              "hint": "", "image": "image.png", "lecture": "", "solution": "Look at the map.",
              "subject": "social science", "grade": "grade5"},
        "4": {"question": "What is the force?", "choices": ["push", "pull", "both"], "answer": 2,
              "hint": "A box moves.", "image": "image.png", "lecture": "Forces.", "solution": "",
              "subject": "natural science", "grade": "grade11"}
    });
    std::fs::write(dir.path().join("problems.json"), problems.to_string()).unwrap();
    let splits = serde_json::json!({"train": ["1", "2"], "test": ["1", "2", "3", "4"]});
    std::fs::write(dir.path().join("pid_splits.json"), splits.to_string()).unwrap();
    dir
}

#[test]
fn science_qa_convert_writes_the_reference_records() {
    let dir = sqa_dir();
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--split",
        &"test",
    ]);
    assert_success(&o);
    let text = std::fs::read_to_string(dir.path().join("llava_test_QCM-LEPA.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 4);
    assert_eq!(
        v[0],
        serde_json::json!({"id": "1", "conversations": [
            {"from": "human", "value": "Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale"},
            {"from": "gpt", "value": "LECTURE: Mammals have fur.\nSOLUTION: A whale is a mammal.\n###\nANSWER: B."}]})
    );
    assert_eq!(
        v[2],
        serde_json::json!({"id": "3", "image": "3/image.png", "conversations": [
            {"from": "human", "value": "Which country is highlighted?\nContext: N/A\nOptions: (A) Korea (B) Japan\n<image>"},
            {"from": "gpt", "value": "SOLUTION: Look at the map.\n###\nANSWER: A."}]})
    );
    // The reference's json.dump(indent=2) layout.
    assert!(text.starts_with("[\n  {\n    \"id\": \"1\","), "{text}");
    let out = dir.path().join("train.jsonl");
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--prompt-format",
        &"CQM-A",
        &"--jsonl",
        &"-o",
        &out,
    ]);
    assert_success(&o);
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        lines[1],
        serde_json::json!({"id": "2", "instruction": "Context: Read the words.\nQuestion: Which word is a noun?\nOptions: (A) run (B) dog (C) fast", "output": "The answer is B."})
    );
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--split",
        &"val",
    ]);
    assert_one_line_error(&o, &["val", "test, train"]);
}

#[test]
fn science_qa_score_matches_hand_counted_accuracies() {
    let dir = sqa_dir();
    let answers = dir.path().join("answers.jsonl");
    // 1: right (bare letter); 2: wrong ("The answer is A."); 3: missing; 4: right ("C. both").
    std::fs::write(
        &answers,
        "{\"question_id\": \"1\", \"prompt\": \"Which is a mammal?\", \"text\": \"B\"}\n\
         {\"question_id\": \"2\", \"prompt\": \"Which word\", \"text\": \"LECTURE: …\\n###\\nANSWER: A.\\n The answer is A.\"}\n\
         {\"question_id\": \"4\", \"prompt\": \"force\\n<image>\", \"text\": \"C. both\"}\n",
    )
    .unwrap();
    let result = dir.path().join("result.json");
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"score",
        &"--base-dir",
        &dir.path(),
        &"--result-file",
        &answers,
        &"--output-result",
        &result,
    ]);
    assert_success(&o);
    let out = stdout(&o);
    assert_eq!(
        out.lines().last().unwrap(),
        "Total: 4, Correct: 2, Accuracy: 50.00%, IMG-Accuracy: 100.00%"
    );
    // NAT: 1 and 4 right; LAN: 2 wrong; SOC: 3 wrong; TXT: 2 wrong, 4 right; IMG: 3 wrong, 4 right;
    // NO: 1 right; G1-6: 1 right, 3 wrong; G7-12: 2 wrong, 4 right.
    for line in [
        "NAT    100.00%  (2/2)",
        "SOC      0.00%  (0/1)",
        "LAN      0.00%  (0/1)",
        "TXT     50.00%  (1/2)",
        "IMG     50.00%  (1/2)",
        "NO     100.00%  (1/1)",
        "G1-6    50.00%  (1/2)",
        "G7-12   50.00%  (1/2)",
    ] {
        assert!(out.lines().any(|l| l == line), "missing {line:?} in\n{out}");
    }
    let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
    assert_eq!(r["correct"], 2);
    assert_eq!(r["results"]["3"], -1);
    assert_eq!(r["outputs"]["3"], "FAILED");
    // A seeded guess for the failed ones: deterministic, and always a valid choice.
    let run = || {
        let o = kollava(&[
            &"eval",
            &"science-qa",
            &"score",
            &"--base-dir",
            &dir.path(),
            &"--result-file",
            &answers,
            &"--random-fallback",
            &"7",
            &"--output-result",
            &result,
        ]);
        assert_success(&o);
        let r: Value = serde_json::from_str(&std::fs::read_to_string(&result).unwrap()).unwrap();
        r["results"]["3"].as_i64().unwrap()
    };
    let guess = run();
    assert!((0..2).contains(&guess));
    assert_eq!(guess, run());
    // A malformed line is reported with its number.
    std::fs::write(
        &answers,
        "{\"question_id\": \"1\", \"text\": \"B\"}\n{oops\n",
    )
    .unwrap();
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"score",
        &"--base-dir",
        &dir.path(),
        &"--result-file",
        &answers,
    ]);
    assert_one_line_error(&o, &["line 2"]);
}

/// convert → eval vqa (model_vqa_science, both switches) → score, end to end.
#[test]
fn science_qa_records_run_through_eval_vqa_and_score() {
    let dir = sqa_dir();
    for id in ["3", "4"] {
        std::fs::create_dir_all(dir.path().join(id)).unwrap();
        std::fs::copy(image("wide_rgb.png"), dir.path().join(id).join("image.png")).unwrap();
    }
    let records = dir.path().join("test.json");
    assert_success(&kollava(&[
        &"eval",
        &"science-qa",
        &"convert",
        &"--base-dir",
        &dir.path(),
        &"--split",
        &"test",
        &"-o",
        &records,
    ]));
    let answers = dir.path().join("answers.jsonl");
    let o = kollava(&[
        &"eval",
        &"vqa",
        &"--model",
        &checkpoint("llava-v1.5"),
        &"--question-file",
        &records,
        &"--image-folder",
        &dir.path(),
        &"--answers-file",
        &answers,
        &"--single-pred-prompt",
        &"--answer-prompter",
        &"--temperature",
        &"0",
        &"--max-new-tokens",
        &"3",
    ]);
    assert_success(&o);
    let lines: Vec<Value> = std::fs::read_to_string(&answers)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["question_id"], "1");
    assert_eq!(
        lines[0]["prompt"],
        "Which is a mammal?\nContext: N/A\nOptions: (A) frog (B) whale\nAnswer with the option's letter from the given choices directly."
    );
    assert_eq!(
        lines[2]["prompt"],
        "Which country is highlighted?\nContext: N/A\nOptions: (A) Korea (B) Japan\n<image>\nAnswer with the option's letter from the given choices directly."
    );
    for l in &lines {
        assert!(
            l["text"].as_str().unwrap().contains("\n The answer is "),
            "{l}"
        );
    }
    let o = kollava(&[
        &"eval",
        &"science-qa",
        &"score",
        &"--base-dir",
        &dir.path(),
        &"--result-file",
        &answers,
    ]);
    assert_success(&o);
    assert!(
        stdout(&o)
            .lines()
            .last()
            .unwrap()
            .starts_with("Total: 4, Correct: "),
        "{}",
        stdout(&o)
    );
}

/// `--batch-size`: questions of different lengths, with and without an image, answered
/// together give the answers they get one at a time, on every family.
#[test]
fn eval_vqa_batches_answer_as_one_at_a_time() {
    let tmp = tempfile::tempdir().unwrap();
    let questions = write_file(
        &tmp,
        "q.jsonl",
        format!(
            "{{\"question_id\": 1, \"image\": \"wide_rgb.png\", \"text\": \"{QUERY}\"}}\n\
             {{\"question_id\": 2, \"text\": \"Hi\"}}\n\
             {{\"question_id\": 3, \"image\": \"tall_rgb.png\", \"text\": \"What is it? Describe every detail of it, please.\"}}\n\
             {{\"question_id\": 4, \"text\": \"한국어로 길게 대답해 주세요. 무엇을 좋아하나요?\"}}\n\
             {{\"question_id\": 5, \"image\": \"wide_rgb.png\", \"text\": \"Colour?\"}}\n"
        )
        .as_bytes(),
    );
    let images = crate_fixture_images();
    for family in kollava_testkit::CHECKPOINTS {
        let answers = |batch: &str| -> Vec<Value> {
            let out = tmp.path().join(format!("{family}-{batch}.jsonl"));
            assert_success(&kollava(&[
                &"eval",
                &"vqa",
                &"--model",
                &checkpoint(family),
                &"--question-file",
                &questions,
                &"--image-folder",
                &images,
                &"--answers-file",
                &out,
                &"--temperature",
                &"0",
                &"--max-new-tokens",
                &"12",
                &"--batch-size",
                &batch,
            ]));
            std::fs::read_to_string(&out)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap()["text"].clone())
                .collect()
        };
        let one = answers("1");
        assert_eq!(one.len(), 5);
        assert_eq!(answers("3"), one, "{family}");
    }
}
